"""Steps on a Dask cluster: doit plans, Dask workers run, the shared cache carries the bytes.

Selected by ``[tool.export.dask] scheduler``, ``$MODEL_EXPORT_DASK_SCHEDULER`` or
``doit --dask ADDRESS`` (``doit nightly --dask ADDRESS``); without one, nothing here runs.

doit stays the planner and the only writer of its dependency file: a step that is
out of date and not in the cache is submitted (``submit``) from the doit lane
that runs it, with the memory it needs declared as the worker resource
``MEMORY_MB``, so a worker started with ``--resources MEMORY_MB=8000`` never runs
steps that need more than 8000 MB together. The planner first publishes the
step's input files to the shared cache (an entry of their own, ``in-<digest>``);
the worker (``execute``) restores them into a scratch folder, runs the step in a
fresh process (``export.runner.worker.run_fresh``: a crash or an out-of-memory kill
fails the step with its log, the worker lives on), publishes the outputs under
the step's action key, and returns their digests and the log. The planner
restores the outputs from the cache and checks every digest. A Dask worker that
dies while it runs a step is replaced by the scheduler and the step runs again
elsewhere (Dask's ``allowed-failures``); after that it is reported. The build's
output says both, one line each (``Watch``): the worker lost with the step, and
the step starting again on another worker. Workers are named by their ``--name``
(``dask worker --name``), in the output and in ``last_build.json``.

A worker's scratch folder (``model-export-step-<task>-*`` in its TMPDIR) is
locked (``flock``) while its step runs; a SIGKILLed worker cannot remove its
own, so every step first removes the unlocked ones it finds (``sweep_scratch``,
export/runner/scratch.py).

Nothing here imports torch or coremltools; ``distributed`` is imported only when
a scheduler is configured.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from .. import settings
from ..errors import ExportError
from .scratch import SCRATCH_MARK, SCRATCH_PREFIX, make_scratch, sweep_scratch  # noqa: F401  (the tests' names too)

RESOURCE = "MEMORY_MB"
ROOT = "@root/"  # a project path in a request: relative to the planner's root, rebased by the worker
LOG_LIMIT = 256 * 1024  # the tail of a step's log a worker sends back
CONNECT_TIMEOUT = "30s"
EVENTS = "model-export"  # the Dask event topic a worker announces each step's start on


# --- the planner side ------------------------------------------------------------------------


def reachable(address: str) -> str | None:
    """None if a TCP connection to the scheduler opens, else why not (no Dask import, no thread:
    the doit lanes fork after this)."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:  # not a number
        port = None
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or not port:
        return f"not a scheduler address {address!r} (expected tcp://host:port)"
    try:
        with socket.create_connection((parts.hostname, port), timeout=10):
            return None
    except OSError as e:
        return e.strerror or str(e)


_client = None
_client_pid = None


def client(address: str):
    """One Dask client per doit lane (process): never shared across fork."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        from distributed import Client

        try:
            _client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise ExportError(f"cannot reach the Dask scheduler at {address}: {e}", field="tool.export.dask.scheduler") from None
        _client_pid = os.getpid()
    return _client


def capacity(c) -> dict[str, float | None]:
    """Each worker's ``MEMORY_MB`` resource (None: the worker declares none)."""
    return {addr: (w.get("resources") or {}).get(RESOURCE) for addr, w in _workers(c).items()}


def _workers(c) -> dict[str, dict]:
    return c.scheduler_info(n_workers=-1)["workers"]


class Watch:
    """What the cluster does with one submitted step, said as it happens (one line each): a worker lost while
    it held the step (the scheduler's ``remove-worker`` event), and the step starting again on another worker
    (a second start announced by ``execute`` on the ``EVENTS`` topic)."""

    def __init__(self, task: str, key: str, names: dict[str, str], say=None):
        self.task, self.key, self.names = task, key, dict(names)
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.started: list[str] = []  # the worker (name) of each start, in order
        self.lost: list[str] = []
        self._lock = threading.Lock()

    def on_start(self, msg: dict) -> None:
        with self._lock:
            self.names[msg.get("address", "")] = str(msg.get("name"))
            self.started.append(str(msg.get("name")))
            if self.lost:  # (a worker lost before the step started on it held it all the same)
                self.say(f"dask: {self.task} runs again on worker {self.started[-1]} "
                         f"(attempt {len(self.lost) + 1}, after {len(self.lost)} lost worker"
                         f"{'s' if len(self.lost) != 1 else ''})")

    def on_lost(self, address: str) -> None:
        with self._lock:
            name = self.names.get(address, address)
            self.lost.append(name)
            self.say(f"dask: worker {name} was lost while it held {self.task}; the scheduler runs the step again "
                     "on another worker")


