"""The ONNX debug path: real torch.onnx exports checked with onnxruntime; the judge CLIs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from conftest import run_module, write_checkpoint
from export import export_onnx
from export.checkpoint import load
from export.errors import ExportError

T = 8


@pytest.fixture(scope="module")
def student_ck(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("onnx") / "student.pt", "student")


@pytest.fixture(scope="module")
def judge_ck(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("onnx") / "judge.pt", "judge")


def test_student_both_modes_named_as_declared(student_ck, tmp_path):
    paths = export_onnx.export_model(student_ck, tmp_path, enumerated_T=[T])
    assert [p.name for p in paths] == ["prefill_T8.onnx", "decode_T8.onnx"]
    ck = load(student_ck)
    for path, mode in zip(paths, ("prefill", "decode")):
        graph = onnx.load(str(path)).graph
        spec = ck.arch.io(ck.config, mode, T)
        assert [i.name for i in graph.input] == spec.input_names()
        assert [o.name for o in graph.output] == spec.output_names()


def test_a_difference_is_reported_and_nothing_written(student_ck, tmp_path):
    ck = load(student_ck)
    model = ck.model()
    spec = ck.arch.io(ck.config, "prefill", T)
    example = ck.arch.example_inputs(ck.config, "prefill", T, torch.float32, torch.Generator().manual_seed(0))
    path = export_onnx.export_entry(ck, model, tmp_path, "prefill", T)
    with torch.no_grad():
        want = ck.arch.wrap(model, "prefill")(*example)
    wrong = (want[0] + 0.5,) + tuple(want[1:])
    with pytest.raises(ExportError, match=r"outputs\.logits: onnxruntime differs from the eager model: max abs diff 0\.5"):
        export_onnx.check(path, spec, example, wrong, rtol=1e-3, atol=1e-4, file=path)


def test_judge_cli(judge_ck, student_ck, tmp_path):
    r = run_module("export.judge_export_onnx", "--checkpoint", judge_ck, "--out", tmp_path, "--enumerated-T", T)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "prefill_T8.onnx").is_file()
    r = run_module("export.judge_export_onnx", "--checkpoint", student_ck, "--out", tmp_path / "x", "--enumerated-T", T)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "expected a judge checkpoint" in lines[0]
    assert not (tmp_path / "x").exists()


def test_judge_coreml_cli(judge_ck, tmp_path):
    r = run_module("export.judge_export_coreml", "--checkpoint", judge_ck, "--out", tmp_path, "--enumerated-T", 8, 16)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "coreml" / "judge.mlpackage" / "Manifest.json").is_file()
    assert (tmp_path / "coreml" / "contract.json").is_file()


def test_cli_error_is_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = run_module("export.export_onnx", "--checkpoint", bad, "--out", tmp_path / "o", "--enumerated-T", T)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr
