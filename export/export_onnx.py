"""Debug path: checkpoint -> ``<mode>_T<n>.onnx`` per (mode, T), checked against
the eager model with onnxruntime. Not part of the production build.

    python -m export.export_onnx --checkpoint ck.pt --out onnx/ --mode both --enumerated-T 512 1024
"""
from __future__ import annotations

import argparse
import io
import logging
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch

from . import contract
from .atomic import atomic_path
from .checkpoint import load
from .errors import ExportError, cli_errors
from .export_pytorch import EXAMPLE_SEED, _Args, parse_T

RTOL, ATOL = 1e-3, 1e-4


def export_entry(ck, model, out_dir: Path, mode: str, T: int, *, rtol: float = RTOL, atol: float = ATOL) -> Path:
    """Write ``<mode>_T<n>.onnx`` (atomically, only once it matches the eager model) and return its path."""
    arch = ck.arch
    if mode not in arch.modes:
        raise ExportError(f"architecture {arch.name!r} has no mode {mode!r}; it has {list(arch.modes)}", file=ck.path, field="mode")
    spec = arch.io(ck.config, mode, T)
    example = arch.example_inputs(ck.config, mode, T, torch.float32, torch.Generator().manual_seed(EXAMPLE_SEED))
    wrapper = arch.wrap(model, mode).eval()
    out = Path(out_dir) / f"{contract.entry_name(mode, T)}.onnx"
    with torch.no_grad():
        want = wrapper(*example)
    want = want if isinstance(want, tuple) else (want,)  # a single output comes back bare
    with atomic_path(out) as tmp:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, example, input_names=spec.input_names(),
                                        output_names=spec.output_names(), dynamo=True, external_data=False)
        program.save(str(tmp))
        check(tmp, spec, example, want, rtol=rtol, atol=atol, file=out)
    return out


def check(path: Path, spec, example: tuple, want: tuple, *, rtol: float, atol: float, file: object) -> None:
    """Run the ONNX model with onnxruntime and compare every output with the eager ones."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, example)}
    got = session.run(spec.output_names(), feeds)
    for t, g, w in zip(spec.outputs, got, want):
        w = w.float().numpy()
        if g.shape != w.shape:
            raise ExportError(f"onnxruntime gives shape {list(g.shape)}, the eager model {list(w.shape)}", file=file, field=f"outputs.{t.name}")
        if not np.allclose(g, w, rtol=rtol, atol=atol):
            diff = float(np.abs(g - w).max())
            raise ExportError(f"onnxruntime differs from the eager model: max abs diff {diff:.3g} "
                              f"(rtol {rtol}, atol {atol})", file=file, field=f"outputs.{t.name}")


def export_model(checkpoint: Path | str, out_dir: Path | str, *, modes: list[str] | None = None,
                 enumerated_T: list[int], architecture: str | None = None, rtol: float = RTOL, atol: float = ATOL) -> list[Path]:
    """Every (mode, T) of a checkpoint as checked ONNX files; ``architecture`` refuses any other."""
    ck = load(checkpoint)
    if architecture and ck.arch.name != architecture:
        raise ExportError(f"expected a {architecture} checkpoint, got {ck.arch.name!r}", file=ck.path, field="architecture")
    model = ck.model()
    return [export_entry(ck, model, Path(out_dir), mode, T, rtol=rtol, atol=atol)
            for mode in (modes or ck.arch.modes) for T in enumerated_T]


def main(argv=None, *, prog: str = "python -m export.export_onnx", architecture: str | None = None) -> None:
    p = _Args(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--mode", default="both", choices=["prefill", "decode", "both"])
    p.add_argument("--enumerated-T", nargs="+", type=parse_T, required=True, metavar="T")
    p.add_argument("--rtol", type=float, default=RTOL)
    p.add_argument("--atol", type=float, default=ATOL)
    args = p.parse_args(argv)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with cli_errors():
        modes = None if args.mode == "both" else [args.mode]
        for path in export_model(args.checkpoint, args.out, modes=modes, enumerated_T=args.enumerated_T,
                                 architecture=architecture, rtol=args.rtol, atol=args.atol):
            print(path)


if __name__ == "__main__":
    main()
