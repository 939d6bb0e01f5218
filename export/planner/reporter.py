"""doit's console output, plus a record of what each task did.

Progress a person can follow: each task's start (``[ 3/15] start convert_coreml:...``) and end,
with its status (``built``, ``restored``, ``up to date``, ``failed``), seconds and peak memory, and a
summary table at the end. On a terminal a live line shows what is running and for how long; when
stdout is not a terminal (CI logs) there are no carriage returns, only whole lines, plus a line a
minute for a task that runs long.

After every run ``<artifacts>/last_build.json`` lists each task with its status
(``built``, ``restored``, ``up-to-date``, ``failed``, ``not-run`` when a
prerequisite failed) and seconds: what the scenario tests assert on, and what
``doit plan`` is compared with. A build that did something also writes ``<artifacts>/report.json``
and ``report.html`` (export/planner/report.py: sizes, cache hits, each model's contract, the timeline, the
trends) and ``<artifacts>/trace.json`` (export/planner/timeline.py), and adds itself to the history
(export/planner/history.py). A no-op prints one line (``29 tasks up to date (0.4 s)``; ``-v 2`` lists every
task), adds one line to the history and leaves the report of the last build that did something.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from doit.exceptions import UnmetDependency
from doit.reporter import ConsoleReporter

from .. import atomic
from ..checkpoint_files import input_files
from .noop import process_started as _process_started

# What a task's values add to its record: output digests and sizes, the step's
# own seconds and peak memory, the action key, the nightly's verdict, the Dask worker that ran it, and
# verify_coreml's verdict (errors per output, export/coreml/verify.py).
KEPT = ("outputs", "sizes", "peak_mb", "reserved_mb", "started", "ended", "action_key", "reproducible", "cached",
        "worker", "uploaded", "verdict", "input_bytes", "lane", "span", "phases", "held", "budget_mb", "quality",
        "lost_workers")
HEARTBEAT = 60.0  # seconds between "still running" lines when not on a terminal


def _isatty(stream) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def _fmt_mb(mb) -> str:
    return "" if mb is None else f"{mb:,.0f} MB"


def _fmt_bytes(n) -> str:
    if n is None:
        return ""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def stamp_files(config) -> list[Path]:
    """Files the fast no-op stamps besides the tasks' own: the config files, and the checkpoint files of parted
    models (export/parts.py: their parts' keys cover their tensors, not the files, so a changed checkpoint must
    load the graph again)."""
    out = [config.root / "pyproject.toml", config.shape_sets_file]
    for m in config.models:
        if m.parts is not None:
            out += input_files(config.root / m.checkpoint)
    return out


class BuildReporter(ConsoleReporter):
    desc = "progress with status, seconds and memory per task, a summary, and JSON + HTML records"
    record_path: Path | None = None  # where the build's record goes: see ``writing_to``
    state_path: Path | None = None   # the state folder (.export): the history
    verbosity: int = 1               # doit's -v (set by the run command): 2 lists the up-to-date tasks too
    lanes: int = 1                   # doit's -n

    config = None                    # the project's export.config.Config: where the no-op stamp looks

    @classmethod
    def writing_to(cls, record_path: Path, state_path: Path | None = None, config=None) -> type:
        """This reporter, writing its record to ``record_path`` and the history to ``state_path``
        (doit makes the reporter from a class)."""
        return type(cls.__name__, (cls,), {"record_path": Path(record_path), "config": config,
                                           "state_path": None if state_path is None else Path(state_path)})

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.records: dict[str, dict] = {}
        self._started: dict[str, float] = {}
        self._t0 = time.monotonic()
        self._wall_t0 = time.time()
        self._wall0 = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._wall_started: dict[str, float] = {}
        self._tasks = {}
        self._left = None  # the time-left estimator, made by the ticker once something runs
        self._total = 0
        self._done = 0
        self._live = _isatty(outstream)
        self._lock = threading.RLock()
        self._status_shown = False
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._beat: dict[str, float] = {}

    # --- output ----------------------------------------------------------------------

    def write(self, text):
        with self._lock:
            self._clear_status()
            self.outstream.write(text)
            self.outstream.flush()

    def _clear_status(self):
        if self._status_shown:
            self.outstream.write("\r\033[K")
            self._status_shown = False

    def _tick(self):
        """Every second: on a terminal, rewrite the live line; elsewhere, a line a minute per long task."""
        while not self._stop.wait(1.0):
            with self._lock:
                now = time.monotonic()
                running = sorted(self._started.items(), key=lambda kv: kv[1])
                running = [(n, t) for n, t in running if n not in self.records]
                left = self._time_left(running, now)
                if self._live:
                    self._clear_status()
                    if running:
                        shown = ", ".join(f"{n} {now - t:.0f}s" for n, t in running[:2])
                        more = f" +{len(running) - 2}" if len(running) > 2 else ""
                        self.outstream.write(f"  running {shown}{more} [{self._done}/{self._total}, {now - self._t0:.0f}s{left}]")
                        self._status_shown = True
                    self.outstream.flush()
                else:
                    for n, t in running:
                        if now - self._beat.get(n, t) >= HEARTBEAT:
                            self._beat[n] = now
                            self.outstream.write(f"{self._counter()}  ... {n} still running ({now - t:.0f}s{left})\n")
                            self.outstream.flush()

    def _time_left(self, running, now) -> str:
        if not running or self._left is False:
            return ""
        try:
            if self._left is None:
                self._left = _TimeLeft(self)
            return self._left.say(running, now)
        except Exception:  # an estimate is a convenience: never disturb the build over it
            self._left = False
            return ""

    def _counter(self) -> str:
        w = len(str(self._total or 0))
        return f"[{self._done:>{w}}/{self._total}]"

    # --- doit's reporter interface ----------------------------------------------------

    def _leaf(self, task) -> bool:
        return bool(task.actions) and not task.name.startswith("_")

    def initialize(self, tasks, selected_tasks):
        super().initialize(tasks, selected_tasks)
        needed, todo = set(), list(selected_tasks or [])
        while todo:
            n = todo.pop()
            if n in needed or n not in tasks:
                continue
            needed.add(n)
            todo.extend(tasks[n].task_dep + tasks[n].setup_tasks)
        self._total = sum(1 for n in needed if self._leaf(tasks[n]))
        self._tasks, self._needed = tasks, needed
        self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._ticker.start()

    def execute_task(self, task):
        self._wall_started[task.name] = time.time()
        if self._leaf(task):  # a group (no action) has nothing running: never "still running"
            self._started[task.name] = time.monotonic()
            self.write(f"{self._counter()} start       {task.name}\n")

    def skip_uptodate(self, task):
        if self._leaf(task):
            self._done += 1
            self.records[task.name] = {"status": "up-to-date"}
            if self.verbosity >= 2:
                self.write(f"{self._counter()} up to date  {task.name}\n")
        elif not task.name.startswith("_"):
            pass  # groups: nothing to say

    def add_success(self, task):
        super().add_success(task)
        if self._leaf(task):
            self._done += 1
            values = task.values or {}
            status = "restored" if values.get("restored") else "built"
            record = {"status": status, "seconds": self._seconds(task), "at": self._at(task)}
            record.update({k: values[k] for k in KEPT if k in values})
            self.records[task.name] = record
            extra = "  ".join(x for x in (_fmt_mb(values.get("peak_mb")), _fmt_bytes(_size(record))) if x)
            self.write(f"{self._counter()} {status:<11} {task.name}  {record['seconds']:.1f}s  {extra}".rstrip() + "\n")

    def add_failure(self, task, fail):
        if not self._leaf(task):
            super().add_failure(task, fail)
            return
        self._done += 1
        if isinstance(fail, UnmetDependency):  # not run: something it needs failed
            self.records[task.name] = {"status": "not-run", "error": "a prerequisite failed"}
            self.write(f"{self._counter()} not run     {task.name}  (a prerequisite failed)\n")
        else:
            self.records[task.name] = {"status": "failed", "seconds": self._seconds(task), "at": self._at(task),
                                       "error": fail.get_msg().strip()[-2000:]}
            self.write(f"{self._counter()} FAILED      {task.name}  {self.records[task.name]['seconds']:.1f}s\n")
        super().add_failure(task, fail)

    def _at(self, task) -> list[float]:
        """[start, end] of the task as this process saw it (wall clock)."""
        now = time.time()
        return [self._wall_started.get(task.name, now), now]

    def _seconds(self, task) -> float:
        return round(time.monotonic() - self._started.get(task.name, time.monotonic()), 3)

    def complete_run(self):
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        with self._lock:
            self._clear_status()
        super().complete_run()
        seconds = round(time.monotonic() - self._t0, 1)
        did = any(r["status"] != "up-to-date" for r in self.records.values())
        if did:
            self.write(self.summary(seconds))
        elif self.records:
            born = _process_started()
            whole = time.time() - born if born is not None and born <= self._wall_t0 else seconds
            self.write(f"{len(self.records)} tasks up to date ({whole:.1f} s)\n")
            seconds = round(whole, 3)  # a no-op's figure is the whole process, as on the fast path (noop.py)
        if self.record_path is None:
            return
        record = {"tasks": self.records, "started": self._wall0, "seconds": seconds, "t0": self._wall_t0,
                  "pid": os.getpid(), "lanes": self.lanes}
        try:
            atomic.write_text(self.record_path, json.dumps(record, indent=None if len(self.records) > 200 else 2,
                                                           sort_keys=True) + "\n")
        except Exception as e:  # the record is a convenience; never fail a build over it
            self.write(f"warning: could not write {self.record_path}: {e}\n")
        if self.state_path is not None and self.records:
            try:
                from . import history

                history.append(self.state_path, record)
            except Exception as e:
                self.write(f"warning: could not add the build to {self.state_path / 'history.jsonl'}: {e}\n")
        self._stamp()
        if not did:
            return  # the report and the timeline stay those of the last build that did something
        artifacts = self.record_path.parent
        try:
            from . import timeline

            atomic.write_text(artifacts / "trace.json", timeline.to_json(timeline.trace(record)))
        except Exception as e:
            self.write(f"warning: could not write {artifacts / 'trace.json'}: {e}\n")
        try:
            from . import report

            report.write(artifacts, report.build_report(artifacts, record, state=self.state_path))
        except Exception as e:
            self.write(f"warning: could not write the build report: {e}\n")

    def _stamp(self):
        """After a build where nothing failed: the stamp of the fast no-op (export/noop.py)."""
        from ..settings import nightly

        if self.state_path is None or self.config is None or not self.records or nightly():
            return
        if any(r["status"] not in ("up-to-date", "built", "restored") for r in self.records.values()):
            return
        try:
            import sys

            from . import noop

            tasks = {}
            for n in self.records:
                task = self._tasks[n]
                outputs = self.records[n].get("outputs") or (task.values or {}).get("outputs")
                tasks[n] = _Stamped(task.actions, task.file_dep, {"outputs": outputs} if outputs else {})
            c = self.config
            noop.write(self.state_path, sys.argv, c.root, c.artifacts, stamp_files(c), tasks, self.record_path)
        except Exception as e:  # the fast path is an optimization: without a stamp the next no-op checks everything
            self.write(f"warning: could not write {self.state_path / 'noop-stamp.bin'}: {e}\n")

    def summary(self, seconds: float) -> str:
        """The table of the tasks that did something, and one line of counts."""
        did = [(n, r) for n, r in self.records.items() if r["status"] != "up-to-date"]  # in the order they ended
        lines = []
        if did:
            w = max(len(n) for n, _ in did)
            lines.append(f"\n{'task':<{w}}  {'status':<10} {'seconds':>8} {'peak':>9} {'size':>9}")
            for n, r in did:
                secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else ""
                lines.append(f"{n:<{w}}  {r['status']:<10} {secs:>8} {_fmt_mb(r.get('peak_mb')):>9} {_fmt_bytes(_size(r)):>9}")
        counts = {}
        for r in self.records.values():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        order = ("built", "restored", "up-to-date", "failed", "not-run")
        said = ", ".join(f"{counts[s]} {s.replace('-', ' ')}" for s in order if counts.get(s))
        uploaded = sum(r.get("uploaded") or 0 for r in self.records.values())
        shared = f"; {uploaded} entr{'y' if uploaded == 1 else 'ies'} to the shared store" if uploaded else ""
        report = f"; report: {self.record_path.parent / 'report.html'}" if self.record_path is not None else ""
        lines.append(f"{len(self.records)} tasks: {said} in {seconds:.1f}s{shared}{report}\n")
        return "\n".join(lines)


def _size(record: dict):
    sizes = record.get("sizes")
    return sum(sizes.values()) if sizes else None


class _Stamped:
    def __init__(self, actions, file_dep, values):
        self.actions, self.file_dep, self.values = actions, file_dep, values


class _TimeLeft:
    """The live line's "about N s left": the running steps' estimates less what they ran so far, plus
    the estimates of the steps still to come that will run: those never built here (no record in
    doit's dependency file), whose recorded outputs are gone, or that wait on a step of this build.
    A step with an unchanged record whose key changed (a config or code change) counts once it starts.
    Made in the ticker thread once something runs, so a no-op never pays for it."""

    def __init__(self, rep: BuildReporter):
        from . import history
        from .estimate import Estimates

        self.rep = rep
        self.est = Estimates(history.builds(rep.state_path)) if rep.state_path is not None else Estimates([])
        tasks = rep._tasks
        self.leaves = [n for n in getattr(rep, "_needed", ()) if n in tasks and rep._leaf(tasks[n])]
        producer = {t: n for n, task in tasks.items() for t in task.targets}
        self.down: dict[str, set[str]] = {}
        for n in self.leaves:
            for d in tasks[n].task_dep + [producer[f] for f in tasks[n].file_dep if f in producer]:
                self.down.setdefault(d, set()).add(n)
        self.likely = self._likely()

    def _likely(self) -> set[str]:
        """Leaves doit's dependency file has no record of, or whose recorded outputs are gone."""
        import sqlite3

        if self.rep.state_path is None:
            return set()
        path = self.rep.state_path / "doit.sqlite"
        root = self.rep.state_path.parent
        known: dict[str, dict] = {}
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
            try:
                for task_id, data in conn.execute("SELECT task_id, task_data FROM doit"):
                    try:
                        known[task_id] = json.loads(data)
                    except (TypeError, ValueError):
                        known[task_id] = {}
            finally:
                conn.close()
        except sqlite3.Error:
            return set(self.leaves)
        out = set()
        for n in self.leaves:
            rec = known.get(n)
            if rec is None:
                out.add(n)
                continue
            outputs = (rec.get("_values_:") or {}).get("outputs") or {}
            if any(not (root / rel).exists() for rel in outputs):
                out.add(n)
        return out

    def say(self, running: list[tuple[str, float]], now: float) -> str:
        if not self.est.builds:
            return ", no history to estimate the time left"
        rep = self.rep
        active = {n for n in list(rep._started) if n in rep._tasks and rep._leaf(rep._tasks[n])}
        todo, stack = set(), [*active, *self.likely]
        while stack:
            n = stack.pop()
            for d in self.down.get(n, ()):
                if d not in todo:
                    todo.add(d)
                    stack.append(d)
        todo |= self.likely
        left, unknown = 0.0, 0
        for n, t in running:
            secs, _ = self.est.task(n)
            if secs is None:
                unknown += 1
            else:
                left += max(0.0, secs - (now - t))
        for n in todo:
            if n in rep.records or n in rep._started:
                continue
            secs, _ = self.est.task(n)
            if secs is None:
                unknown += 1
            else:
                left += secs
        from .estimate import fmt_duration

        if unknown:
            return f", at least {fmt_duration(left)} left ({unknown} without history)"
        return f", about {fmt_duration(left)} left"
