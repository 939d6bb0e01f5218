"""Checkpoints: deterministic demos, .pt/.safetensors round trips, safe loading, config validation."""
from __future__ import annotations

import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import pytest
import torch

from export import checkpoint
from export.errors import ExportError
from export.models.registry import get

from conftest import run_module, tiny_model, write_checkpoint


def _outputs(model, arch):
    a = get(arch)
    cfg = model.c
    res = []
    for mode in a.modes:
        ex = a.example_inputs(cfg, mode, 16, torch.float32, torch.Generator().manual_seed(5))
        with torch.no_grad():
            out = a.wrap(model, mode)(*ex)
        res.append(out if isinstance(out, tuple) else (out,))
    return res


# -- determinism ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["student", "judge"])
def test_demo_bytes_identical_on_two_calls(tmp_path, arch):
    a = checkpoint.make_demo(tmp_path / "a.pt", arch).read_bytes()
    torch.manual_seed(12345)  # the global RNG must not matter
    torch.rand(10)
    b = checkpoint.make_demo(tmp_path / "b.pt", arch).read_bytes()
    assert a == b
    sa = checkpoint.make_demo(tmp_path / "a.safetensors", arch).read_bytes()
    sb = checkpoint.make_demo(tmp_path / "b.safetensors", arch).read_bytes()
    assert sa == sb


def test_demo_bytes_identical_in_two_processes(tmp_path):
    here = checkpoint.make_demo(tmp_path / "here.pt", "student").read_bytes()
    outs = [tmp_path / f"p{i}" / "demo.pt" for i in range(2)]
    for o in outs:
        o.parent.mkdir()
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda o: run_module("export.checkpoint", "demo", "student", "--out", o, cwd=o.parent), outs))
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert outs[0].read_bytes() == outs[1].read_bytes() == here


# -- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["student", "judge"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_same_outputs(tmp_path, arch, suffix):
    config, model = tiny_model(arch)
    path = write_checkpoint(tmp_path / f"ck{suffix}", arch)
    ck = checkpoint.load(path)
    assert ck.arch.name == arch and ck.config == config
    loaded = ck.model()
    assert not loaded.training
    sd = model.state_dict()
    assert set(loaded.state_dict()) == set(sd)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    for got, want in zip(_outputs(loaded, arch), _outputs(model, arch)):
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_pt_and_safetensors_agree(tmp_path):
    a = checkpoint.load(write_checkpoint(tmp_path / "s.pt", "student")).model()
    b = checkpoint.load(write_checkpoint(tmp_path / "s.safetensors", "student")).model()
    for g, w in zip(_outputs(a, "student"), _outputs(b, "student")):
        for x, y in zip(g, w):
            assert torch.equal(x, y)


def test_safetensors_config_from_sidecar(tmp_path):
    from safetensors.torch import save_file

    config, model = tiny_model("judge")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))  # no metadata
    with pytest.raises(ExportError) as e:
        checkpoint.load(path)
    assert str(path) in str(e.value) and "__metadata__.architecture" in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "judge", "config": asdict(config)}))
    ck = checkpoint.load(path)
    assert ck.config == config
    ck.model()


def test_checkpoint_show_cli(tmp_path):
    path = write_checkpoint(tmp_path / "s.pt", "student")
    r = run_module("export.checkpoint", "show", path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "student" and info["config"]["d_model"] == 32
    assert info["parameters"] == sum(v.numel() for v in tiny_model("student")[1].state_dict().values())


# -- safe loading --------------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_code_running_pickle_is_refused(tmp_path, how):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    payload = {"format": checkpoint.FORMAT, "version": 1, "architecture": "student", "config": {}, "state_dict": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(ExportError) as e:
        checkpoint.load(path)
    assert not marker.exists()
    msg = str(e.value)
    assert "refused" in msg and str(path) in msg and e.value.field == "pickle"


def _good_bytes(tmp_path):
    return write_checkpoint(tmp_path / "good.pt", "student").read_bytes()


@pytest.mark.parametrize("case,field", [
    ("missing", "checkpoint"), ("empty", "file"), ("truncated", "file"), ("garbage", "file"),
    ("text", "file"), ("not_a_dict", "format"), ("wrong_format", "format"), ("wrong_version", "version"),
    ("bad_safetensors", "header"), ("no_state_dict", "state_dict"),
])
def test_unreadable_checkpoints(tmp_path, case, field):
    path = tmp_path / ("ck.safetensors" if case == "bad_safetensors" else "ck.pt")
    good = _good_bytes(tmp_path)
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif case == "garbage":
        path.write_bytes(bytes(range(7, 256)) * 8)
    elif case == "text":
        path.write_text("this is not a checkpoint\n")
    elif case == "not_a_dict":
        torch.save([1, 2, 3], path)
    elif case == "wrong_format":
        torch.save({"format": "something-else", "version": 1}, path)
    elif case == "wrong_version":
        torch.save({"format": checkpoint.FORMAT, "version": 99}, path)
    elif case == "bad_safetensors":
        path.write_bytes(b"\xff" * 8 + b"{not json")
    elif case == "no_state_dict":
        torch.save({"format": checkpoint.FORMAT, "version": 1, "architecture": "student", "config": {}, "state_dict": [1]}, path)
    with pytest.raises(ExportError) as e:
        checkpoint.load(path)
    assert str(path) in str(e.value)
    assert e.value.field == field, str(e.value)


def _payload(config: dict, arch="student", state=None):
    return {"format": checkpoint.FORMAT, "version": 1, "architecture": arch, "config": config,
            "state_dict": state if state is not None else {}}


@pytest.mark.parametrize("config,field,words", [
    ({"d_modle": 32}, "config", "unknown field"),
    ({"d_model": "32"}, "config.d_model", "expected int"),
    ({"d_model": True}, "config.d_model", "expected int"),
    ({"d_model": 32.0}, "config.d_model", "expected int"),
    ({"n_layers": 0}, "config.n_layers", "positive"),
    ({"vocab_size": -5}, "config.vocab_size", "positive"),
    ({"rope_theta": "big"}, "config.rope_theta", "expected float"),
    ({"d_model": 30, "n_heads": 4}, "config.n_heads", "must divide"),
    ({"d_model": 36, "n_heads": 12, "n_kv_heads": 2}, "config.n_heads", "even"),
    ({"n_heads": 4, "n_kv_heads": 3}, "config.n_kv_heads", "must divide"),
])
def test_config_validation(tmp_path, config, field, words):
    path = tmp_path / "ck.pt"
    torch.save(_payload(config), path)
    with pytest.raises(ExportError) as e:
        checkpoint.load(path)
    assert e.value.field == field and words in e.value.message, str(e.value)
    assert str(path) in str(e.value)


def test_config_not_a_table(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save(_payload([1, 2]), path)
    with pytest.raises(ExportError) as e:
        checkpoint.load(path)
    assert e.value.field == "config"


def test_unknown_architecture(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save(_payload({}, arch="gpt5"), path)
    with pytest.raises(ExportError) as e:
        checkpoint.load(path)
    assert e.value.field == "architecture" and "gpt5" in str(e.value)


@pytest.mark.parametrize("change,field,words", [
    ("drop", "state_dict", "missing"),
    ("extra", "state_dict", "unexpected"),
    ("shape", "state_dict.blocks.0.wq.weight", "does not match"),
])
def test_weights_must_match_config(tmp_path, change, field, words):
    config, model = tiny_model("student")
    sd = dict(model.state_dict())
    if change == "drop":
        del sd["lm_head.weight"]
    elif change == "extra":
        sd["blocks.0.bias"] = torch.zeros(3)
    else:
        sd["blocks.0.wq.weight"] = torch.zeros(16, 32)
    path = tmp_path / "ck.pt"
    checkpoint.save(path, "student", config, sd)
    ck = checkpoint.load(path)  # the header is fine; the weights are checked when the model is built
    with pytest.raises(ExportError) as e:
        ck.model()
    assert e.value.field == field and words in e.value.message, str(e.value)
    if change != "shape":
        assert ("lm_head.weight" if change == "drop" else "blocks.0.bias") in e.value.message
