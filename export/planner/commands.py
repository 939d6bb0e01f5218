"""doit commands of this project (registered in pyproject.toml, [tool.doit.plugins.command]).

- ``doit nightly``: rebuild every artifact from scratch (no cache hits), compare each
  rebuilt digest with the cached one, publish, and write ``<artifacts>/nightly.json``.
- ``doit cache``: show the cache (entries, size, hit rate of the last build);
  ``doit cache --gc --max-bytes 20G`` collects what the current build does not need.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from doit.cmd_base import DoitCmdBase
from doit.cmd_run import Run

from .. import atomic, settings
from ..errors import ExportError
from ..layout import read_last_build


def _last_build(artifacts: Path) -> dict:
    """Each task's record in the last build; none if there is no good record."""
    try:
        return read_last_build(artifacts)["tasks"]
    except ExportError:
        return {}


class RunCmd(Run):
    """doit's ``run`` (plain ``doit``), plus ``--dask ADDRESS``: run the steps on a Dask cluster."""

    name = "run"
    cmd_options = Run.cmd_options + (
        {"name": "dask", "long": "dask", "type": str, "default": None,
         "help": "run the steps on the Dask scheduler at ADDRESS (tcp://host:8786); '' for none "
                 "[default: $MODEL_EXPORT_DASK_SCHEDULER, else [tool.export.dask] scheduler]"},
    )

    def _execute(self, outfile, verbosity=None, always=False, continue_=False, reporter="console", num_process=0,
                 par_type="process", single=False, auto_delayed_regex=False, force_verbosity=False,
                 failure_verbosity=0, pdb=False, dask=None):
        num_process, par_type = self._on_cluster(dask, num_process, par_type)
        if num_process is None:
            return 2
        from .reporter import BuildReporter

        BuildReporter.verbosity = 1 if verbosity is None else verbosity  # -v 2: every up-to-date task too
        BuildReporter.lanes = max(1, num_process or 1)
        return super()._execute(outfile, verbosity=verbosity, always=always, continue_=continue_, reporter=reporter,
                                num_process=num_process, par_type=par_type, single=single,
                                auto_delayed_regex=auto_delayed_regex, force_verbosity=force_verbosity,
                                failure_verbosity=failure_verbosity, pdb=pdb)

    @staticmethod
    def _on_cluster(dask, num_process, par_type):
        """With a scheduler: check it answers, and run enough doit lanes (processes) to keep steps in
        flight (``[tool.export.dask] lanes``, default 8; ``-n`` overrides). (None, _) on error."""
        from ..runner.cluster import reachable
        from .tasks import S

        if dask is not None:
            settings.set_dask_scheduler(dask, from_flag=True)
        address = settings.dask_scheduler(S.config.dask.scheduler)
        if not address:
            return num_process, par_type
        why = reachable(address)
        if why:
            where, field = settings.dask_scheduler_origin(S.config.root / "pyproject.toml")
            print(f"error: {where}: {field}: cannot reach the Dask scheduler at {address}: {why}", file=sys.stderr)
            return None, par_type
        settings.set_dask_scheduler(address)  # the lanes read it
        lanes = num_process or S.config.dask.lanes or DASK_LANES
        print(f"dask: steps run on the cluster at {address} ({lanes} lanes)", file=sys.stderr, flush=True)
        return lanes, "process"


DASK_LANES = 8


