"""Checkpoint -> exported programs per (mode, T) + contracts.

For every (mode, T): ``<mode>_T<n>.pt`` (TorchScript), ``<mode>_T<n>.pt2``
(ExportedProgram) and ``<mode>_T<n>.contract.json``; the CLI also writes the
aggregate ``contract.json``. Exports are byte-stable: the same checkpoint and
toolchain give the same bytes in any process (see ``_canonical_torchscript``).

    python -m export.export_pytorch --checkpoint ck.pt --out exported/ \\
        --mode both --enumerated-T 512 1024 2048
"""
from __future__ import annotations

import argparse
import copy
import contextlib
import io
import re
import zipfile
from pathlib import Path

import torch

from . import atomic, checkpoint_files, contract, program_weights, shape_sets
from .checkpoint import Loaded, load
from .digest import bytes_digest
from .errors import ExportError, cli_errors
from .provenance import portable_source
from .stepdefs import STEPS
from .toolchain import versions

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "float32": torch.float32, "float16": torch.float16}
EXAMPLE_SEED = 0


def _dtype_name(dtype: str) -> str:
    return {"fp32": "float32", "fp16": "float16"}.get(dtype, dtype)


def _canonical_torchscript(data: bytes) -> bytes:
    """Make a ``torch.jit.save`` archive byte-stable.

    TorchScript names classes ``___torch_mangle_N`` with a per-process counter,
    and its debug tables hold absolute source paths. Renumber the mangles in
    order of first appearance, drop the optional ``*.debug_pkl`` tables
    (TorchScript loads without them) and derive ``.data/serialization_id`` from
    the remaining content. Rewrites keep pickles valid because renumbered names
    keep their length (numbers are zero-padded to the width they replace).
    """
    src = zipfile.ZipFile(io.BytesIO(data))
    entries = [(i, src.read(i.filename)) for i in src.infolist() if not i.filename.endswith(".debug_pkl")]
    content_id = str(int(bytes_digest(b"".join(b for i, b in entries if not i.filename.endswith("serialization_id"))), 16))
    mangles: dict[bytes, bytes] = {}
    pat = re.compile(rb"___torch_mangle_(\d+)")
    for _, blob in entries:
        for m in pat.finditer(blob):
            mangles.setdefault(m.group(1), b"")
    for n, old in enumerate(mangles):
        mangles[old] = str(n).zfill(len(old)).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info, blob in entries:
            name = info.filename
            if mangles:
                blob = pat.sub(lambda m: b"___torch_mangle_" + mangles[m.group(1)], blob)
                name = pat.sub(lambda m: b"___torch_mangle_" + mangles[m.group(1)], name.encode()).decode()
            if name.endswith("/.data/serialization_id"):
                blob = content_id.zfill(40).encode()
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            dst.writestr(zi, blob)
    return out.getvalue()


@contextlib.contextmanager
def _fresh_type_names():
    """Trace as if first in the process. Submodule types are named in the global
    ``torch.jit._state._python_cu`` (not the ``_compilation_unit`` passed to trace),
    whose mangle counter and taken names grow with every trace: a later export
    would name its classes differently (``Linear`` vs ``___torch_mangle_57.Linear``)."""
    import torch.jit._state as jit_state

    saved = jit_state._python_cu
    jit_state._python_cu = torch._C.CompilationUnit()
    try:
        yield
    finally:
        jit_state._python_cu = saved


def export_torchscript(wrapper, example) -> bytes:
    # check_trace=False: the default re-runs the whole forward pass to check the trace.
    with _fresh_type_names():
        traced = torch.jit.trace(wrapper, example, check_trace=False, strict=True, _store_inputs=False,
                                 _compilation_unit=torch._C.CompilationUnit())
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return _canonical_torchscript(buf.getvalue())


