"""xxh3-128 content digests of files and directories."""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import xxhash

CHUNK = 1 << 20


def file_digest(path: Path | str) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def bytes_digest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def tree_files(root: Path | str) -> list[str]:
    """Relative POSIX paths of every regular file below ``root``, sorted."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            out.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(out)


def tree_digest_of(files: dict[str, str]) -> str:
    """The digest of a directory holding exactly ``files`` (relative POSIX path -> file digest)."""
    h = xxhash.xxh3_128()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + files[rel].encode() + b"\n")
    return h.hexdigest()


def tree_digest(root: Path | str) -> str:
    """Digest of a directory: its sorted relative paths and their file digests."""
    root = Path(root)
    return tree_digest_of({rel: file_digest(root / rel) for rel in tree_files(root)})


def path_digest(path: Path | str) -> str:
    return tree_digest(path) if Path(path).is_dir() else file_digest(path)


# ---------------------------------------------------------------------------
# The stat cache: a file is hashed at most once per change, not once per task
# per run. Keyed by (device, inode, size, mtime_ns, ctime_ns); an entry whose
# mtime is too recent to be trusted (the file could still change within the
# same clock tick) is used but not stored.

RACY_SECONDS = 2.0


class StatCache:
    def __init__(self, path: Path | str):
        self.db_path = Path(path)
        self._conn = None
        self._pid = None

    def connection(self) -> sqlite3.Connection | None:
        if self._conn is None or self._pid != os.getpid():  # never share a connection across fork
            try:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, stat TEXT, digest TEXT)")
            except sqlite3.Error:
                return None  # an unusable cache only costs hashing time
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    @staticmethod
    def racy(st: os.stat_result) -> bool:
        """Modified too recently to trust its stat: the file could change again within the same clock tick."""
        return time.time() - st.st_mtime <= RACY_SECONDS

    @staticmethod
    def stat_key(st: os.stat_result) -> str:
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"

    def file(self, path: Path | str, st: os.stat_result | None = None) -> str:
        """The xxh3-128 digest of a file, from the cache when its stat is unchanged."""
        path = os.path.abspath(path)
        st = st or os.stat(path)
        key = self.stat_key(st)
        db = self.connection()
        if db is not None:
            try:
                row = db.execute("SELECT digest FROM digests WHERE path=? AND stat=?", (path, key)).fetchone()
            except sqlite3.Error:
                row = None
            if row:
                return row[0]
        digest = file_digest(path)
        if db is not None and not self.racy(st):
            try:
                db.execute("INSERT OR REPLACE INTO digests VALUES (?,?,?)", (path, key, digest))
            except sqlite3.Error:
                pass
        return digest

    def tree(self, root: Path | str) -> str:
        """Like ``tree_digest`` with every file digest from the cache."""
        root = Path(root)
        return tree_digest_of({rel: self.file(root / rel) for rel in tree_files(root)})

    def any(self, p: Path | str) -> str:
        """A file's or a directory's digest."""
        return self.tree(p) if Path(p).is_dir() else self.file(p)


class ReadOnlyStatCache(StatCache):
    """The stat cache, read but never written (a file it does not know is hashed, not remembered).
    Opened read-only; when its WAL holds rows, SQLite still maps the ``-shm`` index, as for any reader."""

    def connection(self):
        if self._conn is None:
            try:
                if not self.db_path.exists():
                    return None
                wal = self.db_path.with_name(self.db_path.name + "-wal")
                # All rows in the main file (no WAL, or an empty one): read it as immutable, which
                # touches nothing (a read-only connection would still delete an empty WAL on close).
                mode = "ro&immutable=1" if not wal.exists() or wal.stat().st_size == 0 else "ro"
                self._conn = sqlite3.connect(f"file:{self.db_path.resolve()}?mode={mode}", uri=True, timeout=30)
                self._conn.execute("SELECT 1 FROM digests LIMIT 1")
            except sqlite3.Error:
                self._conn = None
                return None
        return self._conn
