"""A real doit project in a temporary folder, for scenario tests.

The project holds a copy of dodo.py and of the ``export`` package (so a test
can edit the code the build keys on), a pyproject.toml with a tiny student
(a checkpoint file) and the demo judge, and its own shape_sets.json.
Every build runs ``python -m doit`` in a subprocess, exactly as a user would.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPE_SETS = {
    "tiny": {"prefill": [16, 32], "decode": [16, 32]},
    "tiny_judge": {"prefill": [16, 32]},
}
STUDENT = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_positions=64)

def export_head(artifacts: str = "artifacts") -> str:
    """The ``[tool.export]`` table's own keys (a project's models follow it)."""
    return f'[tool.export]\nartifacts = "{artifacts}"\nshape_sets = "shape_sets.json"\n'


def model_toml(name: str, architecture: str, checkpoint: str, shape_set: str, **fields: str) -> str:
    """One ``[[tool.export.models]]`` block; ``fields``: more keys, each a TOML value as written
    (``modes='["prefill"]'``, ``coreml='{ minimum_deployment_target = "iOS18" }'``)."""
    lines = ["", "[[tool.export.models]]", f'name = "{name}"', f'architecture = "{architecture}"',
             f'checkpoint = "{checkpoint}"', f'shape_set = "{shape_set}"', *(f"{k} = {v}" for k, v in fields.items())]
    return "\n".join(lines) + "\n"


def judge_toml(shape_set: str = "judge", name: str = "judge", **fields: str) -> str:
    """The demo judge's model block (its checkpoint made on demand, the same bytes every time)."""
    return model_toml(name, "judge", "demo", shape_set, **fields)


def student_toml(shape_set: str, modes: tuple[str, ...] | None = None) -> str:
    """The [tool.export] of a project with one student, its checkpoint at checkpoints/student.pt."""
    fields = {"modes": "[" + ", ".join(f'"{m}"' for m in modes) + "]"} if modes else {}
    return export_head() + model_toml("student", "student", "checkpoints/student.pt", shape_set, **fields)


EXPORT_TOML = (export_head() + model_toml("student", "student", "checkpoints/student.pt", "tiny",
                                          coreml='{{ compute_precision = "{precision}" }}') + judge_toml("tiny_judge"))

# The recipes of README "Deployment recipes" (tests/test_recipes.py, bench/bench_recipes.py)
RECIPES_TOML = """
[tool.export.recipes.lut4]
default = { palettize_bits = 4, granularity = "per_grouped_channel", group_size = 16 }
lm_head = { palettize_bits = 6 }

[tool.export.recipes.int4]
default = { quantize = "int4", block_size = 32 }

[tool.export.recipes.int8]
default = { quantize = "int8" }
embeddings = "none"
"""


def project_toml(export_toml: str, name: str = "scenario") -> str:
    """A project's pyproject.toml: the repo's own doit commands, and ``export_toml`` as its pipeline."""
    repo = (REPO / "pyproject.toml").read_text()
    commands = re.search(r"^\[tool\.doit\.plugins\.command\]\n(?:[^\[\n].*\n|\n)*", repo, re.M).group(0)
    return f'[project]\nname = "{name}"\nversion = "0"\n\n{commands}\n{export_toml}'


def write_student_checkpoint(path: Path, seed: int = 0) -> None:
    """The tiny student's checkpoint with weights from ``seed`` (the same bytes every time)."""
    Path(path).write_bytes(_student_checkpoint(seed))


@functools.lru_cache(maxsize=None)
def _student_checkpoint(seed: int) -> bytes:
    # Made in this (torch-importing) process once per seed: a subprocess would import torch again
    # for every project. fork_rng leaves the test process's random state as it was.
    import tempfile

    import torch

    from export import checkpoint
    from export.models.registry import get
    from export.models.common import config_from_dict

    arch = get("student")
    cfg = config_from_dict(arch.config_cls, STUDENT)
    with tempfile.TemporaryDirectory() as d, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        checkpoint.save(Path(d) / "student.pt", "student", cfg, arch.build(cfg).state_dict())
        return (Path(d) / "student.pt").read_bytes()


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


class Built:
    """A project built once for the whole test run (with pytest-xdist: once for every worker), in
    a folder no test may write to. Tests take copies: ``copy(dest)`` is the built project (doit sees
    it up to date, its own .cache included), ``fresh(dest)`` the same project before any build.

    ``seconds`` is how long the cold build took, ``output`` its console output (a CompletedProcess)
    and ``plan`` what ``doit plan --json`` said before it (when asked for)."""

    def __init__(self, root: Path):
        self.root = root
        info = json.loads((root / "info.json").read_text())
        self.seconds: float = info["seconds"]
        self.args: list[str] = info["args"]
        self.plan: dict | None = info["plan"]
        self.output = subprocess.CompletedProcess(["doit", *info["args"]], 0, info["stdout"], info["stderr"])
        self.project = Project(root / "project")  # read only: build in a copy
        self.template = Project(root / "template")  # read only: the project before any build

    def copy(self, dest: Path) -> Project:
        return self.project.copy(dest)

    def fresh(self, dest: Path) -> Project:
        return self.template.copy(dest)

    def artifact_digests(self) -> dict[str, str]:
        return self.project.artifact_digests()


def build_once(shared: Path, name: str, create, *args: str, plan: bool = False) -> Built:
    """The project ``create(root)`` makes, built with ``doit *args`` once below ``shared`` (a
    folder every xdist worker of the run sees); the first worker to get here builds it under a
    file lock, the others wait for it and reuse it."""
    from filelock import FileLock

    root = shared / f"built-{name}"
    shared.mkdir(parents=True, exist_ok=True)
    with FileLock(str(shared / f"built-{name}.lock")):
        if not (root / "info.json").exists():
            if root.exists():  # a build that failed half-way in another worker
                shutil.rmtree(root)
            root.mkdir()
            template = create(root / "template")
            p = template.copy(root / "project")
            planned = json.loads(p.doit("plan", "--json").stdout) if plan else None
            started = time.monotonic()
            r = p.doit(*args)
            info = {"seconds": time.monotonic() - started, "args": list(args), "plan": planned,
                    "stdout": r.stdout, "stderr": r.stderr}
            (root / "info.json.tmp").write_text(json.dumps(info))
            (root / "info.json.tmp").rename(root / "info.json")
    return Built(root)
