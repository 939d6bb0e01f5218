"""Heavy steps run in a worker process, apart from the planner.

The planner (doit) never imports torch or coremltools. A worker process
(``python -m export.runner.worker_main``), started on the first heavy step and reused for
every later one, imports them once and keeps what it loaded (checkpoints)
between steps. A crash or an out-of-memory kill of the worker fails only the
step it was running, with that step's log; the next step gets a fresh worker.

Requests and replies are pickles over two pipes of their own; the worker's
stdout and stderr go to the running step's log. The worker exits when its
request pipe closes, and on Linux dies with the process that started it.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path



class StepFailed(Exception):
    """A step failed; the message says why and where its log is."""


class _Worker:
    def __init__(self, log: Path):
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "export.runner.worker_main", str(req_r), str(rep_w), str(os.getpid())],
                pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            )
        os.close(req_r)
        os.close(rep_w)
        self.requests = os.fdopen(req_w, "wb")
        self.replies = os.fdopen(rep_r, "rb")
        self.pid = os.getpid()

    def call(self, message):
        pickle.dump(message, self.requests)
        self.requests.flush()
        return pickle.load(self.replies)

    def close(self):
        for f in (self.requests, self.replies):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_worker: _Worker | None = None


def run(step: str, kwargs: dict, log: Path) -> dict:
    """Run step ``step`` (its module's ``run(**kwargs)``, export/stepdefs.py) in the worker; its output goes to ``log``.

    Returns ``{"peak_mb": ...}``: the worker's peak resident memory during the step."""
    global _worker
    log.parent.mkdir(parents=True, exist_ok=True)
    if _worker is None or _worker.pid != os.getpid() or _worker.proc.poll() is not None:
        _worker = _Worker(log.with_name("worker.log"))  # a forked doit runner starts its own
    try:
        status, value = _worker.call((step, kwargs, str(log)))
    except (EOFError, BrokenPipeError, pickle.UnpicklingError, OSError):
        code = _worker.proc.wait()
        _worker = None
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise StepFailed(f"the worker died during the step ({how}; out of memory?); log: {log}") from None
    if status == "ok":
        return value
    raise value


def run_fresh(step: str, kwargs: dict, log: Path) -> dict:
    """Like ``run``, in a new worker process of its own that exits afterwards (a Dask worker's steps)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    w = _Worker(log.with_name(log.name + ".start"))
    try:
        status, value = w.call((step, kwargs, str(log)))
    except (EOFError, BrokenPipeError, pickle.UnpicklingError, OSError):
        code = w.proc.wait()
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise StepFailed(f"the step's process died ({how}; out of memory?); log: {log}") from None
    finally:
        w.close()
    if status == "ok":
        return value
    raise value
