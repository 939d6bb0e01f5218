"""Real Core ML conversions of a tiny student: both formats, both modes, both KV
cache styles, each compression; the spec checked against the contract;
reproducible bytes; bad input fails with one clear error and writes nothing."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import coremltools as ct
import pytest
import torch

from conftest import cli_env, files_of, run_module
from coreml_helpers import TS, entry, export_tiny, leftovers
from export import contract as contract_mod
from export.coreml.convert import convert, package_digest
from export.coreml.checks import unsupported_ops
from export.coreml.spec import check_spec, describe
from export.digest import file_digest
from export.errors import ExportError
from export.toolchain import versions

FORMATS = ("torchscript", "exported_program")
T = TS[0]


@pytest.fixture(scope="module")
def explicit(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("explicit"))


@pytest.fixture(scope="module")
def stateful(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("state"), kv_cache="state", modes=["decode"])


def spec_of(pkg):
    return ct.models.MLModel(str(pkg), skip_model_load=True).get_spec()


def op_types(spec) -> set[str]:
    out = set()
    for f in spec.mlProgram.functions.values():
        for block in f.block_specializations.values():
            out |= {op.type for op in block.operations}
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_converts_named_and_typed_as_the_contract(explicit, tmp_path, fmt, mode):
    exported, cpath = entry(explicit, mode, T, fmt)
    out = convert(exported, tmp_path / "m.mlpackage", cpath)
    c = contract_mod.read(cpath)
    got = describe(spec_of(out).description)
    assert got == {k: c[k] for k in ("inputs", "outputs", "states")}
    meta = spec_of(out).description.metadata.userDefined
    assert meta["model_export.contract_digest"] == file_digest(cpath)
    assert meta["model_export.checkpoint_digest"] == c["checkpoint"]["digest"]
    assert json.loads(meta["model_export.toolchain"])["coremltools"] == versions()["coremltools"]
    assert "com.github.apple.coremltools.conversion_date" not in meta
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_stateful_decode_has_fp16_states(stateful, tmp_path, fmt):
    exported, cpath = entry(stateful, "decode", T, fmt)
    out = convert(exported, tmp_path / "s.mlpackage", cpath,
                  {"kv_cache": "state", "minimum_deployment_target": "iOS18"})
    got = describe(spec_of(out).description)
    assert [t["name"] for t in got["inputs"]] == ["input_ids", "position_ids"]
    assert [t["name"] for t in got["outputs"]] == ["logits"]
    assert [(t["name"], t["dtype"]) for t in got["states"]] == [("k_cache", "float16"), ("v_cache", "float16")]
    assert got["states"][0]["shape"] == [2, 1, 2, T, 16]


@pytest.mark.parametrize("compression,op", [("palettize", "constexpr_lut_to_dense"), ("linear_int8", "constexpr_affine_dequantize")])
def test_compression_shrinks_weights(explicit, tmp_path, compression, op):
    exported, cpath = entry(explicit, "prefill", T, "exported_program")
    plain = convert(exported, tmp_path / "plain.mlpackage", cpath)
    packed = convert(exported, tmp_path / "packed.mlpackage", cpath, {"compression": compression, "palettize_bits": 4})
    assert op in op_types(spec_of(packed))
    weights = lambda p: sum(f.stat().st_size for f in (p / "Data/com.apple.CoreML/weights").iterdir())  # noqa: E731
    assert weights(packed) < 0.6 * weights(plain)


def test_fp32_precision_keeps_fp32_weights(explicit, tmp_path):
    exported, cpath = entry(explicit, "decode", T, "torchscript")
    fp16 = convert(exported, tmp_path / "a.mlpackage", cpath)
    fp32 = convert(exported, tmp_path / "b.mlpackage", cpath, {"compute_precision": "fp32"})
    size = lambda p: (p / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size  # noqa: E731
    assert size(fp32) > 1.8 * size(fp16)


def test_check_spec_names_what_differs(explicit, tmp_path):
    exported, cpath = entry(explicit, "decode", T, "exported_program")
    spec = spec_of(convert(exported, tmp_path / "m.mlpackage", cpath))
    c = contract_mod.read(cpath)
    c["outputs"][0]["dtype"] = "float16"
    with pytest.raises(ExportError, match=r"outputs\.logits\.dtype: dtype float32 differs from the contract's float16"):
        check_spec(c, spec)
    c = contract_mod.read(cpath)
    c["inputs"][2]["shape"][3] = 99
    with pytest.raises(ExportError, match=r"inputs\.k_cache\.shape"):
        check_spec(c, spec)


# --- reproducibility -------------------------------------------------------------------------

CONVERT_WITH_DATE = textwrap.dedent("""
    import datetime, sys
    import coremltools.converters._converters_entry as entry
    day = datetime.date.fromisoformat(sys.argv[4])
    class FakeDate(datetime.date):
        @classmethod
        def today(cls):
            return day
    entry.date = FakeDate
    assert str(entry.date.today()) == sys.argv[4]
    from export.coreml.convert import convert
    convert(sys.argv[1], sys.argv[2], sys.argv[3], log=lambda m: None)
