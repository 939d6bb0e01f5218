"""The content-addressed artifact cache (docs/architecture.md, "Where each promise is kept").

Bazel's split, in a local folder shared by several checkouts and optionally in a
remote store reached through fsspec (a directory, a network share, ``s3://``)::

    cas/<xx>/<digest>    blobs: the bytes of one output file, named by their xxh3-128
    ac/<xx>/<key>        manifests: small JSON naming the blobs of one action's outputs
    tmp/                 files being written (renamed into cas/ or ac/ when complete)
    lock                 flock: builds hold it shared, ``gc`` exclusive

Blobs are written first and the manifest last: the manifest is the commit, so
an interrupted writer leaves at most unreferenced blobs and temporary files,
never an entry. Every restore re-checks every digest; an entry that fails (a
missing or altered blob, a manifest naming paths the task does not declare) is
dropped with one warning and is a miss, so the step simply runs again.

Restored files are hardlinks to the read-only local blob when the cache and the
checkout share a file system (else copies); never symlinks. So are the files a step
just wrote, once published (``put(..., adopt=True)``, what ``finish_step`` does): each
is replaced, atomically, by a hardlink to its blob, so identical files (the same
``weight.bin`` in every (mode, T) package of a model) take the disk once, in the
cache and under ``artifacts/`` together. A linked file is read-only; a tool that
writes through the hardlink anyway (root, or after a chmod) alters the blob: every
``get`` re-hashes what it restores and drops an entry whose blob no longer has its
digest, and a ``put`` re-hashes an existing blob before it reuses it (a blob
found altered is replaced by the good bytes just built). The altered artifacts
themselves have a new stat and digest, so the planner rebuilds or restores them
(tests/test_weight_sharing.py). Pass ``link=False`` to always copy.

Nothing here imports torch or coremltools: this runs in the doit planner.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import re
import socket
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from contextlib import contextmanager
from pathlib import Path

import xxhash

from .. import settings
from ..atomic import remove, replace
from ..digest import CHUNK, file_digest, tree_digest_of
from ..digest import bytes_digest as bytes_digest_of
from ..layout import LAST_BUILD, read_last_build
from ..errors import ExportError, cli_errors

SCHEMA = 1
GRACE_SECONDS = 3600.0  # gc never deletes a blob or temporary file younger than this
STORE_CONNECT_TIMEOUT = 2  # seconds to reach an S3 store before it counts as unreachable for the build
STORE_RETRIES = 2  # s3fs's attempts of one request (botocore's own retries are off): a dead store costs a few s, once
_HEX = re.compile(r"[0-9a-f]{32}\Z")
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}\Z")


class _Bad(Exception):
    """The entry is unusable (corrupt, partial, unsafe): drop it. ``blob``: a blob to drop too."""

    def __init__(self, message: str, blob: str | None = None):
        super().__init__(message)
        self.blob = blob


class _Refused(Exception):
    """The checkout cannot receive the outputs safely (a symlink on the way): a miss, the entry is kept."""


class _Other(Exception):
    """The entry is sound but names other outputs than asked for: a miss, the entry is kept (an entry is
    deleted only when its own bytes are bad)."""


def _relpath(rel: str) -> str:
    """``rel`` if it is a plain relative POSIX path that stays below its root, else ValueError."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        raise ValueError(f"not a relative path: {rel!r}")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise ValueError(f"not a plain relative path: {rel!r}")
    return rel


def _copy_hashing(src, dst_path: Path) -> tuple[str, int]:
    """Copy the open binary file ``src`` to a new file ``dst_path``; return (digest, size)."""
    h, size = xxhash.xxh3_128(), 0
    with open(dst_path, "xb") as out:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), size


def _open_nofollow(path: Path):
    return os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")


def _shard(name: str) -> str:
    return f"{name[:2]}/{name}"


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


