"""What the build has written: the record ``prune_artifacts`` reads, so that it removes only
outputs the build itself wrote (README.md, "Building"; the promise: the build never deletes or
alters a file it did not write).

``.export/written.log`` holds one JSON line per event, appended with a single ``write`` (lines of
parallel steps never interleave, and a build killed mid-line leaves one bad last line, ignored):

    {"intent": "artifacts/m/coreml/prefill_T16.mlpackage"}     a step or a restore is about to write it
    {"wrote": "artifacts/m/coreml/prefill_T16.mlpackage", "digest": "..."}   it wrote these bytes
    {"removed": "artifacts/m/coreml/prefill_T16.mlpackage"}    prune_artifacts removed it

An intent names where temporaries of that output can be (``.<name>.*.tmp`` and the like beside
it); a write names an output and its digest. prune removes a written output only while it still
has the digest the build gave it; a file the user changed or put there is left alone.
Nothing here imports torch or coremltools.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

NAME = "written.log"


@dataclass
class Record:
    wrote: dict[str, str] = field(default_factory=dict)  # relpath -> digest the build gave it
    intents: set[str] = field(default_factory=set)       # relpaths a step or restore was about to write


def _append(state_dir: Path, lines: list[dict]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines).encode()
    fd = os.open(state_dir / NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)  # one write: O_APPEND keeps lines of parallel steps whole
        os.fsync(fd)
    finally:
        os.close(fd)


def intend(state_dir: Path, rels: list[str]) -> None:
    """Record, before a step or a restore runs, the outputs it may write (and leave temporaries of)."""
    _append(state_dir, [{"intent": rel} for rel in rels])


def wrote(state_dir: Path, digests: dict[str, str]) -> None:
    """Record outputs the build has written, with their digests."""
    _append(state_dir, [{"wrote": rel, "digest": d} for rel, d in digests.items()])


def read(state_dir: Path) -> Record:
    rec = Record()
    try:
        text = (state_dir / NAME).read_text(errors="replace")
    except FileNotFoundError:
        return rec
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a line a killed build left half-written
        if not isinstance(e, dict):
            continue
        if isinstance(e.get("intent"), str):
            rec.intents.add(e["intent"])
        elif isinstance(e.get("wrote"), str) and isinstance(e.get("digest"), str):
            rec.wrote[e["wrote"]] = e["digest"]
        elif isinstance(e.get("removed"), str):
            rec.wrote.pop(e["removed"], None)
            rec.intents.discard(e["removed"])
    return rec


def removed(state_dir: Path, rels: list[str]) -> None:
    """Record outputs (and intents) prune_artifacts is done with."""
    if rels:
        _append(state_dir, [{"removed": rel} for rel in rels])


def size(state_dir: Path) -> int:
    try:
        return (state_dir / NAME).stat().st_size
    except OSError:
        return 0


def rewrite(state_dir: Path, rec: Record) -> None:
    """Replace the log by ``rec``: prune_artifacts compacts a long log, after every step of the build."""
    from ..atomic import write_text

    lines = [{"intent": rel} for rel in sorted(rec.intents)]
    lines += [{"wrote": rel, "digest": d} for rel, d in sorted(rec.wrote.items())]
    write_text(state_dir / NAME, "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
