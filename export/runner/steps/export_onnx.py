"""export_onnx: one (mode, T) of a checkpoint -> ONNX, checked with onnxruntime (the debug path)."""
from __future__ import annotations

from pathlib import Path

from .. import checkpoints


def run(checkpoint: str, out_dir: str, mode: str, T: int) -> None:
    from ...export_onnx import export_entry

    ck, module = checkpoints.load(checkpoint)
    export_entry(ck, module, Path(out_dir), mode, T)
