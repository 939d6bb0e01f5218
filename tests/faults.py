"""Shared helpers of the fault-injection tests: a tiny real project, snapshots of what
a fault must never lose (the artifacts and the cache), and output checks."""
from __future__ import annotations

import fnmatch
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

from inotify_simple import INotify, flags

from scenario import Project, project_toml, student_toml, write_student_checkpoint

# One student, one T per mode: eight steps (2 exports, 2 conversions, 2 verifications, 1 bundle and its
# verification), about 40 s cold.
TINY_TOML = student_toml("tiny")
TINY_SETS = {"tiny": {"prefill": [16], "decode": [16]}}
STEPS = {"export_pytorch:student.prefill.T16", "export_pytorch:student.decode.T16",
         "convert_coreml:student.prefill.T16", "convert_coreml:student.decode.T16", "bundle_coreml:student",
         "verify_coreml:student.prefill.T16", "verify_coreml:student.decode.T16", "verify_coreml:student"}
# The kill, concurrency and resource trials: prefill only, three steps (export, convert, bundle),
# so that a trial stays short.
KILL_TOML = TINY_TOML.replace('shape_set = "tiny"', 'shape_set = "tiny"\nmodes = ["prefill"]')
KILL_STEPS = {s for s in STEPS if "decode" not in s}


def create_kill(root: Path) -> Project:
    """``create_tiny`` with prefill only (KILL_TOML)."""
    p = create_tiny(root)
    (p.root / "pyproject.toml").write_text(project_toml(KILL_TOML, name="faults"))
    return p


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


def _as_from_a_terminal() -> None:
    """SIGINT as a terminal's foreground job has it: a test run started in the background (``cmd &`` in a
    non-interactive shell) passes SIGINT on ignored, and Ctrl-C would then be lost on the build."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen_doit(p: Project, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``python -m doit`` in its own process group (so the test can kill the whole group)."""
    return subprocess.Popen([sys.executable, "-m", "doit", *args], cwd=p.root, env=p.env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_as_from_a_terminal)


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


# --- waiting for a moment of a running build: events, not polls ---------------------------
# A temporary of the build can live a millisecond: a poll loop misses it (and on two cores the
# loop's own work slows the build it watches). inotify reports every creation and rename into a
# watched folder, however short-lived the file; the process's exit is a pidfd that select() wakes on.

_CREATED = flags.CREATE | flags.MOVED_TO


def wait_for_delay(proc: subprocess.Popen, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``proc`` ends first; True if it still runs at the end."""
    fd = os.pidfd_open(proc.pid)
    try:
        ended, _, _ = select.select([fd], [], [], max(seconds, 0))
    finally:
        os.close(fd)
    return not ended and proc.poll() is None


def wait_for_path(proc: subprocess.Popen, root: Path, pattern: str, timeout: float) -> bool:
    """Wait until a path matching ``pattern`` (relative to ``root``; ``*`` globs within one
    part, as Path.glob) is created or renamed into place while ``proc`` runs.

    True as soon as one appears (or already exists), False if ``proc`` ends or ``timeout``
    passes first. Every folder that can lead to a match is watched, those that appear later
    too; a new folder is watched before it is listed, so nothing created in it is missed."""
    parts = PurePosixPath(pattern).parts
    root = Path(root)
    with INotify() as ino:
        watched: dict[int, tuple[str, ...]] = {}

        def leads(rel: tuple[str, ...]) -> bool:
            return len(rel) <= len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(rel, parts))

        def watch(rel: tuple[str, ...]) -> bool:
            """Watch the folder ``rel`` (it leads to a match); True if a match is in it already."""
            try:
                watched[ino.add_watch(root.joinpath(*rel), _CREATED | flags.ONLYDIR)] = rel
                names = os.listdir(root.joinpath(*rel))
            except (FileNotFoundError, NotADirectoryError):
                return False
            return any(seen(rel + (name,)) for name in names)

        def seen(rel: tuple[str, ...]) -> bool:
            if not leads(rel):
                return False
            if len(rel) == len(parts):
                return True
            return watch(rel)  # a folder on the way: watch it (and look inside)

        if watch(()):
            return True
        fd = os.pidfd_open(proc.pid)
        try:
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([ino, fd], [], [], max(left, 0))
                for event in ino.read(timeout=0) if ino in ready else ():
                    if event.wd in watched and event.mask & _CREATED and seen(watched[event.wd] + (event.name,)):
                        return True
                if fd in ready or left <= 0:
                    return False
        finally:
            os.close(fd)