""")


@pytest.mark.parametrize("fmt", FORMATS)
def test_byte_identical_across_processes_and_days(explicit, tmp_path, fmt):
    exported, cpath = entry(explicit, "decode", T, fmt)
    outs = []
    for i, day in enumerate(["2026-11-26", "2031-05-17"]):
        out = tmp_path / f"run{i}" / "m.mlpackage"
        r = subprocess.run([sys.executable, "-c", CONVERT_WITH_DATE, str(exported), str(out), str(cpath), day],
                           env=cli_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(out)
    a, b = files_of(outs[0]), files_of(outs[1])
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
    assert package_digest(outs[0]) == package_digest(outs[1])


def test_source_date_epoch_sets_the_date(explicit, tmp_path, monkeypatch):
    exported, cpath = entry(explicit, "prefill", T, "torchscript")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    out = convert(exported, tmp_path / "m.mlpackage", cpath)
    assert spec_of(out).description.metadata.userDefined["com.github.apple.coremltools.conversion_date"] == "2023-11-14"


# --- bad input -------------------------------------------------------------------------------

def test_contract_of_another_program_is_refused(explicit, tmp_path):
    exported, _ = entry(explicit, "prefill", TS[0], "exported_program")
    _, other = entry(explicit, "prefill", TS[1], "exported_program")
    with pytest.raises(ExportError, match=r"exports\.exported_program\.digest: prefill_T16\.pt2 .* is not the program this contract describes"):
        convert(exported, tmp_path / "m.mlpackage", other)
    assert list(tmp_path.iterdir()) == []


def test_contract_shapes_that_differ_from_the_program_are_refused(explicit, tmp_path):
    exported, cpath = entry(explicit, "prefill", T, "exported_program")
    c = contract_mod.read(cpath)
    c["inputs"][0]["shape"] = [1, 99]
    bad = tmp_path / "bad.contract.json"
    contract_mod.write(bad, c)
    with pytest.raises(ExportError, match=r"inputs\.input_ids\.shape: shape \[1, 99\] differs from the program's \[1, 16\]"):
        convert(exported, tmp_path / "m.mlpackage", bad)
    assert not (tmp_path / "m.mlpackage").exists()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_exported_file(explicit, tmp_path, fmt, damage):
    exported, cpath = entry(explicit, "decode", T, fmt)
    data = exported.read_bytes()
    bad = tmp_path / exported.name
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 100)
    out = tmp_path / "out" / "m.mlpackage"
    with pytest.raises(ExportError, match=r"--in: not a readable .* file \(corrupt or truncated\)"):
        convert(bad, out, cpath)
    assert not out.exists()


class Unsupported(torch.nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x) + torch.erfinv(x.clamp(-0.5, 0.5))


def _hand_contract(path, fmt, blob_path):
    tensor = {"name": "x", "shape": [2, 4], "dtype": "float32"}
    c = {"schema": contract_mod.SCHEMA, "schema_version": contract_mod.SCHEMA_VERSION, "model": "odd",
         "architecture": "odd", "mode": "prefill", "T": 4, "dtype": "float32",
         "inputs": [tensor], "outputs": [{**tensor, "name": "y"}], "states": [],
         "exports": {fmt: {"file": blob_path.name, "digest": file_digest(blob_path)}},
         "checkpoint": {"digest": "0" * 32}, "toolchain": versions()}
    contract_mod.write(path, c)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_unsupported_ops_are_listed_by_name(tmp_path, fmt):
    x = (torch.randn(2, 4),)
    blob = tmp_path / ("odd.pt" if fmt == "torchscript" else "odd.pt2")
    if fmt == "torchscript":
        torch.jit.save(torch.jit.trace(Unsupported(), x), str(blob))
    else:
        torch.export.save(torch.export.export(Unsupported(), x), str(blob))
    cpath = _hand_contract(tmp_path / "odd.contract.json", fmt, blob)
    out = tmp_path / "odd.mlpackage"
    with pytest.raises(ExportError) as e:
        convert(blob, out, cpath)
    assert "coremltools cannot convert 2 op(s)" in str(e.value)
    assert "bessel_j0" in str(e.value) and "erfinv" in str(e.value)
    assert not out.exists() and leftovers(tmp_path) == []


def test_student_has_no_unsupported_ops(explicit):
    for fmt in FORMATS:
        from export.coreml.convert import load_program
        for mode in ("prefill", "decode"):
            assert unsupported_ops(load_program(entry(explicit, mode, T, fmt)[0])[1]) == []


class InfBias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tensor([0.0, float("-inf"), 1.0, 2.0]))

    def forward(self, x):
        return torch.softmax(x + self.bias, -1)


def test_inf_constant_is_refused(tmp_path):
    x = (torch.randn(2, 4),)
    blob = tmp_path / "inf.pt"
    torch.jit.save(torch.jit.trace(InfBias(), x), str(blob))
    cpath = _hand_contract(tmp_path / "inf.contract.json", "torchscript", blob)
    with pytest.raises(ExportError, match=r"NaN/Inf"):
        convert(blob, tmp_path / "inf.mlpackage", cpath, {"compute_precision": "fp32"})
    assert not (tmp_path / "inf.mlpackage").exists()


def test_stateful_model_needs_ios18(stateful, tmp_path):
    exported, cpath = entry(stateful, "decode", T, "torchscript")
    with pytest.raises(ExportError, match=r"states, which need minimum_deployment_target in \['iOS18', 'macOS15'\], got 'iOS17'"):
        convert(exported, tmp_path / "s.mlpackage", cpath, {"minimum_deployment_target": "iOS17"})
    with pytest.raises(ExportError, match=r"kv_cache: a stateful KV cache needs minimum_deployment_target"):
        convert(exported, tmp_path / "s.mlpackage", cpath, {"kv_cache": "state", "minimum_deployment_target": "iOS17"})
    assert list(tmp_path.iterdir()) == []


def test_failed_conversion_keeps_the_previous_package(explicit, tmp_path):
    exported, cpath = entry(explicit, "prefill", T, "torchscript")
    out = convert(exported, tmp_path / "m.mlpackage", cpath)
    before = files_of(out)
    _, other = entry(explicit, "decode", T, "torchscript")
    with pytest.raises(ExportError):
        convert(exported, out, other)
    assert files_of(out) == before and leftovers(tmp_path) == []


# --- CLI -------------------------------------------------------------------------------------

def test_cli_converts(explicit, tmp_path):
    exported, cpath = entry(explicit, "decode", T, "exported_program")
    out = tmp_path / "cli.mlpackage"
    r = run_module("export.convert_coreml", "--backend", "pytorch", "--in", exported, "--out", out, "--contract", cpath,
                   "--precision", "fp16", "--target", "iOS18", "--compute-units", "cpu_and_ne")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(out), package_digest(out)]


@pytest.mark.parametrize("case", ["corrupt", "wrong-contract", "state-ios17", "bad-flag"])
def test_cli_errors_are_one_line(explicit, stateful, tmp_path, case):
    exported, cpath = entry(explicit, "prefill", T, "torchscript")
    args = ["--in", exported, "--out", tmp_path / "o.mlpackage", "--contract", cpath]
    if case == "corrupt":
        bad = tmp_path / "bad.pt"
        bad.write_bytes(exported.read_bytes()[:100])
        args[1] = bad
    elif case == "wrong-contract":
        args[5] = entry(explicit, "decode", T, "torchscript")[1]
    elif case == "state-ios17":
        s_exp, s_c = entry(stateful, "decode", T, "torchscript")
        args = ["--in", s_exp, "--out", tmp_path / "o.mlpackage", "--contract", s_c, "--kv-cache", "state", "--target", "iOS17"]
    else:
        args += ["--compression", "zip"]
    r = run_module("export.convert_coreml", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.mlpackage").exists()