class Nightly(RunCmd):
    name = "nightly"
    doc_purpose = "rebuild every artifact from scratch, prove the bytes equal the cached ones, publish them"
    doc_usage = "[TASK ...]"
    doc_description = ("Runs every selected task (default: the whole build) with no cache hits, compares each\n"
                       "rebuilt output digest with the cached one, publishes to the cache, and writes\n"
                       "<artifacts>/nightly.json. Exits 1 if any artifact is not reproducible.")

    def _execute(self, outfile, verbosity=None, always=False, continue_=False, reporter="console", num_process=0,
                 par_type="process", single=False, auto_delayed_regex=False, force_verbosity=False,
                 failure_verbosity=0, pdb=False, dask=None):
        from .tasks import S

        settings.set_nightly()
        started = time.time()
        rc = super()._execute(outfile, verbosity=verbosity, always=True, continue_=continue_, reporter=reporter,
                              num_process=num_process, par_type=par_type, single=single,
                              auto_delayed_regex=auto_delayed_regex, force_verbosity=force_verbosity,
                              failure_verbosity=failure_verbosity, pdb=pdb, dask=dask)
        tasks = _last_build(S.config.artifacts)
        report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                  "seconds": round(time.time() - started, 1), "tasks": tasks}
        bad = {name: rec for name, rec in tasks.items() if rec.get("reproducible") is False}
        report["non_reproducible"] = sorted(bad)
        atomic.write_text(S.config.artifacts / "nightly.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
        out = sys.stdout
        for name, rec in sorted(bad.items()):
            for rel, digest in rec["outputs"].items():
                cached = (rec.get("cached") or {}).get(rel)
                if cached != digest:
                    out.write(f"NOT REPRODUCIBLE: {name}: {rel}: rebuilt {digest}, cached {cached}\n")
        fresh = sum(1 for r in tasks.values() if r.get("reproducible") is None and r.get("status") == "built" and r.get("outputs"))
        same = sum(1 for r in tasks.values() if r.get("reproducible") is True)
        out.write(f"nightly: {same} reproducible, {len(bad)} not reproducible, {fresh} new to the cache; "
                  f"report: {S.config.artifacts / 'nightly.json'}\n")
        return rc or (1 if bad else 0)


class CacheCmd(DoitCmdBase):
    name = "cache"
    doc_purpose = "show the artifact cache, or collect garbage in it (--gc)"
    doc_usage = "[--gc] [--max-bytes N]"
    doc_description = None
    cmd_options = (
        {"name": "gc", "long": "gc", "type": bool, "default": False,
         "help": "delete entries the current build does not use, beyond --max-bytes"},
        {"name": "max_bytes", "long": "max-bytes", "type": str, "default": "",
         "help": "size bound for --gc, e.g. 500M or 20G (default: keep only what the current build uses)"},
    )

    def _execute(self, gc=False, max_bytes=""):
        from ..cache.store import parse_size
        from .tasks import S, build_cache

        cache = build_cache()
        if gc:
            keep = set()
            for task in self.task_list:
                key = self.dep_manager.get_values(task.name).get("action_key")
                if key:
                    keep.add(key)
            self.dep_manager.close()
            try:
                bound = parse_size(max_bytes) if max_bytes else 0
            except ExportError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            result = cache.gc(keep_keys=keep, max_bytes=bound)
            print(json.dumps(result, indent=2, sort_keys=True))
            return 0
        stats = cache.stats()
        tasks = _last_build(S.config.artifacts)
        restored = sum(1 for r in tasks.values() if r.get("status") == "restored")
        built = sum(1 for r in tasks.values() if r.get("status") == "built")
        stats["last_build"] = {"restored": restored, "built": built,
                               "hit_rate": round(restored / (restored + built), 3) if restored + built else None}
        stats["local"] = str(cache.root)
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0


# --- plan, why, graph, report: read-only views of the build -------------------------------


class _Planning(DoitCmdBase):
    """A command that plans: doit's dependency file opened read-only, the stat cache read-only, the
    cache probed read-only, no lock (lock.READ_ONLY)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .plan import ReadOnlySqliteDB

        self._backends = {**self._backends, "sqlite3": ReadOnlySqliteDB}

    def plan(self, selection):
        from ..layout import STATE_DIR
        from . import tasks
        from .plan import ReadOnlyStatCache, run_plan

        tasks.read_only(ReadOnlyStatCache(tasks.S.config.root / STATE_DIR / "stat-cache.sqlite"))
        try:
            return run_plan(self.task_list, self.dep_manager, selection)
        finally:
            self.dep_manager.close()


class Plan(_Planning):
    name = "plan"
    doc_purpose = "dry run: what a build would do to every task (run, restore, up to date) and why"
    doc_usage = "[--json] [--changed] [TASK ...]"
    doc_description = ("Goes through the whole graph of the selected tasks (default: the default tasks), as\n"
                       "`doit` would, and says for each task whether it will be built, restored from the cache,\n"
                       "stay up to date, or may run (an upstream task rebuilds: early cutoff decides), naming\n"
                       "the input file, config field, source file or tool version that changed.\n"
                       "Writes nothing and takes no lock.")
    cmd_options = (
        {"name": "as_json", "long": "json", "type": bool, "default": False, "help": "print the plan as JSON"},
        {"name": "changed", "long": "changed", "type": bool, "default": False,
         "help": "leave out the tasks that stay up to date"},
    )

    def _execute(self, pos_args=None, as_json=False, changed=False):
        from .plan import VERDICTS, estimate, render
        from .tasks import S, STATE_DIR

        verdicts = self.plan(pos_args or self.sel_tasks)
        estimated = estimate(verdicts, {t.name: t for t in self.task_list}, S.config.root / STATE_DIR)
        if as_json:
            counts = {k: sum(1 for v in verdicts if v.verdict == k) for k in VERDICTS}
            shown = [v.to_json() for v in verdicts if not (changed and v.verdict == "up-to-date")]
            self.outstream.write(json.dumps({"tasks": shown, "counts": counts, "estimate": estimated}, indent=2) + "\n")
        else:
            self.outstream.write(render(verdicts, only_changes=changed, estimated=estimated))
        return 0


class Why(_Planning):
    name = "why"
    doc_purpose = "why a task would run (or not): its plan verdict and reasons, and those of what it waits on"
    doc_usage = "[--json] TASK"
    doc_description = None
    cmd_options = ({"name": "as_json", "long": "json", "type": bool, "default": False, "help": "print as JSON"},)

    def _execute(self, pos_args=None, as_json=False):
        from doit.exceptions import InvalidCommand

        if not pos_args or len(pos_args) != 1:
            raise InvalidCommand(f"`why` needs one task (see `{self.bin_name} help why`)")
        verdicts = {v.task: v for v in self.plan(pos_args)}
        target = pos_args[0]
        asked = [target] if target in verdicts else [n for n in verdicts if n.startswith(target.split(":")[0] + ":")
                                                     and n in self._members(target)]
        if as_json:
            self.outstream.write(json.dumps({n: verdicts[n].to_json() for n in asked}, indent=2) + "\n")
            return 0
        for n in asked:
            self._explain(verdicts, n, 0, set())
        return 0

    def _members(self, group: str) -> set[str]:
        tasks = {t.name: t for t in self.task_list}
        return set(tasks[group].task_dep) if group in tasks else set()

    def _explain(self, verdicts, name, depth, seen):
        v = verdicts[name]
        pad = "    " * depth
        self.outstream.write(f"{pad}{name}: {v.summary()}\n")
        for r in v.reasons:
            self.outstream.write(f"{pad}    - {r['text']}\n")
        seen.add(name)
        for up in v.after:
            if up not in seen and up in verdicts:
                self._explain(verdicts, up, depth + 1, seen)


class Graph(_Planning):
    name = "graph"
    doc_purpose = "the task graph coloured by plan verdict: <artifacts>/graph.dot and graph.svg"
    doc_usage = "[--out DIR] [TASK ...]"
    doc_description = ("Writes graph.dot (Graphviz) and graph.svg (laid out without Graphviz: one band per model,\n"
                       "one column per step), each task coloured: up to date, will restore, will build, will run,\n"
                       "may run. Changes no build state and takes no lock.")
    cmd_options = ({"name": "out", "long": "out", "type": str, "default": "",
                    "help": "folder for graph.dot and graph.svg (default: the artifacts folder)"},)

    def _execute(self, pos_args=None, out=""):
        from . import graph
        from .tasks import S

        verdicts = self.plan(pos_args or self.sel_tasks)
        nodes = {v.task: v.verdict for v in verdicts}
        tasks = {t.name: t for t in self.task_list}

        def prerequisites(name, seen=()):  # through groups (export_pytorch:T16...) to the tasks they stand for
            for d in tasks[name].task_dep:
                if d in nodes:
                    yield d
                elif d in tasks and d not in seen:
                    yield from prerequisites(d, seen + (d,))

        edges = graph.reduce(sorted({(d, n) for n in nodes for d in prerequisites(n)}))
        titles = {v.task: "\n".join([f"{v.task}: {v.summary()}", *(f"- {r['text']}" for r in v.reasons)]) for v in verdicts}
        folder = Path(out) if out else S.config.artifacts
        dot, svg = folder / "graph.dot", folder / "graph.svg"
        atomic.write_text(dot, graph.to_dot(nodes, edges, titles))
        from .plan import render

        atomic.write_text(svg, graph.to_svg(nodes, edges, titles, caption=render(verdicts).splitlines()[-1]))
        self.outstream.write(f"graph: {len(nodes)} tasks, {len(edges)} edges -> {dot}, {svg}\n")
        return 0


class Report(_Planning):
    name = "report"
    doc_purpose = ("write <artifacts>/report.json, report.html and trace.json from the latest build that did something "
                   "(every such build writes them too)")
    doc_usage = "[--svg FILE]"
    doc_description = None
    cmd_options = ({"name": "svg", "long": "svg", "type": str, "default": "",
                    "help": "also write the build's timeline alone, as an SVG picture, to FILE"},)

    def _execute(self, svg=""):
        from . import history, report, timeline
        from .tasks import S, STATE_DIR

        self.dep_manager.close()
        state = S.config.root / STATE_DIR
        record = history.latest(state)
        if record is None:  # a build from before the history: its last record
            try:
                record = read_last_build(S.config.artifacts)
            except ExportError as e:
                print(f"error: no build record to report on ({e}); run doit first", file=sys.stderr)
                return 2
        tr = timeline.trace(record)
        atomic.write_text(S.config.artifacts / "trace.json", timeline.to_json(tr))
        j, h = report.write(S.config.artifacts, report.build_report(S.config.artifacts, record, state=state))
        self.outstream.write(f"report: {j}, {h}, {S.config.artifacts / 'trace.json'}\n")
        if svg:
            atomic.write_text(Path(svg), timeline.to_svg(tr, title=f"doit build {record.get('started', '')}".strip()))
            self.outstream.write(f"timeline: {svg}\n")
        return 0
