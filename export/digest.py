"""xxh3-128 content digests of files and directories."""
from __future__ import annotations

import os
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


def tree_digest(root: Path | str) -> str:
    """Digest of a directory: its sorted relative paths and their file digests."""
    root = Path(root)
    h = xxhash.xxh3_128()
    for rel in tree_files(root):
        h.update(rel.encode() + b"\0" + file_digest(root / rel).encode() + b"\n")
    return h.hexdigest()


def path_digest(path: Path | str) -> str:
    return tree_digest(path) if Path(path).is_dir() else file_digest(path)
