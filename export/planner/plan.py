"""``doit plan``: what a build would do to every task, and why, without doing any of it.

A dry run through the whole graph, in build order. For each task it gives one verdict:

- ``up-to-date``: nothing its key covers changed, and nothing upstream will change its inputs.
- ``restore``: it will run, and the cache holds its action key: its outputs come back, no step runs.
- ``build``: it will run and the cache has no entry for it: the step runs.
- ``run``: it will run, but after an upstream task that builds: its input bytes, and so whether the
  cache has it, are known only then (``after`` names those tasks).
- ``may-run``: nothing of its own changed, but an upstream task builds; early cutoff keeps it up to
  date if that task yields the same bytes, otherwise it runs.
- ``error``: an input is missing and no task makes it (doit stops there).

Reasons name what changed: the input file (old -> new digest), the config field (old -> new
value, from the key doit stored: ``config_changed`` keeps the whole JSON), the step's source file,
the tool version, an output that was deleted or edited.

Read-only: the dependency file is opened read-only (nothing is saved), the cache is probed with
``Cache.probe`` (no entry is touched), no lock is taken. Imports no torch or coremltools.
"""
from __future__ import annotations

import json
import os
import sqlite3
from collections import deque
from dataclasses import asdict, dataclass, field

from doit.control import TaskControl
from doit.dependency import SqliteDB
from doit.tools import config_changed

from . import tasks as T
from ..digest import ReadOnlyStatCache, StatCache  # noqa: F401  (ReadOnlyStatCache: commands take it from here)

VERDICTS = ("up-to-date", "restore", "build", "run", "may-run", "error")
WILL_RUN = {"restore", "build", "run"}


@dataclass
class Verdict:
    task: str
    verdict: str
    reasons: list[dict] = field(default_factory=list)  # {"kind", "text", ...details}
    after: list[str] = field(default_factory=list)    # upstream tasks that decide (run / may-run)
    action_key: str | None = None                     # when all inputs are known
    outputs: dict[str, str] | None = None             # predicted output digests (up-to-date, restore)
    seconds: float | None = None                      # estimated from the history (export/estimate.py)
    basis: str | None = None                          # what the estimate rests on ("same task", ...)

    def summary(self) -> str:
        after = _some(self.after)
        return {
            "up-to-date": "up to date",
            "restore": "will be restored from the cache",
            "build": "will build (not in the cache)",
            "run": f"will run after {after} (built or restored: its bytes decide)",
            "may-run": f"may run after {after} (only if that yields different bytes)",
            "error": "cannot run",
        }[self.verdict]

    def to_json(self) -> dict:
        return asdict(self)


class ReadOnlySqliteDB(SqliteDB):
    """doit's sqlite3 backend, opened read-only: ``plan`` never writes the dependency file (and never
    makes one: a missing file reads as empty)."""

    def _sqlite3(self, name):
        conn_name = f"file:{os.path.abspath(name)}?mode=ro" if os.path.exists(name) else "file::memory:"
        conn = sqlite3.connect(conn_name, uri=True, detect_types=sqlite3.PARSE_DECLTYPES | sqlite3.PARSE_COLNAMES)
        conn.row_factory = lambda cursor, row: {c[0]: row[i] for i, c in enumerate(cursor.description)}
        sqlite3.register_converter("json", lambda data: self.codec.decode(data.decode("utf-8")))
        if not os.path.exists(name):
            conn.execute("create table doit (task_id text not null primary key, task_data json)")
        return conn

    def set(self, task_id, dependency, value):  # a status check may ask to forget a task: ignore
        pass

    def remove(self, task_id):
        pass

    def dump(self):
        self._conn.close()


# --- the key ----------------------------------------------------------------------------


def _flatten(d, prefix="") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d
    return out


def _short(v) -> str:
    if isinstance(v, str) and len(v) == 32 and all(c in "0123456789abcdef" for c in v):
        return v[:8]
    return json.dumps(v)


