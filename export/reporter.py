"""doit's console output, plus a record of what each task did.

After every run ``<artifacts>/last_build.json`` lists each task with its status
(``built``, ``restored``, ``up-to-date``, ``failed``, ``not-run`` when a
prerequisite failed) and seconds: what the
scenario tests assert on, and what ``plan`` is later compared with.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from doit.exceptions import UnmetDependency
from doit.reporter import ConsoleReporter

from . import atomic


# What a task's values add to its record: output digests and sizes, the step's
# own seconds and peak memory, the action key, and the nightly's verdict.
KEPT = ("outputs", "sizes", "peak_mb", "action_key", "reproducible", "cached")


class BuildReporter(ConsoleReporter):
    desc = "console output, and a JSON record of the run"
    record_path: Path | None = None  # set by the task generators

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.records: dict[str, dict] = {}
        self._started: dict[str, float] = {}

    def _leaf(self, task) -> bool:
        return bool(task.actions) and not task.name.startswith("_")

    def execute_task(self, task):
        super().execute_task(task)
        self._started[task.name] = time.monotonic()

    def skip_uptodate(self, task):
        super().skip_uptodate(task)
        if self._leaf(task):
            self.records[task.name] = {"status": "up-to-date"}

    def add_success(self, task):
        super().add_success(task)
        if self._leaf(task):
            values = task.values or {}
            status = "restored" if values.get("restored") else "built"
            record = {"status": status, "seconds": self._seconds(task)}
            record.update({k: values[k] for k in KEPT if k in values})
            self.records[task.name] = record

    def add_failure(self, task, fail):
        super().add_failure(task, fail)
        if not self._leaf(task):
            return
        if isinstance(fail, UnmetDependency):  # not run: something it needs failed
            self.records[task.name] = {"status": "not-run", "error": "a prerequisite failed"}
        else:
            self.records[task.name] = {"status": "failed", "seconds": self._seconds(task), "error": fail.get_msg().strip()[-2000:]}

    def _seconds(self, task) -> float:
        return round(time.monotonic() - self._started.get(task.name, time.monotonic()), 3)

    def complete_run(self):
        super().complete_run()
        if self.record_path is not None:
            try:
                atomic.write_text(self.record_path, json.dumps({"tasks": self.records}, indent=2, sort_keys=True) + "\n")
            except Exception as e:  # the record is a convenience; never fail a build over it
                self.write(f"warning: could not write {self.record_path}: {e}\n")
