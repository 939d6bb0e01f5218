"""The worker process itself (``python -m export.runner.worker_main``): runs the steps it is sent.

It imports torch and coremltools once (through the step modules, export/runner/steps/) and keeps what
it loaded between steps (export/runner/checkpoints.py, programs.py). The planner's side of the pipes is export/runner/worker.py.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
import traceback

from ..errors import ExportError
from ..stepdefs import STEPS
from . import checkpoints
from .scratch import step_tempdir
from .worker import StepFailed


def _execute(step: str, kwargs: dict, log: str):
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        if not STEPS[step].uses_held:  # what earlier steps left held would only add to this step's peak
            checkpoints.forget()
        _reset_peak()
        with step_tempdir(step):  # what the libraries leave in the TMPDIR goes with the step (export/runner/scratch.py)
            importlib.import_module(STEPS[step].module).run(**kwargs)
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


class _NoTransformersForCoremltools:
    """coremltools 9.0 tries ``import transformers`` when it is imported (its ``coremltools._deps`` module,
    for a flag only coremltools' own tests read): with transformers installed (the hf extra) that costs every
    worker about 1.5 s of its start, for every step of a Dask worker (export/runner/worker.py run_fresh). This
    finder answers that one import (made by ``coremltools._deps`` itself) with ModuleNotFoundError, which
    coremltools takes as "not installed"; every other import of transformers (export/models/hf_causal_lm.py)
    is untouched."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "transformers":
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__") == "coremltools._deps":
                raise ModuleNotFoundError("transformers: not loaded for coremltools' optional probe", name=name)
            frame = frame.f_back
        return None


def main(req_fd: int, rep_fd: int, parent: int | None = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    sys.meta_path.insert(0, _NoTransformersForCoremltools)
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
    # Run the importable module's main, so that what it pickles names export.runner.worker_main, which the
    # planner can unpickle (it has no __main__).
    from export.runner.worker_main import main as _main

    _main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
