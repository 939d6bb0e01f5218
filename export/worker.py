"""Heavy steps run in a worker process, apart from the planner.

The planner (doit) never imports torch or coremltools. A worker process
(``python -m export.worker``), started on the first heavy step and reused for
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
import traceback
from pathlib import Path

from .errors import ExportError


class StepFailed(Exception):
    """A step failed; the message says why and where its log is."""


class _Worker:
    def __init__(self, log: Path):
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "export.worker", str(req_r), str(rep_w), str(os.getpid())],
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
    """Run ``export.steps.<step>(**kwargs)`` in the worker; its output goes to ``log``.

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


def _execute(step: str, kwargs: dict, log: str):
    from . import steps

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        _reset_peak()
        getattr(steps, step)(**kwargs)
        return {"peak_mb": _peak_mb()}
    except ExportError:
        raise
    except Exception as e:
        traceback.print_exc()
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise StepFailed(f"{type(e).__name__}: {first} (log: {log})") from None
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _reset_peak() -> None:
    """Start a new peak-memory measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _die_with_parent(parent: int) -> None:
    """Linux: be killed when the process that started us dies (a SIGKILLed doit lane or Dask worker),
    rather than finish a step nobody waits for."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


def main(req_fd: int, rep_fd: int, parent: int | None = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    requests, replies = os.fdopen(req_fd, "rb"), os.fdopen(rep_fd, "wb")
    while True:
        try:
            step, kwargs, log = pickle.load(requests)
        except EOFError:
            return  # the planner is gone or done
        try:
            reply = ("ok", _execute(step, kwargs, log))
        except (ExportError, StepFailed) as e:
            reply = ("err", e)
        except BaseException as e:  # KeyboardInterrupt and the like: report, then stop
            pickle.dump(("err", StepFailed(f"{type(e).__name__} (log: {log})")), replies)
            replies.flush()
            raise
        pickle.dump(reply, replies)
        replies.flush()


if __name__ == "__main__":
    # Run the importable module's main: a StepFailed raised here must pickle as export.worker.StepFailed,
    # which the planner can unpickle (it has no __main__.StepFailed).
    from export.worker import main as _main

    _main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
