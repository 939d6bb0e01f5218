"""What an ExportedProgram archive (``.pt2``) whose weights stay in the checkpoint says about them,
read without torch (the planner's memory estimate reads it; export/program_weights.py writes it).

The build saves every (mode, T) program as its graph with each weight that is a checkpoint tensor
(after the export's dtype cast) replaced by an empty record, and the list of those weights in the
archive's extra file ``REFS_FILE``: per weight of the program, the checkpoint tensor's name, the
dtype and shape it takes, and the xxh3-128 digest of its bytes (a part's split head: ``rows`` [a, b),
the piece's rows of the tensor). Those digests are part of the
``.pt2``'s bytes, so every step keyed by the ``.pt2`` is keyed by the weights it reads from the
checkpoint, and the loader checks each tensor against its digest.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

REFS_FILE = "model_export_weights.json"  # torch.export.save(extra_files=...) puts it under <archive>/extra/
VERSION = 1


def read(path: Path | str) -> dict | None:
    """The weight references of the archive at ``path`` (``{"version", "tensors": {fqn: ref}}``), or None
    when it holds its weights itself (a self-contained file, or not a zip at all)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/extra/" + REFS_FILE) or n == "extra/" + REFS_FILE]
            if not names:
                return None
            return json.loads(z.read(names[0]))
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


def external_sizes(path: Path | str) -> list[int]:
    """The bytes of each weight the archive at ``path`` reads from its checkpoint, once each ([] if
    self-contained): the planner's memory estimate weighs the largest one on its own (export/stepdefs.py)."""
    refs = read(path)
    if not refs:
        return []
    seen, sizes = set(), []
    for r in refs.get("tensors", {}).values():
        key = (r["tensor"], r["dtype"], tuple(r.get("rows") or ()))  # a split head's pieces: rows of one tensor
        if key not in seen:
            seen.add(key)
            sizes.append(int(r.get("nbytes", 0)))
    return sizes


def external_bytes(path: Path | str) -> int:
    """The bytes of the weights the archive at ``path`` reads from its checkpoint (0 if self-contained)."""
    return sum(external_sizes(path))
