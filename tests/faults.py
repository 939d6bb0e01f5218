"""Shared helpers of the fault-injection tests: a tiny real project, snapshots of what
a fault must never lose (the artifacts and the cache), and output checks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from scenario import Project, project_toml, student_toml, write_student_checkpoint

# One student, one T per mode: eight steps (2 exports, 2 conversions, 2 verifications, 1 bundle and its
# verification), about 40 s cold.
TINY_TOML = student_toml("tiny")
TINY_SETS = {"tiny": {"prefill": [16], "decode": [16]}}
STEPS = {"export_pytorch:student.prefill.T16", "export_pytorch:student.decode.T16",
         "convert_coreml:student.prefill.T16", "convert_coreml:student.decode.T16", "bundle_coreml:student",
         "verify_coreml:student.prefill.T16", "verify_coreml:student.decode.T16", "verify_coreml:student"}


def create_tiny(root: Path) -> Project:
    """A tiny unbuilt project (the checkpoint written, nothing built)."""
    root.mkdir(parents=True)
    import shutil

    from scenario import REPO

    shutil.copy(REPO / "dodo.py", root / "dodo.py")
    shutil.copytree(REPO / "export", root / "export", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "pyproject.toml").write_text(project_toml(TINY_TOML, name="faults"))
    (root / "shape_sets.json").write_text(json.dumps(TINY_SETS, indent=2))
    (root / "checkpoints").mkdir()
    write_student_checkpoint(root / "checkpoints" / "student.pt")
    return Project(root)


def file_digests(top: Path, *, skip=()) -> dict[str, str]:
    from export.digest import file_digest

    out = {}
    for p in sorted(top.rglob("*")):
        rel = p.relative_to(top).as_posix()
        if p.is_file() and not p.is_symlink() and not any(rel.startswith(s) for s in skip):
            out[rel] = file_digest(p)
    return out


def snapshot(p: Project) -> dict:
    """What a fault must leave alone: every model artifact and every cache entry and blob."""
    cache = p.root / ".cache"
    return {"artifacts": p.artifact_digests(),
            "cache": file_digests(cache, skip=("tmp/", "lock")) if cache.exists() else {}}


def no_traceback(r: subprocess.CompletedProcess) -> None:
    both = (r.stdout or "") + (r.stderr or "")
    assert "Traceback" not in both, f"a traceback reached the user:\n{both[-4000:]}"


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [ln.strip() for ln in ((r.stdout or "") + "\n" + (r.stderr or "")).splitlines() if ln.strip().startswith("error:")]


def popen_doit(p: Project, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``python -m doit`` in its own process group (so the test can kill the whole group)."""
    return subprocess.Popen([sys.executable, "-m", "doit", *args], cwd=p.root, env=p.env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
