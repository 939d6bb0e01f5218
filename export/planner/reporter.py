"""doit's console output, plus a record of what each task did.

Progress a person can follow: each task's start (``[ 3/15] start convert_coreml:...``) and end,
with its status (``built``, ``restored``, ``up to date``, ``failed``), seconds and peak memory, and a
summary table at the end. On a terminal a live line shows what is running and for how long; when
stdout is not a terminal (CI logs) there are no carriage returns, only whole lines, plus a line a
minute for a task that runs long.

After every run ``<artifacts>/last_build.json`` lists each task with its status
(``built``, ``restored``, ``up-to-date``, ``failed``, ``not-run`` when a
prerequisite failed) and seconds: what the scenario tests assert on, and what
``doit plan`` is compared with. ``<artifacts>/report.json`` and ``report.html``
(export/report.py) add sizes, cache hits and each model's contract.
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

# What a task's values add to its record: output digests and sizes, the step's
# own seconds and peak memory, the action key, the nightly's verdict, and the Dask worker that ran it.
KEPT = ("outputs", "sizes", "peak_mb", "reserved_mb", "started", "ended", "action_key", "reproducible", "cached", "quality",
        "worker")
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


class BuildReporter(ConsoleReporter):
    desc = "progress with status, seconds and memory per task, a summary, and JSON + HTML records"
    record_path: Path | None = None  # where the build's record goes: see ``writing_to``

    @classmethod
    def writing_to(cls, record_path: Path) -> type:
        """This reporter, writing its record to ``record_path`` (doit makes the reporter from a class)."""
        return type(cls.__name__, (cls,), {"record_path": Path(record_path)})

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.records: dict[str, dict] = {}
        self._started: dict[str, float] = {}
        self._t0 = time.monotonic()
        self._wall0 = time.strftime("%Y-%m-%dT%H:%M:%S%z")
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
                if self._live:
                    self._clear_status()
                    if running:
                        shown = ", ".join(f"{n} {now - t:.0f}s" for n, t in running[:2])
                        more = f" +{len(running) - 2}" if len(running) > 2 else ""
                        self.outstream.write(f"  running {shown}{more} [{self._done}/{self._total}, {now - self._t0:.0f}s]")
                        self._status_shown = True
                    self.outstream.flush()
                else:
                    for n, t in running:
                        if now - self._beat.get(n, t) >= HEARTBEAT:
                            self._beat[n] = now
                            self.outstream.write(f"{self._counter()}  ... {n} still running ({now - t:.0f}s)\n")
                            self.outstream.flush()

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
        self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._ticker.start()

    def execute_task(self, task):
        self._started[task.name] = time.monotonic()
        if self._leaf(task):
            self.write(f"{self._counter()} start       {task.name}\n")

    def skip_uptodate(self, task):
        if self._leaf(task):
            self._done += 1
            self.records[task.name] = {"status": "up-to-date"}
            self.write(f"{self._counter()} up to date  {task.name}\n")
        elif not task.name.startswith("_"):
            pass  # groups: nothing to say

    def add_success(self, task):
        super().add_success(task)
        if self._leaf(task):
            self._done += 1
            values = task.values or {}
            status = "restored" if values.get("restored") else "built"
            record = {"status": status, "seconds": self._seconds(task)}
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
            self.records[task.name] = {"status": "failed", "seconds": self._seconds(task), "error": fail.get_msg().strip()[-2000:]}
            self.write(f"{self._counter()} FAILED      {task.name}  {self.records[task.name]['seconds']:.1f}s\n")
        super().add_failure(task, fail)

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
        if self.records:
            self.write(self.summary(seconds))
        if self.record_path is None:
            return
        record = {"tasks": self.records, "started": self._wall0, "seconds": seconds}
        try:
            atomic.write_text(self.record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
        except Exception as e:  # the record is a convenience; never fail a build over it
            self.write(f"warning: could not write {self.record_path}: {e}\n")
        try:
            from . import report

            report.write(self.record_path.parent, report.build_report(self.record_path.parent, record))
        except Exception as e:
            self.write(f"warning: could not write the build report: {e}\n")

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
        report = f"; report: {self.record_path.parent / 'report.html'}" if self.record_path is not None else ""
        lines.append(f"{len(self.records)} tasks: {said} in {seconds:.1f}s{report}\n")
        return "\n".join(lines)


def _size(record: dict):
    sizes = record.get("sizes")
    return sum(sizes.values()) if sizes else None
