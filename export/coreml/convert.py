"""Exported program (TorchScript ``.pt`` or ExportedProgram ``.pt2``) + its
per-(mode, T) contract -> a byte-stable Core ML ``.mlpackage``.

    python -m export.convert_coreml --backend pytorch --in exported/prefill_T512.pt \\
        --out coreml/prefill_T512.mlpackage --contract exported/prefill_T512.contract.json

Inputs, outputs and states are named and typed as the contract says. Before
converting: the file must be readable and the one the contract lists (digest),
its signature must match, and every op must have a coremltools converter
(unsupported ops are listed by name). After: the package's spec must match the
contract, no constant may be NaN/Inf; on macOS predictions and compilation are
checked too. The package is canonicalized (see ``mlpackage``) and appears
atomically; nothing half-written is left on failure.

Python API for the build graph: ``convert(exported, out, contract_path, options)``
and ``mlpackage.package_digest(out)``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .. import contract as contract_mod
from .. import program_weights
from ..atomic import atomic_path
from .checks import check_device_limits, check_finite, check_on_device, check_supported
from .options import CHOICES, STATEFUL_TARGETS, CoreMLOptions
from .spec import check_spec
from .fp16_overflow import lean_fp16_overflow
from .weight_file import integer_constants_inline
from ..digest import file_digest
from ..errors import ExportError, cli_errors
from .mlpackage import METADATA_PREFIX, canonicalize, package_digest
from ..stepdefs import STEPS
from ..toolchain import versions

NP_DTYPES = {"int32": np.int32, "float16": np.float16, "float32": np.float32}
FORMAT_BY_SUFFIX = {suffix: fmt for fmt, suffix in contract_mod.FORMATS.items()}


__all__ = ["convert", "load_program", "package_digest", "CoreMLOptions"]


@contextmanager
def _quiet(logger: str):
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def load_program(path: Path | str, weights: Path | str | None = None):
    """``(format, program)``: a TorchScript module or an ExportedProgram in the inference dialect.

    ``weights``: the checkpoint an ExportedProgram saved by the build keeps its weights in
    (export/program_weights.py); a self-contained file needs none."""
    path = Path(path)
    fmt = FORMAT_BY_SUFFIX.get(path.suffix)
    if fmt is None:
        raise ExportError(f"expected a .pt (TorchScript) or .pt2 (ExportedProgram) file, got {path.suffix!r}", file=path, field="--in")
    if not path.is_file():
        raise ExportError("no such exported file", file=path, field="--in")
    try:
        if fmt == "torchscript":
            return fmt, torch.jit.load(str(path), map_location="cpu").eval()
        with warnings.catch_warnings(), _quiet("torch.export"):  # torch logs a damaged archive's traceback
            warnings.simplefilter("ignore")
            ep = program_weights.load(path, weights)
        return fmt, inference_dialect(ep)
    except ExportError:
        raise
    except Exception as e:  # torch raises many types for a damaged archive
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"not a readable {fmt} file (corrupt or truncated): {first}", file=path, field="--in") from None


def inference_dialect(ep):
    """torch.export gives the training dialect; coremltools converts the inference one."""
    return ep.run_decompositions({})


def _check_matches_contract(path: Path, fmt: str, program, c: dict, contract_path: Path) -> None:
    listed = c["exports"].get(fmt)
    if listed is None:
        raise ExportError(f"the contract lists no {fmt} export (it lists {sorted(c['exports'])})", file=contract_path, field="exports")
    digest = file_digest(path)
    if digest != listed["digest"]:
        raise ExportError(f"{path.name} (digest {digest}) is not the program this contract describes "
                          f"({listed['file']}, digest {listed['digest']})", file=contract_path, field=f"exports.{fmt}.digest")
    if isinstance(program, torch.export.ExportedProgram):
        have = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
        shapes = [[int(s) for s in n.meta["val"].shape] for n in have]
    else:
        have = list(program.graph.inputs())[1:]  # the first is self
        shapes = None
    if len(have) != len(c["inputs"]):
        raise ExportError(f"the program takes {len(have)} inputs, the contract lists {len(c['inputs'])}", file=contract_path, field="inputs")
    for i, t in enumerate(c["inputs"]):
        if shapes is not None and shapes[i] != list(t["shape"]):
            raise ExportError(f"shape {t['shape']} differs from the program's {shapes[i]}", file=contract_path, field=f"inputs.{t['name']}.shape")


def _check_options(c: dict, options: CoreMLOptions, contract_path: Path) -> None:
    if c["states"] and options.minimum_deployment_target not in STATEFUL_TARGETS:
        raise ExportError(f"the program keeps its KV cache in states, which need minimum_deployment_target in "
                          f"{list(STATEFUL_TARGETS)}, got {options.minimum_deployment_target!r}",
                          file=contract_path, field="minimum_deployment_target")
    if c["states"] and options.kv_cache != "state":
        raise ExportError("the contract declares states (a stateful KV cache) but the options say kv_cache='explicit'",
                          file=contract_path, field="kv_cache")
    if c["states"] and options.compute_precision != "fp16":
        raise ExportError("a stateful KV cache needs fp16 state: use compute_precision fp16", file=contract_path, field="compute_precision")


ROTARY_OPS = ("sin", "cos")
_ROTARY_DEPTH = 8  # ops between a position input and its sin/cos (cast, expand_dims, mul, concat, ...)


def fp16_op(op) -> bool:
    """compute_precision="fp16" casts every op to fp16 except the rotary angles and their sin/cos, which stay fp32.

    In fp16 an angle ``position * frequency`` near 511 is rounded to 0.25 rad and positions above 2048 collide:
    the K of a T=512 prefill came out 10% of its scale away from the program's (measured by the numerical
    verification, bench/bench_verify.py). The angles are the ancestors of a sin/cos op (a few ops on the
    position input); their results are cast to fp16 where fp16 ops use them."""
    return not _feeds_rotary(op, _ROTARY_DEPTH)


def _feeds_rotary(op, depth: int) -> bool:
    if op.op_type in ROTARY_OPS:
        return True
    if depth == 0:
        return False
    return any(_feeds_rotary(child, depth - 1) for v in op.outputs for child in v.child_ops)


def _ct_convert(program, c: dict, options: CoreMLOptions):
    import coremltools as ct

    from . import torch_ops  # noqa: F401  (our op converters; imported here to keep coremltools lazy)

    def tensor(t, named=True):
        return ct.TensorType(name=t["name"] if named else None, shape=tuple(t["shape"]), dtype=NP_DTYPES[t["dtype"]])

    kwargs = dict(
        inputs=[tensor(t) for t in c["inputs"]],
        outputs=[ct.TensorType(name=t["name"], dtype=NP_DTYPES[t["dtype"]]) for t in c["outputs"]],
        minimum_deployment_target=getattr(ct.target, options.minimum_deployment_target),
        compute_precision=(ct.transform.FP16ComputePrecision(op_selector=fp16_op)
                           if options.compute_precision == "fp16" else ct.precision.FLOAT32),
        compute_units=getattr(ct.ComputeUnit, options.compute_units.upper()),
        convert_to="mlprogram", skip_model_load=True,
    )
    if c["states"]:
        kwargs["states"] = [ct.StateType(wrapped_type=tensor(t, named=False), name=t["name"]) for t in c["states"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(program, **kwargs)


def _compress(mlmodel, options: CoreMLOptions):
    if options.compression == "none":
        return mlmodel
    from coremltools.optimize import coreml as cto

    if options.compression == "palettize":
        # "uniform": k-means would need scikit-learn, and a seeded k-means is one more thing to keep reproducible
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(nbits=options.palettize_bits, mode="uniform"))
        return cto.palettize_weights(mlmodel, config)
    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"))
    return cto.linear_quantize_weights(mlmodel, config)


def metadata(c: dict, contract_path: Path, options: CoreMLOptions) -> dict[str, str]:
    """The user metadata every package carries (set again on the bundle after merging)."""
    return {
        METADATA_PREFIX + "contract_digest": file_digest(contract_path),
        METADATA_PREFIX + "checkpoint_digest": c["checkpoint"]["digest"],
        METADATA_PREFIX + "toolchain": json.dumps(versions(STEPS["convert_coreml"].tools), sort_keys=True),
        METADATA_PREFIX + "options": json.dumps(options.to_json(), sort_keys=True),
        METADATA_PREFIX + "function": contract_mod.entry_name(c["mode"], c["T"]),
    }


def _options(options) -> CoreMLOptions:
    if options is None:
        return CoreMLOptions()
    data = options.to_json() if isinstance(options, CoreMLOptions) else options
    return CoreMLOptions.from_dict(data, field="options")


def convert(exported: Path | str, out: Path | str, contract_path: Path | str,
            options: CoreMLOptions | dict | None = None, *, log=print, program=None,
            weights: Path | str | None = None, device_limits: str | None = None) -> Path:
    """Convert one exported program to ``out`` (a ``.mlpackage`` folder, written atomically); return ``out``.

    ``weights``: the checkpoint whose tensors the ``.pt2`` refers to (export/program_weights.py).
    ``device_limits``: "fail" refuses, before it appears, a package over a limit of its deployment target's
    devices (export/coreml/checks.py, ``check_device_limits``).

    ``program``: the ExportedProgram whose bytes ``exported`` holds, still in memory (the worker that
    just exported it); it spares loading the file again. Its digest is still checked against the contract.
    """
    exported, out, contract_path = Path(exported), Path(out), Path(contract_path)
    opts = _options(options)
    if out.suffix != ".mlpackage":
        raise ExportError(f"the output must be a .mlpackage folder, got {out.name!r}", file=out, field="--out")
    c = contract_mod.read(contract_path)
    _check_options(c, opts, contract_path)
    if program is None:
        fmt, program = load_program(exported, weights)
    else:
        fmt, program = "exported_program", inference_dialect(program)
    _check_matches_contract(exported, fmt, program, c, contract_path)
    check_supported(program, file=exported)
    try:
        # every T's leaf gets the same weight file on iOS18 too (weight_file.py); the fp16 pass's overflow check
        # does not take 8x an embedding table (fp16_overflow.py)
        with integer_constants_inline(), lean_fp16_overflow():
            mlmodel = _ct_convert(program, c, opts)
    except ExportError:
        raise
    except Exception as e:  # coremltools raises anything from deep inside; keep its first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"coremltools could not convert the program: {type(e).__name__}: {first}", file=exported, field="conversion") from None
    with integer_constants_inline():
        mlmodel = _compress(mlmodel, opts)
    spec = mlmodel.get_spec()
    check_spec(c, spec, file=out)
    check_finite(mlmodel, file=out)
    with atomic_path(out, is_dir=True) as tmp:
        shutil.copytree(mlmodel.package_path, tmp, dirs_exist_ok=True)
        canonicalize(tmp, metadata(c, contract_path, opts), spec=spec)
        check_device_limits(tmp, opts.minimum_deployment_target, device_limits, file=out)
        example = _example(c)
        log(check_on_device(tmp, program, example, c, file=out))
    return out


def _example(c: dict) -> tuple:
    """Valid inputs from the contract alone: zeros for ids, positions 0..n-1, small noise for floats."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in c["inputs"]:
        shape = tuple(t["shape"])
        if t["name"] == "position_ids":
            out.append(torch.arange(shape[-1], dtype=torch.int32).expand(shape).contiguous())
        elif t["dtype"] == "int32":
            out.append(torch.ones(shape, dtype=torch.int32))
        else:
            out.append(torch.randn(shape, generator=gen).to(getattr(torch, t["dtype"])))
    return tuple(out)


