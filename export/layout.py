"""Where the build puts things: names of files that more than one part of the package must agree on."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ExportError

STATE_DIR = ".export"  # beside dodo.py: doit's dependency file, the stat cache, the lock, step logs
LAST_BUILD = "last_build.json"  # under the artifacts folder: every task's status in the last build


def manifest_of(package: Path) -> Path:
    """``<name>.mlpackage.manifest.json`` beside a package: its digests, standing for the folder downstream."""
    return package.with_name(package.name + ".manifest.json")


def read_last_build(artifacts: Path | str) -> dict:
    """The record of the last build, ``{"tasks": {name: {"status": ..., ...}}, ...}``
    (export/planner/reporter.py writes it); ExportError naming the file when it is missing or not one."""
    path = Path(artifacts) / LAST_BUILD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError("no build record; run doit first", file=path, field="tasks") from None
    except OSError as e:
        raise ExportError(f"cannot read: {e.strerror}", file=path, field="tasks") from None
    except ValueError:
        record = None
    tasks = record.get("tasks") if isinstance(record, dict) else None
    if not isinstance(tasks, dict) or not all(isinstance(t, dict) and "status" in t for t in tasks.values()):
        raise ExportError("not a build record ({\"tasks\": {name: {\"status\": ...}}})", file=path, field="tasks")
    return record
