"""Per-(mode, T) packages of one model -> one multifunction ``<model>.mlpackage``
(one function per (mode, T), named ``prefill_T2048``, ``decode_T512``, ...; the
first is the default) + the aggregate ``contract.json`` describing every function.

    python -m export.bundle --packages coreml/prefill_T512.mlpackage coreml/decode_T512.mlpackage \\
        --contracts exported/prefill_T512.contract.json exported/decode_T512.contract.json \\
        --out coreml/student.mlpackage [--contract-out coreml/contract.json]

``ct.utils.save_multifunction`` stores identical weights once and drops user
metadata, which is set again; the result is canonicalized like every package.

Its weight file is the leaves' own when it can be (``share_leaf_weights``): the
(mode, T) packages of a model have byte-identical ``weight.bin`` files, and the
merge writes the same blobs less the duplicates its constant deduplication drops
(within one function too: equal norm weights, say), so it is a different file of
the same weights. The bundle's constants are pointed at the same blobs in the
leaves' file, which then becomes the bundle's: the build's store keeps one file.
"""
from __future__ import annotations

import argparse
import copy
import errno
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path

import xxhash

from .. import atomic
from .. import contract as contract_mod
from ..atomic import atomic_path
from .checks import check_device_limits
from .spec import check_spec
from ..digest import bytes_digest, file_digest
from ..errors import ExportError, cli_errors
from .mlpackage import METADATA_PREFIX, canonicalize, package_digest, read_spec, set_model_metadata
from ..stepdefs import STEPS
from ..toolchain import versions



def _inputs(packages: list[Path], contracts: list[Path]) -> list[tuple[str, Path, dict]]:
    if len(packages) != len(contracts) or not packages:
        raise ExportError(f"need one contract per package, got {len(packages)} packages and {len(contracts)} contracts",
                          field="--contracts")
    out, seen = [], set()
    for pkg, cpath in zip(packages, contracts):
        c = contract_mod.read(cpath)
        name = contract_mod.entry_name(c["mode"], c["T"])
        if name in seen:
            raise ExportError(f"two packages for function {name}", file=cpath, field="mode")
        seen.add(name)
        if not (pkg / "Manifest.json").is_file():
            raise ExportError("not an .mlpackage (no Manifest.json)", file=pkg, field="--packages")
        check_spec(c, read_spec(pkg), file=pkg)
        out.append((name, pkg, c))
    models = {c["model"] for _, _, c in out}
    checkpoints = {c["checkpoint"]["digest"] for _, _, c in out}
    if len(models) > 1 or len(checkpoints) > 1:
        raise ExportError(f"packages come from different models or checkpoints ({sorted(models)}, {len(checkpoints)} checkpoints)",
                          field="--packages")
    return out


def _options(package: Path) -> str:
    return read_spec(package).description.metadata.userDefined.get(METADATA_PREFIX + "options", "{}")


def _recipe(package: Path) -> str:
    return read_spec(package).description.metadata.userDefined.get(METADATA_PREFIX + "recipe", "")


