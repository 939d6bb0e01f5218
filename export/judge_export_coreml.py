"""The seed's ``judge_export_coreml``: a judge checkpoint -> exported programs, one
Core ML package per T and the multifunction ``judge.mlpackage``, by the same
steps as every model (export_pytorch, convert_coreml, bundle).

    python -m export.judge_export_coreml --checkpoint judge.pt --out judge/ --enumerated-T 512 1024
"""
from __future__ import annotations

from pathlib import Path

from .coreml import bundle, convert as convert_coreml
from . import contract, export_pytorch
from .checkpoint import load
from .errors import ExportError, cli_errors


def export_judge(checkpoint: Path, out: Path, enumerated_T: list[int], options, *, fmt: str = "exported_program") -> Path:
    if load(checkpoint).arch.name != "judge":
        raise ExportError("expected a judge checkpoint", file=checkpoint, field="architecture")
    exported = out / "exported"
    agg = export_pytorch.export_model(checkpoint, exported, enumerated_T=enumerated_T, formats=[fmt])
    packages, contracts = [], []
    for name, c in agg["functions"].items():
        cpath = exported / f"{name}.contract.json"
        packages.append(convert_coreml.convert(exported / c["exports"][fmt]["file"], out / "coreml" / f"{name}.mlpackage",
                                               cpath, options, log=lambda m: None))
        contracts.append(cpath)
    target = out / "coreml" / f"{agg['model']}.mlpackage"
    bundle.bundle(packages, contracts, target)
    return target


def main(argv=None) -> None:
    p = convert_coreml._Args(prog="python -m export.judge_export_coreml", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="output folder (exported/ and coreml/ inside)")
    p.add_argument("--enumerated-T", nargs="+", type=export_pytorch.parse_T, required=True, metavar="T")
    p.add_argument("--format", default="exported_program", choices=list(contract.FORMATS))
    convert_coreml.add_option_flags(p)
    args = p.parse_args(argv)
    convert_coreml.quiet_coremltools()
    with cli_errors():
        target = export_judge(args.checkpoint, args.out, args.enumerated_T, convert_coreml.options_from_args(args), fmt=args.format)
        print(target)


if __name__ == "__main__":
    main()
