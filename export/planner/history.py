"""The history of builds, in the state folder: what ``doit plan`` estimates from and what the report's
trends show.

- ``.export/history.jsonl``: one line per build. A build that did something (built, restored or
  failed a task) writes its tasks that did something (status, seconds, peak and reserved memory,
  bytes read, lane) and its counts; a no-op writes one short line (``{"noop": true, ...}``).
  Trimmed, whenever a build that did something is added, to the last ``KEEP`` such builds (and at
  most ``KEEP`` no-op lines after the oldest of them).
- ``.export/latest_build.json``: the whole record of the latest build that did something (every
  task, its timeline): what ``artifacts/report.*`` and ``artifacts/trace.json`` show; a no-op leaves it.

Plain JSON; never fails a build (a damaged line is skipped). No torch, no config.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import atomic

HISTORY = "history.jsonl"
LATEST = "latest_build.json"
KEEP = 50
# What a task's history entry keeps of its record (the rest stays in latest_build.json).
TASK_FIELDS = ("status", "seconds", "peak_mb", "reserved_mb", "input_bytes", "lane")


def did_something(record: dict) -> bool:
    return any(r.get("status") != "up-to-date" for r in record.get("tasks", {}).values())


def entry_of(record: dict) -> dict:
    """The history line of one build record (``{"tasks": {name: rec}, "started", "seconds", ...}``)."""
    tasks = record.get("tasks", {})
    counts: dict[str, int] = {}
    for r in tasks.values():
        counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
    head = {k: record[k] for k in ("started", "seconds", "lanes") if k in record}
    if not did_something(record):
        return {**head, "noop": True, "counts": counts}
    did = {n: {k: r[k] for k in TASK_FIELDS if r.get(k) is not None}
           for n, r in tasks.items() if r.get("status") != "up-to-date"}
    return {**head, "counts": counts, "tasks": did}


def append(state: Path, record: dict) -> None:
    """Add a build to the history; a build that did something also becomes the latest record."""
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    entry = entry_of(record)
    line = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    path = state / HISTORY
    if entry.get("noop"):
        with open(path, "a") as f:  # one short line: a no-op reads none of the history
            f.write(line)
        return
    atomic.write_text(state / LATEST, json.dumps(record, sort_keys=True) + "\n")
    lines = [*_lines(path), line]
    atomic.write_text(path, "".join(trim(lines)))


def trim(lines: list[str], keep: int = KEEP) -> list[str]:
    """The last ``keep`` builds that did something, and at most ``keep`` no-op lines after the oldest kept."""
    real = [i for i, ln in enumerate(lines) if '"noop":true' not in ln]
    first = real[-keep] if len(real) >= keep else 0
    kept = lines[first:]
    noops = [i for i, ln in enumerate(kept) if '"noop":true' in ln]
    drop = set(noops[:-keep]) if len(noops) > keep else set()
    return [ln for i, ln in enumerate(kept) if i not in drop]


def _lines(path: Path) -> list[str]:
    try:
        with open(path) as f:
            return [ln if ln.endswith("\n") else ln + "\n" for ln in f if ln.strip()]
    except OSError:
        return []


def read(state: Path) -> list[dict]:
    """Every entry, oldest first (damaged lines skipped)."""
    out = []
    for ln in _lines(Path(state) / HISTORY):
        try:
            entry = json.loads(ln)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def builds(state: Path) -> list[dict]:
    """The entries of builds that did something, oldest first."""
    return [e for e in read(state) if not e.get("noop")]


def latest(state: Path) -> dict | None:
    """The whole record of the latest build that did something, or None."""
    try:
        record = json.loads((Path(state) / LATEST).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def trends(entries: list[dict]) -> dict[str, dict]:
    """Per step (the task name's part before ``:``): its seconds and peak memory in each build of the
    history that built it, oldest first: ``{step: {"seconds": [...], "peak_mb": [...], "builds": [...]}}``.
    Each build counts the step's built tasks: seconds summed, the largest peak."""
    out: dict[str, dict] = {}
    for i, e in enumerate(entries):
        per: dict[str, dict] = {}
        for name, r in (e.get("tasks") or {}).items():
            if r.get("status") != "built":
                continue
            s = per.setdefault(name.split(":", 1)[0], {"seconds": 0.0, "peak_mb": None, "tasks": 0})
            s["seconds"] += r.get("seconds") or 0
            s["tasks"] += 1
            if r.get("peak_mb") is not None:
                s["peak_mb"] = max(s["peak_mb"] or 0, r["peak_mb"])
        for step, s in per.items():
            t = out.setdefault(step, {"builds": [], "started": [], "seconds": [], "peak_mb": [], "tasks": []})
            t["builds"].append(i)
            t["started"].append(e.get("started"))
            t["seconds"].append(round(s["seconds"], 3))
            t["peak_mb"].append(s["peak_mb"])
            t["tasks"].append(s["tasks"])
    return out

