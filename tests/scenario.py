"""A real doit project in a temporary folder, for scenario tests.

The project holds a copy of dodo.py and of the ``export`` package (so a test
can edit the code the build keys on), a pyproject.toml with a tiny student
(a checkpoint file) and the demo judge, and its own shape_sets.json.
Every build runs ``python -m doit`` in a subprocess, exactly as a user would.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPE_SETS = {
    "tiny": {"prefill": [16, 32], "decode": [16, 32]},
    "tiny_judge": {"prefill": [16, 32]},
}
STUDENT = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_positions=64)

EXPORT_TOML = """\
[tool.export]
artifacts = "artifacts"
shape_sets = "shape_sets.json"

[[tool.export.models]]
name = "student"
architecture = "student"
checkpoint = "checkpoints/student.pt"
shape_set = "tiny"
coreml = {{ compute_precision = "{precision}" }}

[[tool.export.models]]
name = "judge"
architecture = "judge"
checkpoint = "demo"
shape_set = "tiny_judge"
"""


def student_toml(shape_set: str, modes: tuple[str, ...] | None = None) -> str:
    """The [tool.export] of a project with one student, its checkpoint at checkpoints/student.pt."""
    lines = ['[tool.export]', 'artifacts = "artifacts"', 'shape_sets = "shape_sets.json"', '',
             '[[tool.export.models]]', 'name = "student"', 'architecture = "student"',
             'checkpoint = "checkpoints/student.pt"', f'shape_set = "{shape_set}"']
    if modes:
        lines.append("modes = [" + ", ".join(f'"{m}"' for m in modes) + "]")
    return "\n".join(lines) + "\n"


def project_toml(export_toml: str, name: str = "scenario") -> str:
    """A project's pyproject.toml: the repo's own doit commands, and ``export_toml`` as its pipeline."""
    repo = (REPO / "pyproject.toml").read_text()
    commands = re.search(r"^\[tool\.doit\.plugins\.command\]\n(?:[^\[\n].*\n|\n)*", repo, re.M).group(0)
    return f'[project]\nname = "{name}"\nversion = "0"\n\n{commands}\n{export_toml}'


def write_student_checkpoint(path: Path, seed: int = 0) -> None:
    code = textwrap.dedent(f"""
        import torch
        from export import checkpoint
        from export.models.registry import get
        from export.models.common import config_from_dict
        arch = get("student")
        cfg = config_from_dict(arch.config_cls, {STUDENT!r})
        torch.manual_seed({seed})
        checkpoint.save({str(path)!r}, "student", cfg, arch.build(cfg).state_dict())
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=path.parents[1])


class Project:
    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def create(cls, root: Path) -> "Project":
        root.mkdir(parents=True)
        shutil.copy(REPO / "dodo.py", root / "dodo.py")
        shutil.copytree(REPO / "export", root / "export", ignore=shutil.ignore_patterns("__pycache__"))
        p = cls(root)
        p.set_pyproject(precision="fp16")
        p.set_shape_sets(SHAPE_SETS)
        (root / "checkpoints").mkdir()
        write_student_checkpoint(root / "checkpoints" / "student.pt")
        return p

    def copy(self, dest: Path) -> "Project":
        shutil.copytree(self.root, dest, symlinks=True)
        return Project(dest)

    def set_pyproject(self, **fields) -> None:
        (self.root / "pyproject.toml").write_text(project_toml(EXPORT_TOML.format(**fields)))

    def set_shape_sets(self, sets: dict) -> None:
        (self.root / "shape_sets.json").write_text(json.dumps(sets, indent=2))

    def env(self, extra: dict | None = None) -> dict:
        """The environment of a build: the project's own cache (copied along with the project), no remote."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_EXPORT_")}
        return {**env, "MODEL_EXPORT_CACHE": str(self.root / ".cache"), **(extra or {})}

    def doit(self, *args: str, env: dict | None = None, check: bool = True, python_args=()) -> subprocess.CompletedProcess:
        full_env = self.env(env)
        r = subprocess.run([sys.executable, *python_args, "-m", "doit", *args], cwd=self.root, env=full_env,
                           capture_output=True, text=True, timeout=900)
        if check and r.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def last_build(self) -> dict[str, str]:
        data = json.loads((self.root / "artifacts" / "last_build.json").read_text())
        return {name: rec["status"] for name, rec in data["tasks"].items()}

    def ran(self) -> set[str]:
        """Tasks that executed their step in the last build."""
        return self.with_status("built")

    def restored(self) -> set[str]:
        """Tasks whose outputs came back from the cache in the last build."""
        return self.with_status("restored")

    def with_status(self, status: str) -> set[str]:
        return {n for n, s in self.last_build().items() if s == status}

    def artifact_digests(self) -> dict[str, str]:
        """Digests of every built artifact (the files under artifacts/<model>/; not the run's reports)."""
        from export.digest import file_digest

        art = self.root / "artifacts"
        return {str(p.relative_to(art)): file_digest(p) for p in sorted(art.glob("*/**/*")) if p.is_file()}
