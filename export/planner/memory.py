"""A memory budget shared by every step of a build, across doit's parallel processes.

Each heavy step reserves the memory it expects to need before it starts, in a small
ledger file under ``.export/`` guarded by a file lock; a step that does not fit waits
until enough is released (a step bigger than the whole budget runs alone). Entries of
dead processes are dropped, so a killed build never holds memory it no longer uses.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

POLL_SECONDS = 0.25


def default_budget_mb() -> int:
    """Three quarters of the machine's memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return int(total * 0.75) >> 20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Ledger:
    def __init__(self, path: Path, budget_mb: int):
        self.path = Path(path)
        self.budget_mb = budget_mb
        self.lock = FileLock(str(self.path) + ".lock")

    def _read(self) -> dict[str, dict]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in entries.items() if _alive(v["pid"])}

    def _write(self, entries: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, self.path)

    def try_reserve(self, name: str, need_mb: int) -> bool:
        with self.lock:
            entries = self._read()
            used = sum(v["mb"] for v in entries.values())
            if entries and used + need_mb > self.budget_mb:
                return False
            entries[name] = {"pid": os.getpid(), "mb": need_mb, "since": time.time()}
            self._write(entries)
            return True

    def release(self, name: str) -> None:
        with self.lock:
            entries = self._read()
            entries.pop(name, None)
            self._write(entries)

    def holders(self) -> list[str]:
        with self.lock:
            return sorted(self._read())

    @contextmanager
    def reserve(self, name: str, need_mb: int):
        """Hold ``need_mb`` of the budget while the block runs; wait (saying so once) until it fits.

        Yields a dict that says when (wall clock, time.time()) the wait began and ended (``waited``,
        None when it fitted at once) and when the memory was held (``held``: [acquired, released],
        released filled in on exit): the build's timeline (export/timeline.py) draws both."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        said = False
        began = time.time()
        while not self.try_reserve(name, need_mb):
            if not said:
                print(f"{name}: waiting for memory ({need_mb} MB needed, budget {self.budget_mb} MB, "
                      f"held by {', '.join(self.holders())})", file=sys.stderr, flush=True)
                said = True
            time.sleep(POLL_SECONDS)
        acquired = time.time()
        times = {"waited": [began, acquired] if said else None, "held": [acquired, None], "budget_mb": self.budget_mb}
        try:
            yield times
        finally:
            self.release(name)
            times["held"][1] = time.time()