def export_program(wrapper, example, keep=None, weights: Path | str | None = None, hints: dict | None = None) -> bytes:
    """``torch.export`` traces with fake tensors: no real forward pass, whatever T is.

    ``keep(digest, program, size)``, if given, receives the program with the digest of its saved bytes
    (a worker that converts it next need not load the file again: export/runner/programs.py); ``size``
    counts the weights in memory, saved or not. ``weights``: the checkpoint the model was loaded from;
    the program is then saved without the weights that are its tensors (export/program_weights.py);
    ``hints``: which checkpoint tensor (and rows) each weight of the module is, if known (a part's)."""
    ep = torch.export.export(wrapper, example, strict=False)
    ep._example_inputs = None  # else every .pt2 stores its (T-sized) example K/V cache
    for node in ep.graph.nodes:  # absolute source paths would make the bytes depend on the checkout
        trace = portable_source(node.meta.pop("stack_trace", None))
        if trace:
            node.meta["stack_trace"] = trace  # the preflight says where an unsupported op comes from
    data, external = program_weights.save(ep, weights, hints)
    if keep is not None:
        keep(bytes_digest(data), ep, len(data) + external)
    return data


EXPORTERS = {"torchscript": export_torchscript, "exported_program": export_program}


def export_entry(ck: Loaded, model: torch.nn.Module, out_dir: Path, *, model_name: str, mode: str, T: int,
                 formats: list[str], dtype: str = "fp32",
                 checkpoint_digest: str | None = None, kv_cache: str = "explicit", keep=None,
                 external_weights: bool = False) -> dict:
    """Export one (mode, T) of a loaded model in each format; write its files and contract atomically.

    ``external_weights``: the ``.pt2`` keeps its weights in the checkpoint (what the build does: one copy
    of the weights on disk, export/program_weights.py); else it is self-contained (the CLI).

    ``kv_cache="state"``: modes with a cache keep it in buffers updated in place
    (the contract lists them as ``states``); modes without one are unchanged.
    """
    arch, dt = ck.arch, DTYPES[dtype]
    if mode not in arch.modes:
        raise ExportError(f"architecture {arch.name!r} has no mode {mode!r}; it has {list(arch.modes)}", file=ck.path, field="mode")
    shape_sets.check_ts([T], file=ck.path, field="T", max_positions=arch.max_positions(ck.config))
    spec = arch.io(ck.config, mode, T, _dtype_name(dtype), kv_cache=kv_cache)
    gen = torch.Generator().manual_seed(EXAMPLE_SEED)
    example = arch.example_inputs(ck.config, mode, T, dt, gen, kv_cache=kv_cache)
    typed = model if dt == torch.float32 else copy.deepcopy(model).to(dt)  # the caller's model stays fp32
    wrapper = arch.wrap(typed, mode, kv_cache=kv_cache, T=T).eval()
    blobs = {}
    with torch.no_grad():
        for fmt in formats:
            blobs[fmt] = (export_program(wrapper, example, keep, ck.path if external_weights else None)
                          if fmt == "exported_program" else EXPORTERS[fmt](wrapper, example))
    return _write_entry(out_dir, blobs, model_name=model_name, arch=arch, mode=mode, T=T, dtype=dtype, spec=spec,
                        checkpoint_digest=checkpoint_digest or checkpoint_files.digest(ck.path))


