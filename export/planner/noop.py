"""The fast no-op: a build that would do nothing ends in the time of a few thousand ``stat`` calls.

A build that ends with every task up to date (or built, or restored: nothing failed) writes a stamp,
``.export/noop-stamp.bin``: the command line, the ``MODEL_EXPORT_*`` environment, the Python and the
installed distributions (the tool versions every key holds), and the stat (device, inode, size,
mtime, ctime) of every file the up-to-date checks read: the step code (the whole ``export`` package
and dodo.py), the config files, doit's dependency file, every task's inputs and outputs (each file and folder inside a
package), and the folders ``prune_artifacts`` looks in. The next ``doit`` with the same command line
compares them before it loads the graph; when nothing differs it prints ``N tasks up to date``,
records the no-op (last_build.json, the history) and exits. Anything else (a stat that differs, a
missing stamp) goes the ordinary way, doit's checks by content digest, which write a new stamp.

The same trust as the stat cache (export/digest.py): a file whose stat is unchanged has unchanged
bytes, and a file modified less than ``RACY_SECONDS`` before the stamp is not trusted (no stamp is
written). Any other doit command that writes (``forget``, ``clean``, ``nightly``...) removes the
stamp, as does every build that does not take the fast path, until it ends well.
Imports nothing heavy: this runs before the task generators are loaded.
"""
from __future__ import annotations

import marshal
import os
import sys
import time
from pathlib import Path

STAMP = "noop-stamp.bin"  # marshal: read in a few ms at thousands of tasks
VERSION = 3
RACY_SECONDS = 2.0  # as export/digest.py
PACKAGE = Path(__file__).resolve().parents[1]  # the export package: all of the step code


def _key(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev]


def _env() -> dict:
    from ..settings import environment

    return environment()


def _tools() -> list:
    """The distributions on sys.path (what export/toolchain.py reads versions from), by folder."""
    out = []
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        out.append([entry, sorted(n for n in names if n.endswith((".dist-info", ".egg-info")))])
    return out


def _code(root: Path) -> list[str]:
    files = [str(root / "dodo.py")]
    for d, dirs, names in os.walk(PACKAGE):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    return files


def _walk(path: str, out: list[str]) -> None:
    """``path`` and, for a folder, every folder and file inside it."""
    out.append(path)
    if os.path.isdir(path):
        for d, dirs, names in os.walk(path):
            dirs.sort()
            out += [os.path.join(d, n) for n in sorted(dirs)]
            out += [os.path.join(d, n) for n in sorted(names)]


def _subdirs(folder: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir())
    except OSError:
        return []


def _head(argv: list[str]) -> dict:
    return {"version": VERSION, "argv": argv[1:], "python": sys.executable, "env": _env(), "tools": _tools()}


