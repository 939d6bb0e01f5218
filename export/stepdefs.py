"""The steps of the build, each declared once.

A record says what a step is: the module whose ``run`` the worker calls, the
tools whose versions key its bytes, how much memory it needs, and the roles of
its outputs. The planner (export/planner/tasks.py, plan.py), the local worker
(export/runner/worker.py), the Dask side (export/runner/cluster.py) and the
code keys (export/codekey.py: a step's code is the import closure of its
module) all read these records. Nothing here imports torch or coremltools.
"""
from __future__ import annotations

from dataclasses import dataclass

from .models.names import ARCHITECTURE_TOOLS


@dataclass(frozen=True)
class Step:
    name: str
    module: str                      # export.runner.steps.<name>: its ``run(**kwargs)`` writes the outputs
    tools: tuple[str, ...]           # packages whose version can change its bytes (besides Python's)
    runs_model_code: bool            # its key adds the architecture's own tools and code
    need_base_mb: int                # expected peak memory: base + factor x the bytes it reads
    need_factor: float
    outputs: tuple[str, ...]         # the roles of its outputs (the planner places them)

    def tools_for(self, arch: str | None) -> tuple[str, ...]:
        return self.tools + (ARCHITECTURE_TOOLS.get(arch, ()) if self.runs_model_code and arch else ())

    def need_mb(self, input_bytes: int) -> int:
        """Memory to reserve before running (measured in bench/: a 50M-parameter student peaks near
        0.85 GB exporting and 1.15 GB converting)."""
        return int(self.need_base_mb + self.need_factor * input_bytes / 2**20)


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("checkpoint", "export.runner.steps.checkpoint", ("torch",), True, 300, 2, ("checkpoint",)),
    Step("export_pytorch", "export.runner.steps.export_pytorch", ("torch", "numpy"), True, 400, 3,
         ("exported_program", "torchscript", "contract")),
    Step("convert_coreml", "export.runner.steps.convert_coreml", ("torch", "coremltools", "numpy"), False, 500, 5,
         ("package", "manifest")),
    Step("compress_coreml", "export.runner.steps.compress_coreml", ("torch", "coremltools", "numpy"), False, 500, 4,
         ("package", "manifest", "quality")),
    Step("verify_coreml", "export.runner.steps.verify_coreml", ("torch", "coremltools", "numpy"), False, 500, 4,
         ("verdict",)),
    Step("bundle_coreml", "export.runner.steps.bundle_coreml", ("torch", "coremltools", "numpy"), False, 400, 2,
         ("package", "manifest", "contract")),
    Step("export_onnx", "export.runner.steps.export_onnx", ("torch", "onnx", "onnxscript", "onnxruntime", "numpy"), True, 400, 4,
         ("onnx",)),
)}