def export_part(checkpoint: Path | str, part: dict, out_dir: Path, *, model_name: str, mode: str, T: int,
                formats: list[str], dtype: str = "fp32", kv_cache: str = "explicit", loaded=None, keep=None,
                external_weights: bool = False) -> dict:
    """Export one part of a parted model (export/parts.py) at one (mode, T): its files and its contract, which
    names the part, its layers and its place in the chain. ``part``: ``Part.to_json()`` plus ``digest`` (its
    tensors' and the config's, export/parts.py ``part_digest``: the contract's checkpoint digest).
    ``loaded``: (architecture, config, module) of this part, if the caller has it (export/runner/checkpoints.py).
    ``external_weights``: the ``.pt2`` keeps the part's weights in the checkpoint (what the build does), each
    weight referring to the tensor (or the rows of a split head's piece) it was loaded from; else it is
    self-contained."""
    from . import parts as parts_mod
    from .checkpoint import load_part, part_sources
    from .models.decoder_lm import PartSpec, part_example_inputs, part_io, wrap_part

    arch, config, module = loaded or load_part(checkpoint, part)
    if mode not in arch.modes:
        raise ExportError(f"architecture {arch.name!r} has no mode {mode!r}; it has {list(arch.modes)}", file=checkpoint,
                          field="mode")
    shape_sets.check_ts([T], file=checkpoint, field="T", max_positions=arch.max_positions(config))
    spec_part, dt = PartSpec.from_json(part), DTYPES[dtype]
    d, hidden = module.dims, arch.hidden_size(config)
    spec = part_io(d, hidden, spec_part, mode, T, _dtype_name(dtype), kv_cache=kv_cache)
    example = part_example_inputs(d, hidden, spec_part, mode, T, dt, torch.Generator().manual_seed(EXAMPLE_SEED),
                                  kv_cache=kv_cache)
    typed = module if dt == torch.float32 else copy.deepcopy(module).to(dt)
    wrapper = wrap_part(typed, mode, kv_cache=kv_cache, T=T).eval()
    weights = checkpoint if external_weights and "exported_program" in formats else None
    hints = part_sources(module, parts_mod.index(checkpoint)) if weights is not None else None
    blobs = {}
    with torch.no_grad():
        for fmt in formats:
            blobs[fmt] = (export_program(wrapper, example, keep, weights, hints) if fmt == "exported_program"
                          else EXPORTERS[fmt](wrapper, example))
    return _write_entry(out_dir, blobs, model_name=model_name, arch=arch, mode=mode, T=T, dtype=dtype, spec=spec,
                        checkpoint_digest=part["digest"], part=contract.part_entry(part, vocab=d.vocab_size))