def process_started() -> float | None:
    """When this process started (time.time()), from /proc: a no-op's seconds count its start-up too."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return time.time() - (up - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def stamp_path(state: Path) -> Path:
    return Path(state) / STAMP


def forget(state: Path) -> None:
    try:
        os.unlink(stamp_path(state))
    except OSError:
        pass


def write(state: Path, argv: list[str], root: Path, artifacts: Path, config_files: list[Path], tasks: dict,
          record_path: Path) -> bool:
    """Stamp the state a successful build left (``tasks``: doit's tasks, their values loaded).
    False (and no stamp) when a file is too recent to be trusted."""
    depfile = str(Path(state) / "doit.sqlite")  # what doit recorded: just closed, so never "too recent"
    paths = _code(root) + [str(p) for p in config_files] + [depfile]
    names = []
    for name, task in tasks.items():
        if not task.actions or name.startswith("_"):
            continue
        names.append(name)
        for dep in task.file_dep:
            paths.append(os.path.join(root, dep))
        for rel in ((task.values or {}).get("outputs") or {}):
            _walk(os.path.join(root, rel), paths)
    models = _subdirs(str(artifacts))
    for m in models:  # where prune_artifacts looks for stale outputs (export/planner/tasks.py stale_outputs)
        paths += [os.path.join(artifacts, m), os.path.join(artifacts, m, "exported"), os.path.join(artifacts, m, "coreml")]
        for sub in _subdirs(os.path.join(artifacts, m)):  # the parts of a parted model (artifacts/<model>/<part>/)
            if sub not in ("exported", "coreml") and not sub.endswith(".mlpackage"):
                d = os.path.join(artifacts, m, sub)
                paths += [d, os.path.join(d, "exported"), os.path.join(d, "coreml")]
    files, seen, now = [], set(), time.time()
    for p in paths:
        if p in seen:
            continue
        seen.add(p)
        rel = os.path.relpath(p, root)
        try:
            st = os.stat(p)
        except OSError:
            files.append([rel, None])
            continue
        if now - st.st_mtime < RACY_SECONDS and p != depfile:
            forget(state)
            return False
        files.append([rel, _key(st)])
    stamp = {**_head(argv), "root": str(root), "tasks": names, "artifacts": str(artifacts), "models": models,
             "rels": [f[0] for f in files], "keys": [f[1] for f in files], "record": str(record_path), "written": now}
    target = stamp_path(state)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(marshal.dumps(stamp))
    os.replace(tmp, target)
    return True


def unchanged(state: Path, argv: list[str]) -> dict | None:
    """The stamp, if nothing it covers changed since it was written; else None (a stamp it cannot
    read included: the ordinary build decides)."""
    try:
        return _unchanged(state, argv)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None


def _unchanged(state: Path, argv: list[str]) -> dict | None:
    try:
        with open(stamp_path(state), "rb") as f:
            stamp = marshal.loads(f.read())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    if not isinstance(stamp, dict) or any(stamp.get(k) != v for k, v in _head(argv).items()):
        return None
    if _subdirs(stamp["artifacts"]) != stamp["models"]:
        return None
    root, stat = stamp["root"], os.stat
    prefix = "" if os.getcwd() == root else root + os.sep  # doit runs in the project: relative paths stat faster
    for rel, key in zip(stamp["rels"], stamp["keys"]):
        try:
            st = stat(prefix + rel)
        except OSError:
            if key is not None:
                return None
            continue
        if key is None or st.st_ino != key[0] or st.st_size != key[1] or st.st_mtime_ns != key[2] \
                or st.st_ctime_ns != key[3] or st.st_dev != key[4]:
            return None
    return stamp


def fast_path(dodo_file: str, argv: list[str]) -> None:
    """Called by dodo.py before the graph is loaded: a plain build whose stamp holds ends here."""
    from ..layout import STATE_DIR
    from . import lock

    root = Path(dodo_file).resolve().parent
    state = root / STATE_DIR
    command = lock.command_of(argv)
    if command in lock.READ_ONLY or PACKAGE != root / "export":  # another package: setup() says so
        return
    if command != "run" or not stamp_path(state).exists():
        forget(state)
        return
    lock.acquire(state / "lock", argv)  # a build running now holds it: wait for it, then look
    stamp = unchanged(state, argv)
    if stamp is None:
        forget(state)  # this build goes the ordinary way; it stamps again if it ends well
        return
    _noop(stamp, state)
    sys.exit(0)


def _noop(stamp: dict, state: Path) -> None:
    import json

    from . import history

    names = stamp["tasks"]
    started = time.time()
    record = {"tasks": {n: {"status": "up-to-date"} for n in names}, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seconds": 0.0, "t0": started, "pid": os.getpid(), "lanes": 1}
    born = process_started()
    seconds = time.time() - born if born is not None else 0.0
    record["seconds"] = round(seconds, 3)
    try:
        target = Path(stamp["record"])  # renamed into place, not synced: a no-op's record is a convenience
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=None if len(names) > 200 else 2, sort_keys=True) + "\n")
        os.replace(tmp, target)
        history.append(state, record)
    except OSError as e:
        print(f"warning: could not record the no-op build: {e}", file=sys.stderr)
    sys.stdout.write(f"{len(names)} tasks up to date ({seconds:.1f} s)\n")
    sys.stdout.flush()
