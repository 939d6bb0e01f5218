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
    need_largest_factor: float | None = None  # the largest input's own factor (None: need_factor)
    need_per_output_value: float = 0.0   # bytes per value of the outputs of one (mode, T) (a T x vocabulary logits)
    need_per_score: float = 0.0          # bytes per attention score of one head's queries x keys (T x T in prefill)
    uses_held: bool = False              # uses what the worker holds from earlier steps (export/runner/checkpoints.py):
                                         # the loaded checkpoint or part, the programs kept for their conversion

    def tools_for(self, arch: str | None) -> tuple[str, ...]:
        return self.tools + (ARCHITECTURE_TOOLS.get(arch, ()) if self.runs_model_code and arch else ())

    def need_mb(self, input_bytes: int, largest_bytes: int | None = None, shapes: dict | None = None) -> int:
        """Memory to reserve before running: the peak of the worker process while the step runs (what it
        still holds from earlier steps, the checkpoint it loaded, included).

        Fitted to the peaks bench/bench_scale.py measured (bench/results/scale-*.json; within 25% at
        0.5B and 1B parameters, tests/test_memory_ledger.py holds them) with the base kept at 400-500 MB,
        so that the tiny demo's steps reserve about what they take. A bundle's peak grows with the
        largest package it merges (the program of one function, the worker's loaded checkpoint beside
        it) much more than with the others (their weights are the same bytes, stored once):
        ``need_largest_factor`` weighs the largest input and ``need_factor`` the rest.

        ``shapes`` (``contract_shapes``: the largest (mode, T) the step runs) adds what grows with T rather
        than with the weights: ``need_per_output_value`` bytes per output value (verification holds the
        package's, the program's and the fp16-rounded program's logits) and ``need_per_score`` bytes per
        query x key pair (a prefill's T x T attention scores, per head, in both runtimes)."""
        largest = min(largest_bytes or 0, input_bytes) if self.need_largest_factor is not None else 0
        rest = input_bytes - largest
        shapes = shapes or {}
        return int(self.need_base_mb + self.need_factor * rest / 2**20
                   + (self.need_largest_factor or 0) * largest / 2**20
                   + (self.need_per_output_value * shapes.get("output_values", 0)
                      + self.need_per_score * shapes.get("scores", 0)) / 2**20)


def contract_shapes(contracts: list[dict]) -> dict:
    """What grows with T in a step that runs these (mode, T) contracts one after the other: the largest
    ``output_values`` (values of its outputs and states) and ``scores`` (query positions x key positions:
    T x T for a prefill, 1 x T for a decode step) among them."""
    out = {"output_values": 0, "scores": 0}
    for c in contracts:
        values = sum(_numel(t.get("shape", ())) for t in [*c.get("outputs", ()), *(c.get("states") or ())])
        queries = next((int(t["shape"][-1]) for t in c.get("inputs", ()) if t.get("name") == "input_ids" and t.get("shape")), 1)
        out["output_values"] = max(out["output_values"], values)
        out["scores"] = max(out["scores"], queries * int(c.get("T") or 0))
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("checkpoint", "export.runner.steps.checkpoint", ("torch",), True, 300, 2, ("checkpoint",)),
    Step("export_pytorch", "export.runner.steps.export_pytorch", ("torch", "numpy"), True, 400, 2,
         ("exported_program", "torchscript", "contract"), uses_held=True),
    # convert: 500 + 1.5x the weights + 2.5x the largest weight on its own (the fp16 pass's overflow and underflow
    # checks hold copies of one constant at a time: an 8B model's embedding part, one 2.1 GB fp32 table, peaked at
    # 5.4 GB, a chunk of 2 layers, 1.74 GB in 235 MB tensors, at 3.2 GB, the whole 0.5B model at 3.9 GB;
    # bench/results/scale-*-20261129-13*.json). A self-contained program (TorchScript) is one input: its size
    # counts as the largest (an over-estimate).
    Step("convert_coreml", "export.runner.steps.convert_coreml", ("torch", "coremltools", "numpy"), False, 500, 1.5,
         ("package", "manifest"), need_largest_factor=2.5, uses_held=True),
    Step("compress_coreml", "export.runner.steps.compress_coreml", ("torch", "coremltools", "numpy"), False, 500, 4,
         ("package", "manifest", "quality")),
    # verify: 500 + 1.6x what it reads (the package and the program's weights) + what grows with T (the worker no
    # longer holds the last export's model beside it: 8B chunks 4.0 GB, the 0.5B model's prefill T2048 8.6 GB)
    Step("verify_coreml", "export.runner.steps.verify_coreml", ("torch", "coremltools", "numpy"), False, 500, 1.6,
         ("verdict",), need_per_output_value=10.5, need_per_score=48),
    # base 450: a parted model's chain contract (bundle_coreml:<model>, a few kB of JSON) peaked at 542 MB in a
    # worker that still held its last merge (bench/results/scale-small-20261129-092958.json)
    # 3.5x the largest package + 0.9x the others (they share its weight file): the 0.5B model's 4 leaves, 5.3 GB
    Step("bundle_coreml", "export.runner.steps.bundle_coreml", ("torch", "coremltools", "numpy"), False, 450, 0.9,
         ("package", "manifest", "contract"), need_largest_factor=3.5),
    Step("export_onnx", "export.runner.steps.export_onnx", ("torch", "onnx", "onnxscript", "onnxruntime", "numpy"), True, 400, 4,
         ("onnx",), uses_held=True),
)}