class _Args(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other bad input
        self.exit(2, f"error: {self.prog}: {message}\n")


def add_option_flags(p: argparse.ArgumentParser) -> None:
    d = CoreMLOptions()
    p.add_argument("--precision", dest="compute_precision", default=d.compute_precision, choices=CHOICES["compute_precision"])
    p.add_argument("--target", dest="minimum_deployment_target", default=d.minimum_deployment_target,
                   choices=CHOICES["minimum_deployment_target"], help="minimum deployment target")
    p.add_argument("--compute-units", default=d.compute_units, choices=CHOICES["compute_units"])
    p.add_argument("--kv-cache", default=d.kv_cache, choices=CHOICES["kv_cache"],
                   help="must match the export: 'state' for programs exported with --kv-cache state")
    p.add_argument("--compression", default=d.compression, choices=CHOICES["compression"])
    p.add_argument("--palettize-bits", type=int, default=d.palettize_bits, choices=CHOICES["palettize_bits"])


def quiet_coremltools() -> None:
    """Keep coremltools' import-time warnings (no macOS runtime, untested torch) off a CLI's stderr."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)


def options_from_args(args) -> CoreMLOptions:
    return CoreMLOptions.from_dict({k: getattr(args, k) for k in CHOICES}, file="command line", field="options")


def main(argv=None) -> None:
    p = _Args(prog="python -m export.convert_coreml", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="pytorch", choices=["pytorch"])
    p.add_argument("--in", dest="exported", required=True, type=Path, help="exported .pt (TorchScript) or .pt2 (ExportedProgram)")
    p.add_argument("--out", required=True, type=Path, help="<name>.mlpackage")
    p.add_argument("--contract", required=True, type=Path, help="the per-(mode, T) contract of the exported file")
    p.add_argument("--weights", type=Path, default=None,
                   help="the checkpoint a .pt2 written by the build keeps its weights in (not needed for a "
                        "self-contained .pt2, as python -m export.export_pytorch writes)")
    add_option_flags(p)
    args = p.parse_args(argv)
    quiet_coremltools()
    with cli_errors():
        out = convert(args.exported, args.out, args.contract, options_from_args(args),
                      log=lambda msg: print(msg, file=sys.stderr), weights=args.weights)
        print(f"{out} {package_digest(out)}")


if __name__ == "__main__":
    main()