class _Remote:
    """The shared store, through fsspec. On S3, writes are create-only (If-None-Match: *);
    elsewhere a temporary name then a rename."""

    def __init__(self, url: str, storage_options: dict | None):
        import fsspec

        self.url = url
        options = dict(storage_options or {})
        if url.split("://", 1)[0] in ("s3", "s3a"):
            # an unreachable store costs a few seconds, once (Cache stops using it after the first failure);
            # botocore's defaults (60 s connect timeout, retries with backoff) made a build wait ~10 s
            config = {"connect_timeout": STORE_CONNECT_TIMEOUT, "retries": {"max_attempts": 1, "mode": "standard"},
                      **options.get("config_kwargs", {})}
            options["config_kwargs"] = config
            options.setdefault("skip_instance_cache", True)  # s3fs would hand back an instance made for another endpoint
        self.fs, self.base = fsspec.core.url_to_fs(url, **options)
        if "config_kwargs" in options and hasattr(self.fs, "retries"):
            self.fs.retries = STORE_RETRIES  # s3fs's own retries (5, with backoff) on top of botocore's
        self.base = self.base.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.create_only = bool({"s3", "s3a"} & set(protocols))

    def path(self, kind: str, name: str) -> str:
        return f"{self.base}/{kind}/{_shard(name)}"

    def read_manifest(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path("ac", key))
        except FileNotFoundError:
            return None

    def download(self, digest: str, dst: Path) -> tuple[str, int]:
        try:
            with self.fs.open(self.path("cas", digest), "rb") as f:
                return _copy_hashing(f, dst)
        except FileNotFoundError:
            raise _Bad(f"remote blob {digest} is missing") from None

    def upload(self, src: Path, kind: str, name: str, *, skip_existing: bool, replace: bool = False) -> None:
        """Publish ``src`` as kind/name atomically; an existing one is left alone, unless ``replace`` (a blob
        found corrupt: its good bytes go over it, still atomically: a whole-object put on S3, a rename elsewhere)."""
        dst = self.path(kind, name)
        if skip_existing and not replace and self.fs.exists(dst):
            return
        if self.create_only:
            try:
                self.fs.put_file(str(src), dst, **({} if replace else {"mode": "create"}))
            except Exception as e:
                if not _already_there(e):
                    raise
                # another machine published it first: same content (blob) or an equivalent entry
            return
        tmp = f"{self.base}/tmp/{uuid.uuid4().hex}"
        self.fs.makedirs(f"{self.base}/tmp", exist_ok=True)
        self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(src), tmp)
        self.fs.mv(tmp, dst)

    def drop(self, key: str) -> None:
        try:
            self.fs.rm_file(self.path("ac", key))
        except FileNotFoundError:
            pass

    def stats(self) -> dict:
        entries = len(self._find("ac"))
        blobs = self._find("cas", detail=True)
        return {"entries": entries, "blobs": len(blobs), "bytes": sum(int(i.get("size") or 0) for i in blobs.values())}

    def _find(self, kind: str, detail: bool = False):
        self.fs.invalidate_cache()
        try:
            return self.fs.find(f"{self.base}/{kind}", detail=detail)
        except FileNotFoundError:
            return {} if detail else []


