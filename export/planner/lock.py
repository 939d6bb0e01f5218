"""One build at a time per project: a second ``doit`` waits and says for whom."""
from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from .. import settings

# doit commands that only read: they take no lock.
# plan, why, graph and report change no build state (graph and report write only their own files, atomically).
READ_ONLY = {"list", "info", "help", "dumpdb", "tabcompletion", "strace", "plan", "why", "graph", "report"}
DOIT_COMMANDS = READ_ONLY | {"run", "clean", "forget", "ignore", "reset-dep", "auto", "nightly", "cache"}

_held: int | None = None  # the locked file's descriptor, held until the process exits


def command_of(argv: list[str]) -> str:
    return next((a for a in argv[1:] if a in DOIT_COMMANDS), "run")


def acquire(lock_path: Path, argv: list[str]) -> None:
    """Take the project lock for commands that write; wait (saying so) if it is held.

    ``MODEL_EXPORT_LOCK_WAIT=0`` stops instead of waiting.
    """
    global _held
    if _held is not None or command_of(argv) in READ_ONLY:
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    info = lock_path.with_suffix(".owner")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:  # flock: released by the kernel when the process dies, however it dies
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = info.read_text().strip() if info.exists() else "unknown"
        if not settings.lock_wait():
            print(f"error: another doit is building this project ({owner}); not waiting (MODEL_EXPORT_LOCK_WAIT=0)", file=sys.stderr)
            sys.exit(3)
        print(f"waiting for another doit building this project ({owner}) to finish...", file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    info.write_text(f"pid {os.getpid()}, started {time.strftime('%H:%M:%S')}\n")
    _held = fd