def _write_entry(out_dir: Path, blobs: dict[str, bytes], *, model_name: str, arch, mode: str, T: int, dtype: str, spec,
                 checkpoint_digest: str, part: dict | None = None) -> dict:
    """Write one (mode, T)'s exported files and then its contract (which commits the entry); the contract."""
    stem = contract.entry_name(mode, T)
    data = {
        "schema": contract.SCHEMA, "schema_version": contract.SCHEMA_VERSION,
        "model": model_name, "architecture": arch.name, "mode": mode, "T": T,
        "dtype": _dtype_name(dtype),
        "inputs": [t.to_json() for t in spec.inputs], "outputs": [t.to_json() for t in spec.outputs],
        "states": [t.to_json() for t in spec.states], "kv_cache": "state" if spec.states else "explicit",
        "exports": {fmt: {"file": stem + contract.FORMATS[fmt], "digest": bytes_digest(b)} for fmt, b in blobs.items()},
        "checkpoint": {"digest": checkpoint_digest},
        **({"part": part} if part is not None else {}),
        "toolchain": versions(STEPS["export_pytorch"].tools + arch.tools),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for fmt, blob in blobs.items():
        atomic.write_bytes(out_dir / (stem + contract.FORMATS[fmt]), blob)
    contract.write(out_dir / f"{stem}.contract.json", data)  # last: the contract commits the entry
    return data


def export_model(checkpoint: Path | str, out_dir: Path | str, *, modes: list[str] | None = None,
                 enumerated_T: list[int] | dict[str, list[int]] | None = None,
                 formats: list[str] = tuple(contract.FORMATS), dtype: str = "fp32",
                 model_name: str | None = None, shape_sets_file: Path | str | None = None,
                 shape_set: str | None = None, kv_cache: str = "explicit", external_weights: bool = False) -> dict:
    """Export every (mode, T) of a checkpoint; returns the aggregate contract (also written as contract.json).

    ``enumerated_T`` is a list (every mode) or a mode -> list mapping; by default
    the shape set named ``shape_set`` (else the architecture's name, else
    ``default``) of ``shape_sets_file`` (default ``./shape_sets.json``).
    """
    ck = load(checkpoint)
    out_dir = Path(out_dir)
    modes = list(modes or ck.arch.modes)
    name = model_name or ck.arch.name
    per_mode = _resolve_T(ck, modes, enumerated_T, shape_sets_file, shape_set)
    model = ck.model()  # before touching --out: bad weights must leave no output folder behind
    _check_writable(out_dir)
    digest = checkpoint_files.digest(ck.path)
    entries = [
        export_entry(ck, model, out_dir, model_name=name, mode=mode, T=T, formats=list(formats), dtype=dtype,
                     checkpoint_digest=digest, kv_cache=kv_cache, external_weights=external_weights)
        for mode in modes for T in per_mode[mode]
    ]
    agg = contract.aggregate(entries)
    contract.write(out_dir / "contract.json", agg, aggregate=True)
    return agg


def _resolve_T(ck: Loaded, modes, enumerated_T, shape_sets_file, shape_set) -> dict[str, list[int]]:
    for m in modes:
        if m not in ck.arch.modes:
            raise ExportError(f"architecture {ck.arch.name!r} has no mode {m!r}; it has {list(ck.arch.modes)}", file=ck.path, field="mode")
    maxpos = ck.arch.max_positions(ck.config)
    if enumerated_T is not None:
        table = enumerated_T if isinstance(enumerated_T, dict) else {m: list(enumerated_T) for m in modes}
        return {m: shape_sets.check_ts(table[m], file="--enumerated-T", field=m, max_positions=maxpos) for m in modes}
    path = Path(shape_sets_file or "shape_sets.json")
    sets = shape_sets.load(path)
    name = shape_set or (ck.arch.name if ck.arch.name in sets else "default")
    chosen = shape_sets.pick(sets, name, file=path)
    out = {}
    for m in modes:
        if m not in chosen:
            raise ExportError(f"shape set {name!r} lists no T for mode {m!r}", file=path, field=f"{name}.{m}")
        out[m] = shape_sets.check_ts(chosen[m], file=path, field=f"{name}.{m}", max_positions=maxpos)
    return out


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(out_dir / ".write-check") as tmp:
            tmp.write_bytes(b"")
        (out_dir / ".write-check").unlink()
    except ExportError:
        raise
    except OSError as e:
        raise ExportError(f"cannot write the output folder: {e.strerror}", file=out_dir, field="--out") from None


class _Args(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other bad input
        self.exit(2, f"error: {self.prog}: {message}\n")


def parse_T(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"T must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"T must be a positive integer, got {value}")
    return value


def main(argv=None) -> None:
    p = _Args(prog="python -m export.export_pytorch", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help=".pt or .safetensors checkpoint")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--mode", default="both", choices=["prefill", "decode", "both"],
                   help="'both' means every mode the architecture has")
    p.add_argument("--enumerated-T", nargs="+", type=parse_T, metavar="T",
                   help="sequence lengths (default: the model's shape set in shape_sets.json)")
    p.add_argument("--format", default="both", choices=[*contract.FORMATS, "both"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--kv-cache", default="explicit", choices=["explicit", "state"],
                   help="decode's K/V cache: inputs/outputs, or in-place buffers (Core ML states, iOS18+)")
    p.add_argument("--model-name", help="name recorded in the contracts (default: the architecture)")
    p.add_argument("--shape-sets", type=Path, help="shape sets file (default: ./shape_sets.json)")
    p.add_argument("--shape-set", help="which shape set (default: the architecture's name, else 'default')")
    p.add_argument("--external-weights", action="store_true",
                   help="save each .pt2 as the build does: its graph, referring to the checkpoint's tensors by digest "
                        "(convert or verify it with --weights CHECKPOINT); default: self-contained files")
    args = p.parse_args(argv)
    formats = list(contract.FORMATS) if args.format == "both" else [args.format]
    with cli_errors():
        modes = None if args.mode == "both" else [args.mode]
        agg = export_model(args.checkpoint, args.out, modes=modes, enumerated_T=args.enumerated_T, formats=formats,
                           dtype=args.dtype, model_name=args.model_name, shape_sets_file=args.shape_sets,
                           shape_set=args.shape_set, kv_cache=args.kv_cache, external_weights=args.external_weights)
        for name, c in agg["functions"].items():
            files = ", ".join(e["file"] for e in c["exports"].values())
            print(f"{name}: {files}")
        print(args.out / "contract.json")


if __name__ == "__main__":
    main()
