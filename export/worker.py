"""Heavy steps run in a worker process, apart from the planner.

The planner (doit) never imports torch or coremltools. A worker process, started
on the first heavy step and reused for every later one, imports them once and
keeps what it loaded (checkpoints) between steps. A crash or an out-of-memory
kill of the worker fails only the step it was running, with that step's log;
the next step gets a fresh worker.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from .errors import ExportError

_pool: ProcessPoolExecutor | None = None
_pool_pid: int | None = None


class StepFailed(Exception):
    """A step failed; the message says why and where its log is."""


def _get_pool() -> ProcessPoolExecutor:
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():  # a forked doit runner starts its own
        _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        _pool_pid = os.getpid()
    return _pool


def _shutdown() -> None:
    if _pool is not None and _pool_pid == os.getpid():
        _pool.shutdown(wait=True, cancel_futures=True)


atexit.register(_shutdown)


def run(step: str, kwargs: dict, log: Path) -> object:
    """Run ``export.steps.<step>(**kwargs)`` in the worker; its output goes to ``log``."""
    global _pool
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _get_pool().submit(_execute, step, kwargs, str(log)).result()
    except BrokenProcessPool:
        _pool = None
        raise StepFailed(f"the worker died during the step (killed, or out of memory); log: {log}") from None


def _execute(step: str, kwargs: dict, log: str):  # runs in the worker
    from . import steps

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        return getattr(steps, step)(**kwargs)
    except ExportError:
        raise
    except Exception as e:
        traceback.print_exc()
        raise StepFailed(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''} (log: {log})") from None
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
