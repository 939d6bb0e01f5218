"""doit's dependency file (``.export/doit.sqlite``), checked before doit opens it.

The cache is the source of truth; the dependency file is an optimization that may be
lost at any time without harm (docs/architecture.md, "Where each promise is kept"). SQLite commits atomically, so a
build killed while doit writes the file leaves a hot journal that the next open rolls
back. A file that is damaged anyway (truncated, overwritten, a disk that lied) would
make doit stop with its own traceback; instead a building command moves it aside with
one warning naming it, and every step comes back from the cache (or rebuilds). A
read-only command (``doit list``, ``doit plan``) changes nothing: one error line.
"""
from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

# sqlite's companions of a database file: a hot journal left next to a replaced file would be
# rolled back into the new one, so they go aside with it.
COMPANIONS = ("-journal", "-wal", "-shm")


def damage(path: Path) -> str | None:
    """Why the dependency file at ``path`` is unusable, or None if it is usable (or absent)."""
    if not path.exists():
        return None
    conn = None
    try:
        conn = sqlite3.connect(path, timeout=30)  # rolls a hot journal back first, if there is one
        rows = conn.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            return "; ".join(str(r[0]) for r in rows[:3])
        return None
    except sqlite3.Error as e:
        return str(e)
    finally:
        if conn is not None:
            conn.close()


def check(path: Path, *, repair: bool) -> None:
    """Before doit opens ``path``: if it is damaged, move it aside (``repair``) or stop with one line."""
    why = damage(path)
    if why is None:
        return
    shown = os.path.relpath(path)
    if not repair:
        print(f"error: {shown}: doit's dependency file is damaged ({why}); run doit to rebuild it from the cache",
              file=sys.stderr)
        sys.exit(2)
    aside = path.with_name(path.name + ".damaged")
    for suffix in ("", *COMPANIONS):
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(aside) + suffix))
    print(f"warning: {shown}: doit's dependency file is damaged ({why}); moved aside to {os.path.relpath(aside)}, "
          f"every step is checked again (restored from the cache when it holds it)", file=sys.stderr, flush=True)
