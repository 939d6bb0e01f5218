"""Outputs appear atomically: written beside the target, then renamed into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import ExportError


def _tmp_beside(target: Path, is_dir: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        d = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        d.chmod(0o777 & ~_umask())
        return d
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
    os.close(fd)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove(path: Path, *, ignore_errors: bool = False) -> None:
    """Remove a file, a link or a directory tree; nothing there is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=ignore_errors)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
    except OSError:
        if not ignore_errors:
            raise


def replace(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` over ``target``. rename() cannot replace a non-empty directory: a directory
    there is moved aside first (a ``.tmp`` name beside it, which prune_artifacts knows) and removed."""
    if target.is_dir() and not target.is_symlink():
        old = _tmp_beside(target, True)
        os.rmdir(old)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextmanager
def atomic_path(target: Path | str, *, is_dir: bool = False):
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    On any failure the temporary is removed and ``target`` is left as it was.
    """
    target = Path(target)
    try:
        tmp = _tmp_beside(target, is_dir)
    except OSError as e:
        raise ExportError(f"cannot write here: {e.strerror}", file=target.parent, field="output folder") from None
    try:
        yield tmp
        replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        remove(tmp)
        raise


def write_bytes(target: Path | str, data: bytes) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(target: Path | str, text: str) -> None:
    write_bytes(target, text.encode())


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
