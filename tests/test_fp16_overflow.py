"""coremltools' fp16 overflow check in bounded memory (export/coreml/fp16_overflow.py): the same decision as
coremltools' own for every kind of constant, and the same package bytes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export import contract as contract_mod
from export.coreml import fp16_overflow
from export.coreml.convert import _ct_convert, convert, load_program
from export.coreml.options import CoreMLOptions
from export.digest import file_digest
from export.toolchain import versions

CONSTANTS = {
    "small": np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4),
    "at the fp16 limit": np.full((2, 4), 65504.0, np.float32),
    "just over": np.array([[1, 2, 3, 65505.0]] * 2, np.float32),
    "negative overflow": np.array([[-70000.0, 0, 0, 0]] * 2, np.float32),
    "mask of -1e38 and -inf": np.array([[0, -1e38, -np.inf, 1.0]] * 2, np.float32),
    "huge but under 1e38": np.array([[0, 1e37, 0, 0]] * 2, np.float32),
    "NaN beside small": np.array([[np.nan, 1.0, 2.0, 3.0]] * 2, np.float32),
    "NaN beside an overflow": np.array([[np.nan, 1e5, 0, 0]] * 2, np.float32),
    "scalar over": np.float32(1e6),
    "scalar small": np.float32(0.5),
}


def _ops_and_originals():
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 4))])
    def prog(x):
        for value in CONSTANTS.values():
            x = mb.add(x=x, y=value)
        return x

    ops = [op for op in prog.functions["main"].operations if op.op_type == "add"]
    assert len(ops) == len(CONSTANTS)
    return ops, FP16ComputePrecision.fp16_overflow


@pytest.mark.parametrize("slice_values", [fp16_overflow.SLICE, 3])  # 3: every constant in several slices
def test_the_lean_check_decides_as_coremltools(slice_values, monkeypatch):
    monkeypatch.setattr(fp16_overflow, "SLICE", slice_values)
    ops, original = _ops_and_originals()
    decided = {name: (original(op), fp16_overflow._fp16_overflow(op)) for name, op in zip(CONSTANTS, ops)}
    assert all(theirs == ours for theirs, ours in decided.values()), decided
    assert {n for n, (d, _) in decided.items() if d} == {"just over", "negative overflow", "huge but under 1e38",
                                                          "NaN beside an overflow", "scalar over"}
    with fp16_overflow.lean_fp16_overflow():  # the pass's own method, while a conversion runs
        from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

        assert [FP16ComputePrecision.fp16_overflow(op) for op in ops] == [d for d, _ in decided.values()]
    assert FP16ComputePrecision.fp16_overflow is original  # restored


class Scaled(torch.nn.Module):
    """One weight within fp16's range and one beyond it: the fp16 pass must keep the second op in fp32."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.linspace(-2, 2, 8).reshape(2, 4))
        self.register_buffer("big", torch.tensor([[1e5, 1.0, 2.0, 3.0]] * 2))

    def forward(self, x):
        return (x * self.w) / self.big


def test_a_conversion_gives_the_same_package_with_either_check(tmp_path):
    x = (torch.randn(2, 4),)
    blob = tmp_path / "scaled.pt"
    torch.jit.save(torch.jit.trace(Scaled(), x), str(blob))
    tensor = {"name": "x", "shape": [2, 4], "dtype": "float32"}
    cpath = tmp_path / "scaled.contract.json"
    contract_mod.write(cpath, {
        "schema": contract_mod.SCHEMA, "schema_version": contract_mod.SCHEMA_VERSION, "model": "scaled",
        "architecture": "scaled", "mode": "prefill", "T": 4, "dtype": "float32", "inputs": [tensor],
        "outputs": [{**tensor, "name": "y"}], "states": [],
        "exports": {"torchscript": {"file": blob.name, "digest": file_digest(blob)}},
        "checkpoint": {"digest": "0" * 32}, "toolchain": versions()})
    options = {"compute_precision": "fp16", "minimum_deployment_target": "iOS17"}
    lean = convert(blob, tmp_path / "lean.mlpackage", cpath, options, log=lambda *a: None)
    # coremltools' own check: the same conversion without the hook
    _, program = load_program(blob)
    own = _ct_convert(program, contract_mod.read(cpath), CoreMLOptions.from_dict(options, field="options"))
    again = _ct_convert(program, contract_mod.read(cpath), CoreMLOptions.from_dict(options, field="options"))
    spec = own.get_spec()
    with fp16_overflow.lean_fp16_overflow():
        hooked = _ct_convert(program, contract_mod.read(cpath), CoreMLOptions.from_dict(options, field="options"))
    assert hooked.get_spec().SerializeToString() == spec.SerializeToString() == again.get_spec().SerializeToString()
    # the raw packages' manifests name random ids (the build canonicalizes them); their weights are the same bytes
    weights = [sorted((p.relative_to(m.package_path).as_posix(), p.read_bytes())
                      for p in Path(m.package_path).rglob("weight.bin")) for m in (hooked, own)]
    assert weights[0] == weights[1]
    ops = [op for f in spec.mlProgram.functions.values() for b in f.block_specializations.values() for op in b.operations]
    casts = [op for op in ops if op.type == "cast"]
    assert casts, "the fp16 pass kept the whole program in fp32"
    assert lean.is_dir()
