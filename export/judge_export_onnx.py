"""The seed's ``judge_export_onnx``: the ONNX debug export (``export.export_onnx``) of a judge checkpoint.

    python -m export.judge_export_onnx --checkpoint judge.pt --out onnx/ --enumerated-T 512 1024
"""
from __future__ import annotations

from .export_onnx import main as _main


def main(argv=None) -> None:
    _main(argv, prog="python -m export.judge_export_onnx", architecture="judge")


if __name__ == "__main__":
    main()
