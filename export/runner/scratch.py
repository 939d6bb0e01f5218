"""Scratch folders of running steps: made locked, removed after the step, swept when their process was killed.

A scratch folder (``model-export-step-<name>-*`` in the TMPDIR) holds a marker file (``SCRATCH_MARK``) and is
locked (``flock``) for as long as its step runs. A SIGKILLed process cannot remove its own, so each step first
removes the unlocked folders it finds that carry the marker (``sweep_scratch``): never a folder without it.

Two users: a Dask worker restores a step's inputs into one (export/runner/cluster.py), and every worker process
runs each step with the TMPDIR pointed at one of its own (``step_tempdir``), so that what the libraries leave in
the temporary directory goes with the step: coremltools keeps each converted program in a ``tmp*.mlpackage``
until the process exits (943 MB per conversion of a 0.5B model), and a worker process runs many steps.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import uuid

SCRATCH_PREFIX = "model-export-step-"
SCRATCH_MARK = ".model-export-scratch"  # in every scratch folder: the sweep removes no folder without it


def make_scratch(name: str) -> tuple[str, int]:
    """A scratch folder for one step, and the descriptor that holds its lock while the step runs (close it after
    removing the folder). Made under another name and renamed once locked, so that no sweep sees it unlocked."""
    staging = tempfile.mkdtemp(prefix=".model-export-new-")
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    with open(os.path.join(staging, SCRATCH_MARK), "w") as f:
        f.write(f"{os.getpid()}\n")
    final = os.path.join(os.path.dirname(staging), f"{SCRATCH_PREFIX}{name.replace(':', '__')}-{uuid.uuid4().hex[:8]}")
    os.rename(staging, final)  # the lock belongs to the folder, not to its name
    return final, fd


def sweep_scratch(base: str | None = None) -> list[str]:
    """Remove the scratch folders under ``base`` (the TMPDIR) whose step is no longer running: the process that
    made one was killed before it could remove it (nothing else releases its lock). Returns the removed paths."""
    base = base or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(SCRATCH_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        if not os.path.isfile(os.path.join(entry.path, SCRATCH_MARK)):
            continue  # not one of ours
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its step is running
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def step_tempdir(name: str):
    """Run the body with the TMPDIR (``tempfile`` and child processes) in a locked scratch folder of its own,
    removed afterwards with everything written there; the path. Sweeps killed processes' folders first."""
    sweep_scratch()
    path, lock = make_scratch(f"tmp-{name}")
    saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = path
    try:
        yield path
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(path, ignore_errors=True)
        os.close(lock)