class Cache:
    """The action cache and the content-addressed store, local and optionally remote.

    Counters ``hits``, ``misses`` (corrupt entries included), ``corrupt`` and
    ``published`` let the build report a hit rate.
    """

    def __init__(self, local: str | Path, remote: str | None = None, *, read_only: bool = False, log=print,
                 link: bool = True, storage_options: dict | None = None):
        self.root = Path(local).expanduser()
        self.remote_url = remote or None
        self.read_only = read_only
        self.log = log
        self.link = link
        self.storage_options = storage_options
        self.hits = self.misses = self.corrupt = self.published = 0
        self.uploaded = 0  # entries this process put in the shared store (pending ones included)
        self._remote: _Remote | None = None
        self._disabled: str | None = None  # why the local cache is unusable, once known
        self._remote_disabled = False  # unreachable: not tried again by this process
        self._bad_remote_blobs: set[str] = set()  # found corrupt or missing in the store: uploaded over it

    def _remote_failed(self, e: BaseException, message: str, tail: str = "") -> None:
        """A remote operation failed: an unreachable store is given up for the rest of the build, said once."""
        if _unreachable(e):
            if not self._remote_disabled:
                self._remote_disabled = True
                self.log(f"warning: remote cache unavailable: {self.remote_url}: {_why(e)}; not tried again in this "
                         "build (the local cache serves; entries built meanwhile are uploaded at the next build "
                         "that reaches it)")
            return
        self.log(f"{message}: {_why(e)}{tail}")

    @classmethod
    def from_settings(cls, *, local: str | Path | None, remote: str | None, read_only: bool = False,
                      log=print) -> "Cache":
        """The cache as configured: ``$MODEL_EXPORT_CACHE`` (default ``~/.cache/model-export``) is the
        local folder when ``local`` is None; ``$MODEL_EXPORT_REMOTE_CACHE`` overrides ``remote`` (empty:
        none); ``$MODEL_EXPORT_CACHE_READ_ONLY=1`` never publishes remotely."""
        return cls(settings.local_cache(local), settings.remote_cache(remote),
                   read_only=settings.cache_read_only(read_only), log=log)

    @property
    def hit_rate(self) -> float | None:
        looked = self.hits + self.misses
        return self.hits / looked if looked else None

    # --- the local store -----------------------------------------------------

    def _blob(self, digest: str) -> Path:
        return self.root / "cas" / _shard(digest)

    def _manifest(self, key: str) -> Path:
        return self.root / "ac" / _shard(key)

    def _usable(self) -> bool:
        """Make the local folders once; if that fails, warn once and work without caching."""
        if self._disabled is None:
            try:
                for sub in ("cas", "ac", "tmp"):
                    (self.root / sub).mkdir(parents=True, exist_ok=True)
                    if (self.root / sub).is_symlink():
                        raise OSError(errno.ELOOP, "a symlink", str(self.root / sub))
                self._disabled = ""
            except OSError as e:
                self._disabled = f"{self.root}: {e.strerror or e}"
                self.log(f"warning: cache not writable: {self._disabled}; building without caching")
        return not self._disabled

    @contextmanager
    def _locked(self, exclusive: bool = False):
        """Builds hold the cache's lock shared while they write or restore; gc holds it exclusive."""
        try:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            if exclusive:
                raise
            yield  # a cache we may only read: nothing to guard against
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _tmp(self) -> Path:
        return self.root / "tmp" / uuid.uuid4().hex

    def _install(self, tmp: Path, dst: Path, mode: int | None = None) -> None:
        if mode is not None:
            os.chmod(tmp, mode)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dst)

    def _add_blob(self, src: Path) -> tuple[str, int]:
        """Store ``src``'s bytes (hashed while copied); an existing blob is kept and marked used, once
        its bytes are checked (a blob is shared by hardlink with artifacts, which someone may have
        written through: such a blob is replaced by ``src``'s bytes)."""
        digest, size = file_digest(src), src.stat().st_size
        blob = self._blob(digest)
        if blob.is_file() and not blob.is_symlink() and blob.stat().st_size == size and (
                os.path.samestat(blob.stat(), src.stat()) or file_digest(blob) == digest):
            try:
                os.utime(blob)  # young again: gc's grace period covers the manifest about to name it
            except OSError:
                pass
            return digest, size
        tmp = self._tmp()
        try:
            with _open_nofollow(src) as f:
                copied, size = _copy_hashing(f, tmp)
            if copied != digest:
                raise _Bad(f"{src} changed while it was being cached")
            os.chmod(tmp, 0o444)
            blob.parent.mkdir(parents=True, exist_ok=True)
            try:  # never over a blob another step published meanwhile (parallel steps with the same bytes): the
                os.link(tmp, blob)  # outputs it adopted are hardlinks to that one, which must stay the cache's
            except FileExistsError:
                if not (blob.is_file() and not blob.is_symlink() and file_digest(blob) == digest):
                    os.replace(tmp, blob)  # an altered blob: src's bytes replace it
        finally:
            tmp.unlink(missing_ok=True)
        return digest, size

    def _drop(self, key: str, blob: str | None = None) -> None:
        for p in (self._manifest(key), self._blob(blob) if blob else None):
            if p is not None:
                try:
                    p.unlink()
                except OSError:
                    pass

    # --- get -------------------------------------------------------------------

    def get(self, key: str, root: Path, outputs: list[str], where: dict[str, str] | None = None
            ) -> dict[str, str] | None:
        """Restore the outputs of action ``key`` under ``root``: {relpath: digest}, or None on a miss.

        ``outputs`` name the outputs as the entry does (their roles); ``where`` maps a name to the path
        under ``root`` it goes to in this checkout (default: the name itself)."""
        _check_args(key, outputs)
        where = where or {}
        for rel in where.values():
            _check_args(key, [rel])
        if not self._usable():
            self.misses += 1
            return None
        root = Path(root)
        with self._locked():
            data = self._read_local(key)
            if data is None:
                data = self._pull(key, outputs)
            if data is None:
                self.misses += 1
                return None
            try:
                result = self._restore(root, _parse(data, key, outputs), where)
            except _Other as e:
                self.log(f"warning: cache entry {key} not used (kept): {e}")
                self.misses += 1
                return None
            except _Bad as e:
                self._drop(key, e.blob)
                self.log(f"warning: cache entry {key} dropped: {e}")
                self.corrupt += 1
                self.misses += 1
                return None
            except (_Refused, OSError) as e:
                self.log(f"warning: cache entry {key} not restored: {e}")
                self.misses += 1
                return None
        try:
            os.utime(self._manifest(key))  # recently used: what gc's size bound keeps
        except OSError:
            pass
        self.hits += 1
        return result

    def peek(self, key: str, outputs: list[str]) -> dict[str, str] | None:
        """The output digests an entry records ({relpath: digest}, as ``get`` returns them), restoring
        nothing: what the nightly compares a rebuild with. None if there is no valid entry."""
        _check_args(key, outputs)
        if not self._usable():
            return None
        data = self._read_local(key)
        if data is None:
            remote = self._remote_store()
            try:
                data = remote.read_manifest(key) if remote is not None else None
            except Exception as e:
                self._remote_failed(e, "warning: remote cache unavailable")
                data = None
        if data is None:
            return None
        try:
            m = _parse(data, key, outputs)
        except (_Bad, _Other):
            return None
        return {rel: o["digest"] if o["type"] == "file" else tree_digest_of({k: f["digest"] for k, f in o["files"].items()})
                for rel, o in m["outputs"].items()}

    def probe(self, key: str, outputs: list[str]) -> dict[str, str] | None:
        """What ``get`` would restore ({relpath: digest}), strictly read-only: no folder made, no entry
        dropped or touched, no blob pulled. A local entry counts when every blob it names is present
        with its size (``get`` drops an entry with a missing blob and rebuilds); without a local entry,
        the remote's manifest is read. None: ``get`` would miss. Used by ``doit plan``."""
        _check_args(key, outputs)
        try:
            path = self._manifest(key)
            data = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        except OSError:
            data = None
        if data is not None:
            try:
                m = _parse(data, key, outputs)
            except (_Bad, _Other):
                return None
            for digest, size in _blobs(m).items():
                try:
                    st = self._blob(digest).lstat()
                except OSError:
                    return None
                if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                    return None
        else:
            remote = self._remote_store()
            try:
                data = remote.read_manifest(key) if remote is not None else None
                m = _parse(data, key, outputs) if data is not None else None
            except (_Bad, _Other):
                return None
            except Exception as e:
                self._remote_failed(e, "warning: remote cache unavailable")
                return None
            if m is None:
                return None
        return {rel: o["digest"] if o["type"] == "file" else tree_digest_of({k: f["digest"] for k, f in o["files"].items()})
                for rel, o in m["outputs"].items()}

    def _read_local(self, key: str) -> bytes | None:
        try:
            with _open_nofollow(self._manifest(key)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:  # a symlink, a directory...: not an entry
            self.log(f"warning: cache entry {key} dropped: unreadable manifest ({e.strerror})")
            self._drop(key)
            self.corrupt += 1
            return None

    def _pull(self, key: str, outputs: list[str]) -> bytes | None:
        """Read-through: copy a remote entry (blobs, then the manifest) into the local cache."""
        remote = self._remote_store()
        if remote is None:
            return None
        try:
            data = remote.read_manifest(key)
            if data is None:
                return None
            try:
                manifest = _parse(data, key, outputs)
            except _Other:
                return None  # sound, but of other outputs: kept, and a miss
            for digest, size in _blobs(manifest).items():
                if self._blob(digest).is_file():
                    continue
                tmp = self._tmp()
                try:
                    try:
                        got, got_size = remote.download(digest, tmp)
                    except _Bad:
                        self._bad_remote_blobs.add(digest)
                        raise
                    if (got, got_size) != (digest, size):
                        self._bad_remote_blobs.add(digest)  # the next put of these bytes replaces it
                        raise _Bad(f"remote blob {digest} does not match its digest")
                    self._install(tmp, self._blob(digest), 0o444)
                finally:
                    tmp.unlink(missing_ok=True)
            tmp = self._tmp()
            tmp.write_bytes(data)
            self._install(tmp, self._manifest(key))
            return data
        except _Bad as e:
            self.log(f"warning: remote cache entry {key} {'skipped' if self.read_only else 'dropped'}: {e}")
            self.corrupt += 1
            if not self.read_only:
                try:
                    remote.drop(key)
                except Exception:
                    pass
            return None
        except Exception as e:  # an unreachable store is a miss, never a failed build
            self._remote_failed(e, "warning: remote cache unavailable")
            self._remote_disabled = True
            return None

    def _restore(self, root: Path, manifest: dict, where: dict[str, str]) -> dict[str, str]:
        """Stage every output beside its target, verify every digest, then rename all into place."""
        staged: list[tuple[Path, Path]] = []
        result = {}
        root.mkdir(parents=True, exist_ok=True)
        try:
            for name, out in manifest["outputs"].items():
                rel = where.get(name, name)
                target = _safe_target(root, rel)
                tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.restore"
                if out["type"] == "file":
                    staged.append((target, tmp))
                    self._place(out["digest"], out["size"], tmp)
                    result[rel] = out["digest"]
                else:
                    tmp.mkdir(mode=0o777)
                    staged.append((target, tmp))
                    for inner, f in out["files"].items():
                        dst = tmp.joinpath(*inner.split("/"))
                        dst.parent.mkdir(parents=True, exist_ok=True)  # inside our fresh folder only
                        self._place(f["digest"], f["size"], dst)
                    result[rel] = tree_digest_of({k: f["digest"] for k, f in out["files"].items()})
            for target, tmp in staged:
                replace(tmp, target)
        except BaseException:
            for _, tmp in staged:
                remove(tmp, ignore_errors=True)
            raise
        return result

    def _place(self, digest: str, size: int, dst: Path) -> None:
        """Put blob ``digest`` at ``dst`` (a hardlink, else a copy) and check its bytes."""
        blob = self._blob(digest)
        try:
            st = blob.lstat()
        except FileNotFoundError:
            raise _Bad(f"blob {digest} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise _Bad(f"blob {digest} is not a regular file", blob=digest)
        linked = False
        if self.link:
            try:
                os.link(blob, dst, follow_symlinks=False)
                linked = True
            except OSError:
                pass  # another file system, or no hardlinks there: copy
        if linked:
            if not stat.S_ISREG(dst.lstat().st_mode):
                raise _Bad(f"blob {digest} is not a regular file", blob=digest)
            got, got_size = file_digest(dst), dst.stat().st_size
        else:
            with _open_nofollow(blob) as f:
                got, got_size = _copy_hashing(f, dst)
        if (got, got_size) != (digest, size):
            raise _Bad(f"blob {digest} does not match its digest", blob=digest)

    # --- put -------------------------------------------------------------------

    def put(self, key: str, root: Path, outputs: list[str], producer: dict, where: dict[str, str] | None = None,
            *, adopt: bool = False) -> None:
        """Publish the outputs of action ``key`` (blobs first, the manifest last); never fails the build.

        ``producer``: task, seconds, host (filled in), and ``toolchain`` (versions) if known.
        ``adopt``: the outputs are files the build itself just wrote: each is then replaced by a hardlink
        to its blob (one copy on disk; never for inputs, which are the user's files).
        """
        _check_args(key, outputs)
        if not self._usable():
            return
        root = Path(root)
        producer = dict(producer)
        toolchain = producer.pop("toolchain", {})
        producer.setdefault("host", socket.gethostname())
        try:
            with self._locked():
                entry = {rel: self._publish_output(root, (where or {}).get(rel, rel), adopt) for rel in outputs}
                manifest = {"schema": SCHEMA, "key": key, "outputs": entry, "producer": producer,
                            "toolchain": toolchain, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                tmp = self._tmp()
                tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
                self._install(tmp, self._manifest(key))
        except _Bad as e:
            self.log(f"warning: {key} not cached: {e}")
            return
        except OSError as e:
            self.log(f"warning: cache not writable: {_why(e)}; building without caching")
            return
        self.published += 1
        if self.remote_url and not self.read_only:
            self._push(key, manifest)

    def _publish_output(self, root: Path, rel: str, adopt: bool = False) -> dict:
        path = root / rel
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise _Bad(f"output {rel} does not exist") from None
        if stat.S_ISREG(st.st_mode):
            digest, size = self._add_blob(path)
            if adopt:
                self._adopt(path, digest)
            return {"type": "file", "digest": digest, "size": size}
        if not stat.S_ISDIR(st.st_mode):
            raise _Bad(f"output {rel} is neither a file nor a directory")
        files = {}
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                mode = p.lstat().st_mode
                if not (stat.S_ISDIR(mode) if name in dirnames else stat.S_ISREG(mode)):
                    raise _Bad(f"output {rel} holds {p.relative_to(root)}, neither a file nor a directory (a symlink?)")
            for name in filenames:
                p = Path(dirpath) / name
                digest, size = self._add_blob(p)
                if adopt:
                    self._adopt(p, digest)
                files[p.relative_to(path).as_posix()] = {"digest": digest, "size": size}
        return {"type": "dir", "files": dict(sorted(files.items()))}

    def _adopt(self, path: Path, digest: str) -> None:
        """Replace the output file ``path`` (its bytes just stored as blob ``digest``) by a hardlink to the
        blob, atomically: a hardlink made beside it, renamed over it. Another file system, or no hardlinks
        there: the file stays as it is (a copy)."""
        if not self.link:
            return
        blob = self._blob(digest)
        try:
            if os.path.samestat(path.lstat(), blob.lstat()):
                return
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.link"
            os.link(blob, tmp, follow_symlinks=False)
        except OSError:
            return
        try:
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)

    def _push(self, key: str, manifest: dict) -> bool:
        """Write-through: the blobs, then the manifest, each atomic; failures only warn. An entry that could
        not be uploaded is marked pending (``pending/``): the next build that reaches the store uploads it."""
        remote = self._remote_store()
        if remote is None:
            self._mark_pending(key)
            return False
        try:
            for digest in _blobs(manifest):
                replace = digest in self._bad_remote_blobs
                remote.upload(self._blob(digest), "cas", digest, skip_existing=True, replace=replace)
                if replace:
                    self._bad_remote_blobs.discard(digest)
                    self.log(f"remote cache: blob {digest} replaced by its good bytes")
            remote.upload(self._manifest(key), "ac", key, skip_existing=False)
        except Exception as e:
            self._remote_failed(e, "warning: remote cache not writable",
                                "; published locally only (uploaded at the next build that can write there)")
            self._mark_pending(key)
            return False
        self.uploaded += 1
        return True

    def _pending_dir(self) -> Path:
        return self.root / "pending" / bytes_digest_of((self.remote_url or "").encode())

    def _mark_pending(self, key: str) -> None:
        try:
            d = self._pending_dir()
            d.mkdir(parents=True, exist_ok=True)
            (d / key).touch()
        except OSError:
            pass

    def pending(self) -> list[str]:
        """Keys of entries published locally only while the shared store was out of reach."""
        if not self.remote_url or self.read_only:
            return []
        try:
            return sorted(os.listdir(self._pending_dir()))
        except OSError:
            return []

    def upload_pending(self) -> int:
        """Upload the entries marked pending, if the store is reachable now; returns how many went up."""
        done = 0
        for key in self.pending():
            if self._remote_store() is None:
                break
            marker = self._pending_dir() / key
            data = self._read_local(key) if _KEY.match(key) else None
            try:
                manifest = _parse(data, key, None) if data is not None else None
            except _Bad:
                manifest = None
            if manifest is None:
                marker.unlink(missing_ok=True)  # gone from the local cache since: nothing to upload
                continue
            with self._locked():
                ok = self._push(key, manifest)
            if ok:
                marker.unlink(missing_ok=True)
                done += 1
        return done

    def remote_has(self, key: str) -> bool:
        """Whether the remote store holds entry ``key`` (False without a reachable remote)."""
        remote = self._remote_store()
        if remote is None:
            return False
        try:
            return remote.read_manifest(key) is not None
        except Exception as e:
            self._remote_failed(e, "warning: remote cache unavailable")
            return False

    def _remote_store(self) -> _Remote | None:
        if not self.remote_url or self._remote_disabled:
            return None
        if self._remote is None:
            try:
                self._remote = _Remote(self.remote_url, self.storage_options)
            except Exception as e:
                self.log(f"warning: remote cache {self.remote_url} unavailable: {_why(e)}")
                self._remote_disabled = True
                return None
        return self._remote

    # --- stats and gc ----------------------------------------------------------

    def stats(self) -> dict:
        """{entries, blobs, bytes} of the local cache, plus ``remote`` with the same when one is set."""
        blobs = list(_files(self.root / "cas"))
        out = {"entries": sum(1 for _ in _files(self.root / "ac")), "blobs": len(blobs),
               "bytes": sum(st.st_size for _, st in blobs)}
        remote = self._remote_store()
        if remote is not None:
            try:
                out["remote"] = remote.stats()
            except Exception as e:
                out["remote"] = {"error": _why(e)}
        if self.pending():
            out["pending"] = len(self.pending())
        return out

    def gc(self, *, keep_keys: set[str], max_bytes: int | None, grace: float = GRACE_SECONDS) -> dict:
        """Shrink the local cache: keep the entries in ``keep_keys``, then the most recently used ones
        while the kept blobs fit in ``max_bytes`` (None: keep every entry); delete the other manifests
        first, then the blobs no kept manifest names. Blobs and temporary files younger than ``grace``
        seconds are never deleted, and gc holds the cache's lock exclusive, so an entry being written
        by a concurrent build is never half deleted."""
        if not self._usable():
            return {"kept": 0, "deleted_entries": 0, "deleted_blobs": 0, "freed_bytes": 0}
        now = time.time()
        with self._locked(exclusive=True):
            sizes = {p.name: st.st_size for p, st in _files(self.root / "cas")}
            entries = []  # (last used, key, path, blobs)
            for p, st in _files(self.root / "ac"):
                try:
                    blobs = _blobs(_parse(p.read_bytes(), p.name, None))
                except (OSError, _Bad):
                    blobs = None  # unreadable or corrupt: never kept
                entries.append((st.st_mtime, p.name, p, blobs))
            keep, kept_blobs = [], set()
            for _, key, p, blobs in sorted(entries, key=lambda e: (e[1] not in keep_keys, -e[0])):
                if blobs is None:
                    continue
                new = set(blobs) - kept_blobs
                total = sum(sizes.get(b, 0) for b in kept_blobs | new)
                if key in keep_keys or max_bytes is None or total <= max_bytes:
                    keep.append(key)
                    kept_blobs |= new
                elif max_bytes is not None:
                    break  # least recently used from here on
            deleted_entries = 0
            for _, key, p, _ in entries:
                if key not in keep:
                    p.unlink(missing_ok=True)
                    deleted_entries += 1
            deleted_blobs = freed = 0
            for p, st in _files(self.root / "cas"):
                if p.name not in kept_blobs and now - st.st_mtime > grace:
                    p.unlink(missing_ok=True)
                    deleted_blobs += 1
                    freed += st.st_size
            for p, st in _files(self.root / "tmp"):
                if now - st.st_mtime > grace:
                    p.unlink(missing_ok=True)
        return {"kept": len(keep), "deleted_entries": deleted_entries, "deleted_blobs": deleted_blobs,
                "freed_bytes": freed}


# --- helpers -----------------------------------------------------------------


class StepOutputsMissing(Exception):
    """A step finished without writing some of its outputs (``missing``: their relative paths)."""

    def __init__(self, missing: list[str]):
        super().__init__(f"the step did not write {missing}")
        self.missing = missing


@dataclass
class Finished:
    """What ``finish_step`` found and did."""

    digests: dict[str, str]       # output -> digest
    key: str | None               # the entry the outputs were published under; None: not published
    cached: dict | None = None    # nightly: the cached digests of the same action key, if any
    reproducible: bool | None = None  # nightly: the rebuilt digests equal the cached ones (None: nothing cached)
    uploaded: int = 0             # entries that went to the shared store


def finish_step(cache: "Cache", key: str, root: Path, outputs: list[str], meta: dict, *, nightly: bool,
                digest=None, keep_rebuilt: bool = False, roles: list[str] | None = None) -> Finished:
    """After a step ran, in the planner (export/planner/tasks.py) or on a Dask worker
    (export/runner/cluster.py) alike: check it wrote every output, digest them, compare them with the
    cache in a nightly, and publish them under ``key``.

    Bytes that contradict the cache are never published under its key: with ``keep_rebuilt`` (a
    Dask worker handing them to the planner) they go under ``<key>.rebuilt``, else nowhere.
    ``roles``: the names the entry gives the outputs (export/planner/tasks.py, ``role``), default the paths."""
    from ..digest import path_digest

    roles = list(roles or outputs)
    where = dict(zip(roles, outputs))

    digest = digest or path_digest
    missing = [rel for rel in outputs if not (root / rel).exists()]
    if missing:
        raise StepOutputsMissing(missing)
    digests = {rel: digest(root / rel) for rel in outputs}
    done = Finished(digests, key)
    if nightly:
        cached = cache.peek(key, roles)
        done.cached = None if cached is None else {where[r]: d for r, d in cached.items()}
        done.reproducible = None if done.cached is None else done.cached == digests
        if done.reproducible is False:
            done.key = f"{key}.rebuilt" if keep_rebuilt else None
    if done.key is not None:
        before = cache.uploaded
        cache.put(done.key, root, roles, meta, where, adopt=True)
        done.uploaded = cache.uploaded - before
    return done


def _check_args(key: str, outputs: list[str]) -> None:
    if not isinstance(key, str) or not _KEY.match(key):
        raise ExportError(f"not a usable action key: {key!r}", field="cache key")
    for rel in outputs:
        try:
            _relpath(rel)
        except ValueError as e:
            raise ExportError(str(e), field="outputs") from None


def _parse(data: bytes, key: str, outputs: list[str] | None) -> dict:
    """The manifest, checked: its key, its outputs (exactly ``outputs``), every path and digest."""
    try:
        m = json.loads(data)
        if not isinstance(m, dict) or m.get("schema") != SCHEMA or m.get("key") != key:
            raise _Bad("manifest of another schema or key")
        outs = m["outputs"]
        if not isinstance(outs, dict):
            raise _Bad("manifest outputs are not a table")
        if outputs is not None and sorted(outs) != sorted(outputs):
            _parse(data, key, None)  # an entry that is bad in itself is still dropped
            raise _Other(f"the entry names outputs {sorted(outs)}, the task declares {sorted(outputs)}")
        for rel, out in outs.items():
            _relpath(rel)
            files = {rel: out} if out["type"] == "file" else out["files"] if out["type"] == "dir" else None
            if not isinstance(files, dict):
                raise _Bad(f"output {rel!r} is of no known type")
            for inner, f in files.items():
                _relpath(inner)
                if not (isinstance(f["digest"], str) and _HEX.match(f["digest"]) and type(f["size"]) is int):
                    raise _Bad(f"output {inner!r}: no valid digest and size")
        return m
    except (_Bad, _Other):
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise _Bad(f"invalid manifest ({e})") from None


def _blobs(manifest: dict) -> dict[str, int]:
    """digest -> size of every blob a manifest names."""
    out = {}
    for o in manifest["outputs"].values():
        for f in ([o] if o["type"] == "file" else o["files"].values()):
            out[f["digest"]] = f["size"]
    return out


def _safe_target(root: Path, rel: str) -> Path:
    """root/rel, its parent folders made; refused if a symlink (or a file) is on the way."""
    d = root
    for part in rel.split("/")[:-1]:
        d = d / part
        try:
            st = d.lstat()
        except FileNotFoundError:
            d.mkdir()
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _Refused(f"{d} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a directory'}")
    target = d / rel.split("/")[-1]
    if target.is_symlink():
        raise _Refused(f"{target} is a symlink")
    return target


def _files(top: Path):
    """(path, lstat) of every regular file below ``top``."""
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield p, st


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _already_there(e: BaseException) -> bool:
    """A create-only write refused because the object exists: FileExistsError (moto's answer, through s3fs),
    or any 412 Precondition Failed, whatever its body says (SeaweedFS sends no <Condition>, and s3fs then
    raises a plain OSError)."""
    for x in _chain(e):
        if isinstance(x, FileExistsError):
            return True
        response = getattr(x, "response", None)
        if isinstance(response, dict):
            meta, err = response.get("ResponseMetadata") or {}, response.get("Error") or {}
            if meta.get("HTTPStatusCode") == 412 or err.get("Code") in ("PreconditionFailed", "412"):
                return True
    return False


def _unreachable(e: BaseException) -> bool:
    """The store cannot be reached at all (refused, timed out, no such host), as opposed to one refused request."""
    for x in _chain(e):
        if isinstance(x, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        name = type(x).__name__
        if any(w in name for w in ("EndpointConnectionError", "ConnectTimeout", "ConnectionClosed", "ClientConnector",
                                   "ServerTimeout", "ReadTimeout", "ServerDisconnected")):
            return True
    return False


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# --- CLI ---------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes from "500000000", "500M", "20G"."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text, re.I)
    if not m:
        raise ExportError(f"not a size: {text!r} (e.g. 500000000, 500M, 20G)", field="--max-bytes")
    return int(m[1]) * 1024 ** "_kmgt".index(m[2].lower() or "_")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _keep_keys(path: str | None) -> set[str]:
    if path is None:
        return set()
    try:
        keys = json.loads(Path(path).read_text())
    except OSError as e:
        raise ExportError(f"cannot read: {e.strerror}", file=path, field="keep keys") from None
    except ValueError as e:
        raise ExportError(f"not JSON: {e}", file=path, field="keep keys") from None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ExportError("must be a JSON list of action keys (strings)", file=path, field="keep keys")
    return set(keys)


def _last_build(artifacts: str) -> str | None:
    path = Path(artifacts) / LAST_BUILD
    if not path.exists():
        return None
    statuses = [t["status"] for t in read_last_build(artifacts)["tasks"].values()]
    restored, built = statuses.count("restored"), statuses.count("built")
    rate = f"{restored / (restored + built):.0%}" if restored + built else "n/a"
    return (f"last build ({path}): {restored} restored, {built} built, {statuses.count('up-to-date')} up to date, "
            f"{statuses.count('failed')} failed; hit rate {rate}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.cache", description="Inspect or shrink the artifact cache.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--local", help="the local cache folder (default: $MODEL_EXPORT_CACHE or ~/.cache/model-export)")
    common.add_argument("--remote", help="a remote store (fsspec URL); $MODEL_EXPORT_REMOTE_CACHE overrides")
    sub = p.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", parents=[common], help="entries, size, and the last build's hit rate")
    show.add_argument("--artifacts", help="the artifacts folder holding last_build.json")
    gc = sub.add_parser("gc", parents=[common], help="delete what is not kept (local cache only)")
    gc.add_argument("--max-bytes", help="size bound for the entries kept beyond the keep keys (500M, 20G...)")
    gc.add_argument("--keep-keys-file", help="JSON list of the action keys to keep (the current config's)")
    gc.add_argument("--grace", type=float, default=GRACE_SECONDS, help="never delete blobs younger than this (s)")
    args = p.parse_args(argv)
    with cli_errors():
        cache = Cache.from_settings(local=args.local, remote=args.remote if args.command == "show" else None,
                                    log=lambda line: print(line, file=sys.stderr))
        if args.command == "show":
            last = _last_build(args.artifacts) if args.artifacts else None
            s = cache.stats()
            print(f"local {cache.root}: {s['entries']} entries, {s['blobs']} blobs, {_human(s['bytes'])}")
            r = s.get("remote")
            if r is not None:
                print(f"remote {cache.remote_url}: " + (f"unavailable ({r['error']})" if "error" in r else
                      f"{r['entries']} entries, {r['blobs']} blobs, {_human(r['bytes'])}"))
            if last:
                print(last)
        else:
            max_bytes = None if args.max_bytes is None else parse_size(args.max_bytes)
            keep = _keep_keys(args.keep_keys_file)
            r = cache.gc(keep_keys=keep, max_bytes=max_bytes, grace=args.grace)
            print(f"gc {cache.root}: kept {r['kept']} entries; deleted {r['deleted_entries']} entries, "
                  f"{r['deleted_blobs']} blobs ({_human(r['freed_bytes'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