def _some(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def key_reasons(old: dict, new: dict, old_code: dict | None, new_code: dict | None) -> list[dict]:
    """Field by field: what differs between two keys (config, code, tools)."""
    reasons = []
    fo, fn = _flatten(old), _flatten(new)
    for name in sorted(set(fo) | set(fn)):
        a, b = fo.get(name, "<none>"), fn.get(name, "<none>")
        if a == b:
            continue
        if name == "code":
            files = sorted(f for f in set(old_code or {}) | set(new_code or {})
                           if (old_code or {}).get(f) != (new_code or {}).get(f)) if old_code else []
            what = ", ".join(f"export/{f}" for f in files) if files else "its source files"
            reasons.append({"kind": "code", "field": "code", "files": files, "old": a, "new": b,
                            "text": f"code of step {new.get('step')} changed: {what} ({_short(a)} -> {_short(b)})"})
        elif name.startswith("tools."):
            reasons.append({"kind": "tool", "field": name, "old": a, "new": b,
                            "text": f"tool version {name[6:]}: {a} -> {b}"})
        else:
            reasons.append({"kind": "config", "field": name, "old": a, "new": b,
                            "text": f"config {name}: {_short(a)} -> {_short(b)}"})
    return reasons


# --- the plan ---------------------------------------------------------------------------


def _config_json(task) -> str | None:
    for utd, _, _ in task.uptodate:
        if isinstance(utd, config_changed) and isinstance(utd.config, str):
            return utd.config
    return None


def _code_files(task) -> dict | None:
    for utd, _, _ in task.uptodate:
        if isinstance(utd, T.SavesValues):
            return utd.values.get("code_files")
    return None


def _step_args(task):
    """(key, outputs as relative paths, inputs) of a run_step action, or None for other tasks."""
    for action in task.actions:
        if getattr(action, "py_callable", None) is T.run_step:
            step, kwargs, outputs, name, key, inputs = action.args
            return key, [T.rel(p) for p in outputs], list(inputs)
    return None


def build_order(tasks: dict, selected: list[str]) -> list[str]:
    """Every task the selection needs, prerequisites first."""
    needed, todo = set(), deque(selected)
    while todo:
        n = todo.popleft()
        if n in needed:
            continue
        needed.add(n)
        todo.extend(tasks[n].task_dep + tasks[n].setup_tasks)
    order, seen = [], set()

    def visit(n):
        if n in seen:
            return
        seen.add(n)
        for d in tasks[n].task_dep + tasks[n].setup_tasks:
            visit(d)
        order.append(n)

    for n in [t for t in tasks if t in needed]:
        visit(n)
    return order


class Planner:
    def __init__(self, task_list, dep_manager, probe):
        """``probe(action_key, outputs)`` -> predicted output digests or None (``Cache.probe``)."""
        self.control = TaskControl(task_list)
        self.tasks = self.control.tasks
        self.producer = self.control.targets  # file -> task that makes it
        self.dep = dep_manager
        self.probe = probe
        self.verdicts: dict[str, Verdict] = {}

    def plan(self, selection: list[str] | None) -> list[Verdict]:
        self.control.process(selection)
        for name in build_order(self.tasks, self.control.selected_tasks):
            task = self.tasks[name]
            if not task.actions or name.startswith("_"):
                continue  # groups select tasks; they do nothing themselves
            self.verdicts[name] = self._judge(task)
        return list(self.verdicts.values())

    def _digest(self, rel: str) -> str | None:
        p = T.S.config.root / rel
        return T.stat_cache().any(p) if p.exists() else None

    def _judge(self, task) -> Verdict:
        name = task.name
        values = self.dep.get_values(name)
        if _step_args(task) is None:  # not a step (no key, no cache): doit's own check decides
            return self._doit_verdict(task, values)
        own: list[dict] = []       # reasons that make it run whatever happens upstream
        waits: set[str] = set()    # upstream builds whose bytes it needs (inputs unknown)
        unsure: set[str] = set()   # upstream builds that may or may not change its inputs
        inputs: dict[str, str] = {}

        cur_json, old_json = _config_json(task), values.get("_config_changed")
        cur_key = json.loads(cur_json) if cur_json else None
        if not values:
            own.append({"kind": "new", "text": "never built here (no record in the dependency file)"})
        elif cur_json is not None and old_json != cur_json:
            try:
                old_key = json.loads(old_json) if old_json else None
            except ValueError:
                old_key = None
            if isinstance(old_key, dict) and cur_key is not None:
                own += key_reasons(old_key, cur_key, values.get("code_files"), _code_files(task))
            if not own:
                own.append({"kind": "config", "field": None, "text": "its key changed (no earlier key recorded to compare)"})

        checker = self.dep._get(name, "checker:")
        if checker and checker != self.dep.checker.__class__.__name__:
            own.append({"kind": "checker", "text": f"file checker changed: {checker} -> {self.dep.checker.__class__.__name__}"})
        recorded_deps = self.dep._get(name, "deps:")
        if values and recorded_deps and set(recorded_deps) != set(task.file_dep):
            added, removed = sorted(set(task.file_dep) - set(recorded_deps)), sorted(set(recorded_deps) - set(task.file_dep))
            own.append({"kind": "inputs", "added": added, "removed": removed,
                        "text": f"its inputs changed: {', '.join(['+' + a for a in added] + ['-' + r for r in removed])}"})

        for dep in sorted(task.file_dep):
            old = self.dep._get(name, dep)
            up = self.producer.get(dep)
            upv = self.verdicts.get(up) if up else None
            if upv is not None and upv.verdict != "up-to-date":
                new = (upv.outputs or {}).get(dep) if upv.verdict == "restore" else None
                if new is None:  # it builds: the bytes are known only once it has run
                    if values and old is not None and self._digest(dep) == old:
                        unsure.add(up)  # early cutoff keeps this input if the bytes come out the same
                    else:
                        waits.add(up)
                    continue
                how = f"restored by {up}"
            else:
                new, how = self._digest(dep), None
                if new is None:
                    if up is None:
                        return Verdict(name, "error", [{"kind": "missing", "file": dep,
                                                        "text": f"input {dep} is missing and no task makes it"}])
                    waits.add(up)
                    continue
            inputs[dep] = new
            if values and old != new:
                text = f"input {dep}: {_short(old) if old else 'none'} -> {_short(new)}" + (f" ({how})" if how else "")
                own.append({"kind": "file", "file": dep, "old": old, "new": new, "text": text})

        recorded = values.get("outputs") or {}
        for rel, digest in sorted(recorded.items()):
            now = self._digest(rel)
            if now is None:
                own.append({"kind": "output", "file": rel, "text": f"output {rel} is missing"})
            elif now != digest:
                own.append({"kind": "output", "file": rel, "old": digest, "new": now,
                            "text": f"output {rel} was modified ({_short(digest)} -> {_short(now)})"})
        if values and not recorded and _step_args(task):
            own.append({"kind": "output", "text": "no record of its outputs"})

        if own or waits:
            if waits:
                return Verdict(name, "run", own + [{"kind": "after", "text": f"its inputs come from {_some(waits)}, which will build first"}],
                               after=sorted(waits | unsure))
            if unsure:
                return Verdict(name, "run", own + [{"kind": "after", "text": f"its cache key depends on what {_some(unsure)} will build"}],
                               after=sorted(unsure))
            args = _step_args(task)
            if args is None:
                return Verdict(name, "build", own)
            key, outs, ins = args
            akey = T.action_key_of(key, {rel: inputs[rel] for rel in ins})
            hit = self.probe(akey, outs)
            if hit is not None:
                return Verdict(name, "restore", own + [{"kind": "cache", "text": f"the cache holds action {akey[:8]}"}],
                               action_key=akey, outputs=hit)
            return Verdict(name, "build", own + [{"kind": "cache", "text": f"the cache has no action {akey[:8]}"}], action_key=akey)
        if unsure:
            return Verdict(name, "may-run", [{"kind": "after", "text": f"early cutoff: it stays up to date if {_some(unsure)} {'rebuild' if len(unsure) > 1 else 'rebuilds'} the same bytes"}],
                           after=sorted(unsure))
        verdict = self._doit_verdict(task, values)  # doit sees something not named above: say what
        if verdict.verdict != "up-to-date":
            return verdict
        return Verdict(name, "up-to-date", action_key=values.get("action_key"), outputs=recorded or None)

    def _doit_verdict(self, task, values) -> Verdict:
        status = self.dep.get_status(task, self.tasks, get_log=True)
        if status.status == "up-to-date":
            return Verdict(task.name, "up-to-date")
        if status.status == "error":
            return Verdict(task.name, "error", [{"kind": "doit", "text": status.get_error_message() or "doit: error"}])
        return Verdict(task.name, "build", doit_reasons(status.reasons))


def doit_reasons(reasons: dict) -> list[dict]:
    """doit's own reasons (``DependencyStatus.reasons``), as plan reasons."""
    out = []
    for utd, _, _ in reasons.get("uptodate_false") or []:
        what = getattr(utd, "__name__", None) or type(utd).__name__
        out.append({"kind": "doit", "text": f"its up-to-date check {what} says no"})
    if reasons.get("has_no_dependencies"):
        out.append({"kind": "doit", "text": "it has no dependencies: it always runs"})
    for kind, label in (("missing_target", "target missing"), ("changed_file_dep", "input changed"),
                        ("missing_file_dep", "input missing"), ("added_file_dep", "input added"),
                        ("removed_file_dep", "input removed")):
        for f in reasons.get(kind) or []:
            out.append({"kind": "doit", "file": f, "text": f"{label}: {f}"})
    if reasons.get("checker_changed"):
        out.append({"kind": "doit", "text": "file checker changed: {} -> {}".format(*reasons["checker_changed"])})
    return out or [{"kind": "doit", "text": "doit says it will run"}]


# --- text ---------------------------------------------------------------------------------


def estimate(verdicts: list[Verdict], tasks: dict, state) -> dict:
    """How long the planned build will take, from the history of builds in ``state`` (export/estimate.py).
    Sets each verdict's ``seconds`` and ``basis``; returns the whole: ``{"seconds", "steps",
    "without_history", "may_run_seconds", "builds"}`` (``seconds`` None when nothing is known)."""
    from . import history
    from .estimate import Estimates

    est = Estimates(history.builds(state))
    total, counted, unknown, maybe = 0.0, 0, [], 0.0
    for v in verdicts:
        if v.verdict in ("up-to-date", "error"):
            continue
        outcome = "restored" if v.verdict == "restore" else "built"
        secs, basis = est.task(v.task, outcome)
        if basis == "no history" or basis == "same step":  # the step's rate per input byte, if its inputs exist
            sized, how = est.task(v.task, outcome, input_bytes=_input_bytes(tasks.get(v.task)))
            if sized is not None:
                secs, basis = sized, how
        v.seconds, v.basis = (None if secs is None else round(secs, 2)), basis
        if v.verdict == "may-run":
            maybe += secs or 0.0
        elif secs is None:
            unknown.append(v.task)
        else:
            total += secs
            counted += 1
    runs = counted + len(unknown)
    seconds = round(total + est.overhead, 1) if counted else (0.0 if not runs else None)
    return {"seconds": seconds, "steps": runs, "without_history": unknown, "may_run_seconds": round(maybe, 1),
            "builds": est.builds}


def _input_bytes(task) -> int | None:
    if task is None:
        return None
    for action in task.actions:
        if getattr(action, "py_callable", None) is T.run_step:
            step, kwargs, outputs, name, key, inputs = action.args
            return T.input_bytes(kwargs, inputs) or None
    return None


def estimate_text(e: dict) -> str:
    from .estimate import fmt_duration

    if not e["steps"]:
        return "estimate: nothing to run"
    if not e["builds"]:
        return f"estimate: no history of earlier builds yet (.export/history.jsonl): {e['steps']} steps to run, no estimate"
    n = len(e["without_history"])
    if e["seconds"] is None:
        return f"estimate: none of the {e['steps']} steps to run has a history yet: no estimate"
    text = (f"estimate: {'at least' if n else 'about'} {fmt_duration(e['seconds'])} for {e['steps']} steps "
            f"(history of {e['builds']} build{'s' if e['builds'] != 1 else ''})")
    if n:
        text += f"; {n} without history ({_some(e['without_history'])})"
    if e["may_run_seconds"]:
        text += f"; up to {fmt_duration(e['may_run_seconds'])} more if the may-run steps run"
    return text


def render(verdicts: list[Verdict], *, only_changes: bool = False, estimated: dict | None = None) -> str:
    lines = []
    for v in verdicts:
        if only_changes and v.verdict == "up-to-date":
            continue
        lines.append(f"{v.task}: {v.summary()}")
        for r in v.reasons:
            lines.append(f"    - {r['text']}")
    if estimated is not None:
        lines.append(estimate_text(estimated))
    counts = {k: sum(1 for v in verdicts if v.verdict == k) for k in VERDICTS}
    lines.append("plan: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n) if verdicts else "plan: no tasks")
    return "\n".join(lines) + "\n"


def run_plan(task_list, dep_manager, selection) -> list[Verdict]:
    """The plan of ``selection`` (None: every task), the configured cache probed read-only."""
    import sys

    from ..cache.store import Cache

    c = T.S.config.cache
    cache = Cache.from_settings(local=c.local, remote=c.remote, read_only=True,
                                log=lambda msg: print(msg, file=sys.stderr))
    def probe(akey: str, outs: list[str]):  # the entry names outputs by role (export/planner/tasks.py, role)
        roles, where = T.output_roles(outs)
        hit = cache.probe(akey, roles)
        return None if hit is None else {where[r]: d for r, d in hit.items()}

    return Planner(task_list, dep_manager, probe).plan(selection)