_watches: dict[str, Watch] = {}
_subscribed: set[int] = set()


def _on_start(event) -> None:
    _, msg = event
    w = _watches.get(str(msg.get("key"))) if isinstance(msg, dict) else None
    if w is not None:
        w.on_start(msg)


def _on_cluster(event) -> None:
    _, msg = event
    if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
        return
    for key in msg.get("processing-tasks") or ():
        w = _watches.get(str(key))
        if w is not None:
            w.on_lost(str(msg.get("worker")))


def _subscribe(c) -> None:
    if id(c) not in _subscribed:
        c.subscribe_topic(EVENTS, _on_start)
        c.subscribe_topic("all", _on_cluster)
        _subscribed.add(id(c))


def check_capacity(address: str, caps: dict[str, float | None], need_mb: int, task: str) -> None:
    """Fail at once when no worker could ever run the step (rather than leave it waiting)."""
    if not caps:
        raise ExportError(f"{task}: no Dask worker is connected to the scheduler at {address}",
                          field="tool.export.dask.scheduler")
    held = [v for v in caps.values() if v is not None]
    if not held:
        raise ExportError(f"{task}: no Dask worker at {address} declares the {RESOURCE} resource; start each "
                          f"worker with --resources {RESOURCE}=<megabytes it may use>", field="tool.export.dask.scheduler")
    if need_mb > max(held):
        raise ExportError(f"{task} needs {need_mb} MB and the largest Dask worker at {address} holds "
                          f"{max(held):g} MB ({RESOURCE}); start a bigger worker", field="tool.export.dask.scheduler")


def to_request_paths(value, root: Path):
    """Replace absolute paths below ``root`` with ``@root/<relative>`` (in strings, lists and dicts)."""
    if isinstance(value, str) and os.path.isabs(value):
        rel = os.path.relpath(value, root)
        if rel == ".." or rel.startswith(".." + os.sep):
            raise ExportError(f"{value} is outside the project {root}: a step on the Dask cluster reads its inputs "
                              "from the shared cache, by their place in the project", field="tool.export.dask")
        return ROOT + Path(rel).as_posix()
    if isinstance(value, list):
        return [to_request_paths(v, root) for v in value]
    if isinstance(value, dict):
        return {k: to_request_paths(v, root) for k, v in value.items()}
    return value


def submit_and_wait(address: str, request: dict, need_mb: int, task: str) -> dict:
    """Run ``execute(request)`` on the cluster with ``need_mb`` of the workers' memory; its result."""
    from distributed import KilledWorker

    c = client(address)
    workers = _workers(c)
    check_capacity(address, {a: (w.get("resources") or {}).get(RESOURCE) for a, w in workers.items()}, need_mb, task)
    key = f"{task}-{uuid.uuid4().hex[:8]}"
    watch = _watches[key] = Watch(task, key, {a: str(w.get("name", a)) for a, w in workers.items()})
    _subscribe(c)
    future = c.submit(execute, {**request, "dask_key": key}, key=key, pure=False, resources={RESOURCE: need_mb})
    try:
        result = future.result()
    except KilledWorker as e:
        lost = f" (lost: {', '.join(watch.lost)})" if watch.lost else ""
        raise ExportError(f"{task}: the Dask workers running it died{lost} ({e}); see the workers' logs",
                          field="tool.export.dask") from None
    except Exception as e:  # anything else from the cluster: one line, the step fails
        raise ExportError(f"{task}: the Dask cluster failed the step: {type(e).__name__}: {e}",
                          field="tool.export.dask") from None
    finally:
        _watches.pop(key, None)
    if watch.lost:
        result["lost_workers"] = list(watch.lost)
    return result


# --- the worker side -------------------------------------------------------------------------


def _from_request_paths(value, scratch: str):
    if isinstance(value, str) and value.startswith(ROOT):
        return os.path.join(scratch, *value[len(ROOT):].split("/"))
    if isinstance(value, list):
        return [_from_request_paths(v, scratch) for v in value]
    if isinstance(value, dict):
        return {k: _from_request_paths(v, scratch) for k, v in value.items()}
    return value