def bundle(packages: list[Path], contracts: list[Path], out: Path, contract_out: Path | None = None, *,
           model_metadata: dict[str, str] | None = None, files: list[Path] = (), files_out: Path | None = None,
           device_limits: dict | None = None) -> dict:
    """Merge ``packages`` (with their per-(mode, T) ``contracts``, same order) into ``out``; write the
    aggregate contract to ``contract_out`` (default ``contract.json`` beside ``out``); return it.

    ``model_metadata``: the package's own fields (author, license, version, short_description), set after
    the merge (``save_multifunction`` drops them). ``files``: copied into ``files_out`` (the tokenizer and
    generation config of a transformers model) and listed with their digests under ``files``.
    ``device_limits``: ``{"target", "policy"}``; policy "fail" refuses a bundle over a limit of the target's
    devices before it appears (export/coreml/checks.py)."""
    import coremltools as ct

    out = Path(out)
    contract_out = Path(contract_out) if contract_out else out.with_name("contract.json")
    if out.suffix != ".mlpackage":
        raise ExportError(f"the output must be a .mlpackage folder, got {out.name!r}", file=out, field="--out")
    entries = _inputs([Path(p) for p in packages], [Path(c) for c in contracts])
    agg = contract_mod.aggregate([c for _, _, c in entries])
    if files:
        agg["files"] = {Path(f).name: {"file": Path(f).name, "digest": file_digest(Path(f))} for f in files}
    contract_mod.validate(agg, file=contract_out, aggregate=True)
    desc = ct.utils.MultiFunctionDescriptor()
    for name, pkg, _ in entries:
        desc.add_function(str(pkg), src_function_name="main", target_function_name=name)
    desc.default_function_name = entries[0][0]
    meta = {
        METADATA_PREFIX + "contract_digest": bytes_digest(contract_mod.dumps(agg).encode()),
        METADATA_PREFIX + "checkpoint_digest": entries[0][2]["checkpoint"]["digest"],
        METADATA_PREFIX + "toolchain": json.dumps(versions(STEPS["bundle_coreml"].tools), sort_keys=True),
        METADATA_PREFIX + "options": _options(entries[0][1]),
        **({METADATA_PREFIX + "recipe": _recipe(entries[0][1])} if _recipe(entries[0][1]) else {}),
        METADATA_PREFIX + "functions": ",".join(name for name, _, _ in entries),
    }
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".merge", dir=_parent(out)))
    try:
        merged = scratch / out.name
        try:
            ct.utils.save_multifunction(desc, str(merged))
        except Exception as e:  # coremltools raises anything from deep inside; keep its first line
            _no_space(e, out)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            hint = (" (compressed packages merge only when converted for iOS18/macOS15 or later)"
                    if "constexpr" in first else "")
            raise ExportError(f"coremltools could not merge the packages: {first}{hint}", file=out, field="functions") from None
        try:
            with atomic_path(out, is_dir=True) as tmp:
                shutil.copytree(merged, tmp, dirs_exist_ok=True)
                spec = read_spec(tmp)
                share_leaf_weights(spec, tmp, [pkg for _, pkg, _ in entries])
                set_model_metadata(spec, model_metadata or {})
                canonicalize(tmp, meta, spec=spec)
                spec = read_spec(tmp)
                for name, _, c in entries:
                    check_spec(c, spec, file=out, function=name)
                if device_limits is not None:
                    check_device_limits(tmp, device_limits["target"], device_limits["policy"], file=out)
        except OSError as e:
            _no_space(e, out)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for f in files:
        dest = Path(files_out or out.parent) / Path(f).name
        atomic.write_bytes(dest, Path(f).read_bytes())
    contract_mod.write(contract_out, agg, aggregate=True)
    return agg


WEIGHT_FILE = "weights/weight.bin"  # under Data/com.apple.CoreML/ of a package; "@model_path/..." in its spec
_BLOB_SENTINEL = 0xDEADBEEF


def _weight_file(package: Path) -> Path:
    return Path(package) / "Data" / "com.apple.CoreML" / WEIGHT_FILE


