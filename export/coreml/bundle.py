"""Per-(mode, T) packages of one model -> one multifunction ``<model>.mlpackage``
(one function per (mode, T), named ``prefill_T2048``, ``decode_T512``, ...; the
first is the default) + the aggregate ``contract.json`` describing every function.

    python -m export.bundle --packages coreml/prefill_T512.mlpackage coreml/decode_T512.mlpackage \\
        --contracts exported/prefill_T512.contract.json exported/decode_T512.contract.json \\
        --out coreml/student.mlpackage [--contract-out coreml/contract.json]

``ct.utils.save_multifunction`` stores identical weights once and drops user
metadata, which is set again; the result is canonicalized like every package.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import shutil
import tempfile
from pathlib import Path

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