def _worker_name() -> str:
    """The worker's ``--name`` (``dask worker --name``; a LocalCluster numbers its workers), else the host."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except Exception:
        return socket.gethostname()


def _announce(request: dict) -> None:
    """Tell the planner this step starts here (its ``Watch`` counts the starts: a second one is a retry)."""
    try:
        from distributed import get_worker

        w = get_worker()
        w.log_event(EVENTS, {"key": request.get("dask_key"), "task": request["task"], "name": str(w.name),
                             "address": w.address})  # (the scheduler sets "worker" to the address)
    except Exception:  # not on a Dask worker (a test calls execute directly): nobody to tell
        pass


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_LIMIT))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _other_build(request: dict) -> str | None:
    """Why this worker would not make the bytes the planner's keys promise (its step code or a tool
    version differs), or None."""
    from ..codekey import code_digest
    from ..toolchain import versions

    mine = code_digest(request["step"], request["arch"])
    if mine != request["code"]:
        return f"runs other {request['step']} code than the planner (code digest {mine}, planner {request['code']})"
    tools = versions(tuple(name for name in request["tools"] if name != "python"))
    differ = [f"{name} {tools.get(name)} (planner {v})" for name, v in request["tools"].items() if tools.get(name) != v]
    return f"has other tool versions than the planner: {', '.join(differ)}" if differ else None


def execute(request: dict) -> dict:
    """Run one step on this worker (called by Dask). Never raises for a failed step: returns
    ``{"error": message, "log": text}`` so that Dask retries only lost workers, not bad inputs."""
    from . import worker as step_worker
    from ..cache.store import Cache, StepOutputsMissing, finish_step

    _announce(request)
    warnings: list[str] = []
    cache = Cache(settings.local_cache(), request["remote"], log=warnings.append)
    sweep_scratch()  # a killed worker's leftovers
    scratch, lock = make_scratch(request["task"])
    root, task = request["root"], request["task"]
    log = Path(scratch) / ".step.log"

    def planner_paths(text: str) -> str:  # messages and logs name the planner's files, not the scratch copy
        return text.replace(scratch, root)

    def failed(message: str) -> dict:
        return {"error": planner_paths(message), "log": planner_paths(_tail(log)), "worker": _worker_name(),
                "warnings": warnings}

    try:
        mismatch = _other_build(request)
        if mismatch:
            return failed(f"error: {task}: this Dask worker {mismatch}; install the same model-export and "
                          "toolchain on every worker as on the machine that runs doit")
        if cache.get(request["inputs_key"], Path(scratch), request["inputs"]) is None:
            return failed(f"{task}: its inputs are not in the shared cache {request['remote']} (entry "
                          f"{request['inputs_key']}); the workers must reach the store the planner writes"
                          + (f" ({'; '.join(warnings)})" if warnings else ""))
        kwargs = _from_request_paths(request["kwargs"], scratch)
        started, wall = time.monotonic(), time.time()
        try:
            measured = step_worker.run_fresh(request["step"], kwargs, log)
        except ExportError as e:
            return failed(f"error: {e}")
        except step_worker.StepFailed as e:
            return failed(f"error: {task}: {e}")
        seconds, ended = round(time.monotonic() - started, 3), time.time()
        try:
            done = finish_step(cache, request["action_key"], Path(scratch), request["outputs"],
                               {"task": task, "seconds": seconds, "toolchain": request["tools"],
                                "worker": _worker_name()}, nightly=request["nightly"], keep_rebuilt=True,
                               roles=request.get("roles"))  # the entry names outputs by role
        except StepOutputsMissing as e:
            return failed(f"error: {task}: the step did not write {e.missing}")
        key, digests, cached, reproducible = done.key, done.digests, done.cached, done.reproducible
        if not cache.remote_has(key):
            return failed(f"error: {task}: could not publish its outputs to the shared cache {request['remote']}"
                          + (f" ({'; '.join(warnings)})" if warnings else ""))
        return {"key": key, "digests": digests, "cached": cached, "reproducible": reproducible,
                "peak_mb": measured["peak_mb"], "seconds": seconds, "started": wall, "ended": ended,
                "worker": _worker_name(), "log": planner_paths(_tail(log)), "warnings": warnings}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(lock)

