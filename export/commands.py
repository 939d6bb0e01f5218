"""doit commands of this project (registered in pyproject.toml, [tool.doit.plugins.command]).

- ``doit nightly``: rebuild every artifact from scratch (no cache hits), compare each
  rebuilt digest with the cached one, publish, and write ``<artifacts>/nightly.json``.
- ``doit cache``: show the cache (entries, size, hit rate of the last build);
  ``doit cache --gc --max-bytes 20G`` collects what the current build does not need.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from doit.cmd_base import DoitCmdBase
from doit.cmd_run import Run

from . import atomic
from .errors import ExportError


def _last_build(artifacts: Path) -> dict:
    try:
        return json.loads((artifacts / "last_build.json").read_text())["tasks"]
    except (OSError, ValueError, KeyError):
        return {}


class Nightly(Run):
    name = "nightly"
    doc_purpose = "rebuild every artifact from scratch, prove the bytes equal the cached ones, publish them"
    doc_usage = "[TASK ...]"
    doc_description = ("Runs every selected task (default: the whole build) with no cache hits, compares each\n"
                       "rebuilt output digest with the cached one, publishes to the cache, and writes\n"
                       "<artifacts>/nightly.json. Exits 1 if any artifact is not reproducible.")

    def _execute(self, outfile, verbosity=None, always=False, continue_=False, reporter="console", num_process=0,
                 par_type="process", single=False, auto_delayed_regex=False, force_verbosity=False,
                 failure_verbosity=0, pdb=False):
        from .tasks import S

        os.environ["MODEL_EXPORT_NIGHTLY"] = "1"
        started = time.time()
        rc = super()._execute(outfile, verbosity=verbosity, always=True, continue_=continue_, reporter=reporter,
                              num_process=num_process, par_type=par_type, single=single,
                              auto_delayed_regex=auto_delayed_regex, force_verbosity=force_verbosity,
                              failure_verbosity=failure_verbosity, pdb=pdb)
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
        fresh = sum(1 for r in tasks.values() if r.get("reproducible") is None and r.get("status") == "built")
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
        from .cache import parse_size
        from .tasks import S, _cache

        cache = _cache()
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
