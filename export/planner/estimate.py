"""How long steps will take, from the history of builds (export/history.py).

A task's estimate, in order:

1. the same task (step and leaf) with the same outcome (built, or restored) in the history: the
   median of its last ``RECENT`` seconds;
2. else the same step, scaled by the bytes it reads: the step's seconds per input byte over the
   history, times this task's input bytes (when they are known: its inputs exist already);
3. else the median seconds of that step's tasks;
4. else nothing: no guess (``None``), and whoever shows the estimate says there is no history.

The build's own overhead (loading, checking, the summary) is the median of the history's builds'
wall seconds beyond their tasks' seconds (builds of one lane only). No torch, no config.
"""
from __future__ import annotations

import statistics

RECENT = 5


def step_of(task: str) -> str:
    return task.split(":", 1)[0]


class Estimates:
    def __init__(self, entries: list[dict]):
        """``entries``: the history's builds that did something, oldest first."""
        self.builds = len(entries)
        self.by_task: dict[tuple[str, str], list[float]] = {}
        self.by_step: dict[tuple[str, str], list[float]] = {}
        self.rate: dict[tuple[str, str], list[float]] = {}  # (seconds, bytes) summed per step and outcome
        overheads = []
        for e in entries:
            total = 0.0
            for name, r in (e.get("tasks") or {}).items():
                status, secs = r.get("status"), r.get("seconds")
                if status not in ("built", "restored") or secs is None:
                    continue
                total += secs
                self.by_task.setdefault((name, status), []).append(secs)
                self.by_step.setdefault((step_of(name), status), []).append(secs)
                if r.get("input_bytes"):
                    acc = self.rate.setdefault((step_of(name), status), [0.0, 0])
                    acc[0] += secs
                    acc[1] += r["input_bytes"]
            if e.get("seconds") is not None and (e.get("lanes") or 1) <= 1 and total:
                overheads.append(max(0.0, e["seconds"] - total))
        self.overhead = statistics.median(overheads[-RECENT:]) if overheads else 0.0

    def task(self, name: str, outcome: str = "built", input_bytes: int | None = None) -> tuple[float | None, str]:
        """(seconds, basis) for ``name`` ending as ``outcome`` (built or restored); (None, why) without history."""
        own = self.by_task.get((name, outcome))
        if own:
            return statistics.median(own[-RECENT:]), "same task"
        step = step_of(name)
        rate = self.rate.get((step, outcome))
        if input_bytes and rate and rate[1]:
            return rate[0] / rate[1] * input_bytes, "same step, scaled by input size"
        same = self.by_step.get((step, outcome))
        if same:
            return statistics.median(same), "same step"
        return None, "no history"


def fmt_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        m, s = divmod(int(round(seconds)), 60)
        return f"{m} min {s:02d} s"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h} h {rem // 60:02d} min"