def _header(path: Path, offset: int) -> bytes:
    """The 64-byte header of the blob at ``offset`` of a weight file."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(64)


def _blobs(path: Path) -> dict[int, tuple[bytes, str]] | None:
    """Each blob of a weight file (coremltools' mil/storage layout: a 64-byte file header with the blob count,
    then per blob a 64-byte header (sentinel, data type, size, data offset, ...) and its data, 64-byte
    aligned), by the offset of its header: (its header but the data offset, the xxh3 of its data). None when
    the file is not laid out so."""
    try:
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    view = memoryview(m)
    try:
        out, pos = {}, 64
        (count,) = struct.unpack_from("<I", m, 0)
        for _ in range(count):
            if pos + 64 > len(m):
                return None
            sentinel, _, size, data = struct.unpack_from("<IIQQ", m, pos)
            if sentinel != _BLOB_SENTINEL or data < pos + 64 or data + size > len(m):
                return None
            out[pos] = (bytes(view[pos:pos + 16]) + bytes(view[pos + 24:pos + 64]),
                        xxhash.xxh3_128_hexdigest(view[data:data + size]))
            pos = data + size + (-(data + size) % 64)
        return out
    except struct.error:
        return None
    finally:
        view.release()
        m.close()


def _blob_values(msg):
    """Every MIL ``Value`` held in a weight file under ``msg`` (a model spec's program: const values,
    constexpr data)."""
    for field, value in msg.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        kind = field.message_type
        if kind.GetOptions().map_entry:
            kind = kind.fields_by_name["value"].message_type
            if kind is None:  # a map of scalars
                continue
            items = [value[k] for k in value]  # by key: the map's own messages (values() may give copies)
        elif hasattr(value, "ListFields"):
            items = (value,)
        else:  # a repeated field
            items = value
        for item in items:
            if kind.full_name == "CoreML.Specification.MILSpec.Value" and item.WhichOneof("value") == "blobFileValue":
                yield item
            else:
                yield from _blob_values(item)


INLINE_MAX = 4096  # bytes: the most a constant the leaves hold in their spec may take (T-sized index vectors)
_NUMPY = {"FLOAT16": "<f2", "FLOAT32": "<f4", "INT8": "i1", "UINT8": "u1", "INT16": "<i2", "UINT16": "<u2",
          "INT32": "<i4", "UINT32": "<u4"}


def _inline(value, data: bytes) -> bool:
    """Make ``value`` (held in a weight file) hold ``data`` in the spec, as a leaf converted for an older
    deployment target holds it (coremltools keeps integer constants out of the weight file before iOS18,
    and the merge is iOS18): False if its type is not one of those."""
    import numpy as np
    from coremltools.converters.mil.backend.mil.helper import create_tensor_value
    from coremltools.proto import MIL_pb2

    t = value.type.tensorType
    dtype = _NUMPY.get(MIL_pb2.DataType.Name(t.dataType))
    shape = [d.constant.size for d in t.dimensions]
    if dtype is None or any(d.WhichOneof("dimension") != "constant" for d in t.dimensions):
        return False
    array = np.frombuffer(data, dtype=dtype)
    if array.size != int(np.prod(shape)):
        return False
    made = create_tensor_value(array.reshape(shape).astype(array.dtype.newbyteorder("=")))
    if made.type != value.type:
        return False
    value.ClearField("blobFileValue")
    value.immediateValue.CopyFrom(made.immediateValue)
    return True


def share_leaf_weights(spec, package: Path, leaves: list[Path]) -> bool:
    """Make the merged ``package`` (its ``spec``, changed in place and written by the caller) use its leaves'
    weight file, when they all have the same one and it holds every blob the merge wrote (each blob the same
    header and bytes) but small constants the leaves hold in their spec (the merge is iOS18, which puts integer
    constants in the weight file: T-sized index vectors of a decode). The spec's constants point at the same
    blobs in the leaves' file (the small ones are held in the spec, as in the leaves) and that file replaces
    the merge's. The values of every constant are unchanged (verify_coreml:<model> checks each function against
    its leaf, bit for bit). False, and nothing changed, when they cannot."""
    mine = _weight_file(package)
    files = [_weight_file(p) for p in leaves]
    if not mine.is_file() or not all(f.is_file() for f in files):
        return False
    first = files[0]
    st = first.stat()
    for f in files[1:]:
        o = f.stat()
        if (o.st_dev, o.st_ino) != (st.st_dev, st.st_ino) and (o.st_size != st.st_size or file_digest(f) != file_digest(first)):
            return False
    merged, theirs = _blobs(mine), _blobs(first)
    if merged is None or theirs is None:
        return False
    where: dict[tuple[bytes, str], int] = {}
    for offset, key in theirs.items():
        where.setdefault(key, offset)  # the first of equal blobs, as the leaves' own constants would point
    values = [v for v in _blob_values(spec.mlProgram) if v.blobFileValue.fileName == "@model_path/" + WEIGHT_FILE]
    if not values:
        return False
    moved, inline = [], []
    for v in values:
        offset = int(v.blobFileValue.offset)
        key = merged.get(offset)
        if key is None:
            return False
        if key in where:
            moved.append((v, where[key]))
        else:  # not in the leaves' file: a small constant their spec holds itself, or no sharing
            _, _, size, start = struct.unpack_from("<IIQQ", _header(mine, offset))
            if size > INLINE_MAX:
                return False
            with open(mine, "rb") as f:
                f.seek(start)
                inline.append((v, f.read(size)))
    trial = [copy.deepcopy(v) for v, _ in inline]  # nothing changes unless every one can be held inline
    if not all(_inline(t, data) for t, (_, data) in zip(trial, inline)):
        return False
    for (v, _), t in zip(inline, trial):
        v.CopyFrom(t)
    for v, offset in moved:
        v.blobFileValue.offset = offset
    tmp = mine.with_name(mine.name + ".leaves")
    shutil.copyfile(first, tmp)
    os.replace(tmp, mine)
    return True


def write_chain(chain: list[dict], contract_out: Path, *, model: str, architecture: str, files: list[Path] = (),
                files_out: Path | None = None) -> dict:
    """A parted model's contract.json: its parts in chain order (``chain``: each part's aggregate contract path,
    its bundle's and its contract's names relative to the model folder), with what feeds what; the tokenizer
    files (``files``) copied beside it and listed with their digests."""
    parts = [(contract_mod.read(Path(link["contract"]), aggregate=True), link["bundle"], link["contract_name"])
             for link in chain]
    for agg, _, name in parts:
        if "part" not in agg:
            raise ExportError("not the contract of a part", file=name, field="part")
    data = contract_mod.chain_contract(model, architecture, parts)
    if files:
        data["files"] = {Path(f).name: {"file": Path(f).name, "digest": file_digest(Path(f))} for f in files}
    contract_mod.validate(data, file=contract_out, chain=True)
    for f in files:
        atomic.write_bytes(Path(files_out or contract_out.parent) / Path(f).name, Path(f).read_bytes())
    contract_mod.write(contract_out, data, chain=True)
    return data


def _no_space(e: BaseException, out: Path) -> None:
    """A full disk while merging or copying (shutil.copytree gathers its errors in a list): one clear error."""
    full = f"[Errno {errno.ENOSPC}]"
    if getattr(e, "errno", None) == errno.ENOSPC:
        where = e.filename or out
    elif isinstance(e, shutil.Error) and full in str(e):
        where = next((dst for _, dst, why in e.args[0] if full in str(why)), out)
    else:
        return
    raise ExportError(f"No space left on device (writing {where})", file=out, field="output folder") from None


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


class _Args(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def main(argv=None) -> None:
    p = _Args(prog="python -m export.bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--packages", nargs="+", required=True, type=Path, help="per-(mode, T) .mlpackage folders")
    p.add_argument("--contracts", nargs="+", required=True, type=Path, help="their per-(mode, T) contracts, same order")
    p.add_argument("--out", required=True, type=Path, help="<model>.mlpackage")
    p.add_argument("--contract-out", type=Path, help="aggregate contract (default: contract.json beside --out)")
    args = p.parse_args(argv)
    logging.getLogger("coremltools").setLevel(logging.ERROR)  # import-time warnings are not errors
    with cli_errors():
        agg = bundle(args.packages, args.contracts, args.out, args.contract_out)
        print(f"{args.out} {package_digest(args.out)} functions: {', '.join(agg['functions'])}")


if __name__ == "__main__":
    main()
