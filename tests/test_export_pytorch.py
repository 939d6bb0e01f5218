"""export_pytorch: numerics of the exported programs, their declared IO, no per-T constants,
finite masks, byte-identical exports, how often the forward pass runs, and bad input via the CLI."""
from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from export import checkpoint, contract, export_pytorch
from export.models.registry import get

from conftest import FORMATS, REPO, TINY, TS, files_of, fork_module, load_program, load_torchscript, run_module, write_checkpoint
from test_models import full_prefill, rollout_logits

DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32}
ENTRIES = [(arch, mode, T) for arch in ("student", "judge") for mode in get(arch).modes for T in TS]
TOL = {"fp32": dict(atol=1e-4, rtol=1e-4), "fp16": dict(atol=3e-2, rtol=3e-2)}


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,) if isinstance(x, torch.Tensor) else tuple(x)


def _eager(arch):
    a = get(arch)
    config, model = checkpoint.demo_model(arch, TINY[arch])
    return a, config, model.eval()


def _runner(fmt: str, path: Path):
    if fmt == "torchscript":
        return load_torchscript(path)
    return load_program(path).module()


def _inputs(a, config, mode, T, dtype, seed=99):
    """Inputs other than the ones the export traced with (seed 0): catches values baked in at trace time."""
    ex = list(a.example_inputs(config, mode, T, dtype, torch.Generator().manual_seed(seed)))
    if mode == "decode":
        ex[1] = torch.tensor([[T - 3]], dtype=torch.int32)
    return tuple(ex)


# -- numerics --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch,mode,T", ENTRIES)
def test_exported_matches_eager(exported, arch, mode, T, fmt, dtype):
    a, config, model = _eager(arch)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    path = exported[(arch, dtype)] / f"{contract.entry_name(mode, T)}{contract.FORMATS[fmt]}"
    run = _runner(fmt, path)
    for seed in (99, 7):
        inputs = _inputs(a, config, mode, T, torch_dtype, seed)
        with torch.no_grad():
            want = _as_tuple(a.wrap(model, mode)(*[x.float() if x.is_floating_point() else x for x in inputs]))
            got = _as_tuple(run(*inputs))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == torch_dtype
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g.float(), w, **TOL[dtype])


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_rollout_equals_longer_prefill(exported, fmt):
    """Prefill n tokens with the exported prefill program, decode k more with the exported decode
    program: the logits equal one exported prefill of all n + k tokens (and the eager model's)."""
    T, n, k = 16, 5, 6
    d = exported[("student", "fp32")]
    prefill = _runner(fmt, d / f"prefill_T{T}{contract.FORMATS[fmt]}")
    decode = _runner(fmt, d / f"decode_T{T}{contract.FORMATS[fmt]}")
    a, config, model = _eager("student")
    ids = torch.randint(0, config.vocab_size, (n + k,), generator=torch.Generator().manual_seed(11)).tolist()
    with torch.no_grad():
        got, _, _ = rollout_logits(prefill, decode, ids, n, T)
        want = full_prefill(prefill, ids, T)[0][0, n:n + k]
        eager = full_prefill(a.wrap(model, "prefill"), ids, T)[0][0, n:n + k]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)


# -- the declared IO is the single source ---------------------------------------------------------

def _val(node):
    return node.meta["val"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("arch,mode,T", ENTRIES)
def test_io_matches_declaration_and_contract(exported, session_checkpoints, arch, mode, T, dtype):
    a = get(arch)
    config = checkpoint.load(session_checkpoints[arch]).config
    spec = a.io(config, mode, T, "float16" if dtype == "fp16" else "float32")
    d = exported[(arch, dtype)]
    stem = contract.entry_name(mode, T)

    c = contract.read(d / f"{stem}.contract.json")
    assert c["inputs"] == [t.to_json() for t in spec.inputs]
    assert c["outputs"] == [t.to_json() for t in spec.outputs]
    assert (c["mode"], c["T"], c["architecture"]) == (mode, T, arch)
    agg = contract.read(d / "contract.json", aggregate=True)
    assert agg["functions"][stem] == c

    ep = load_program(d / f"{stem}.pt2")
    assert list(ep.graph_signature.user_inputs) == spec.input_names()
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for t in spec.inputs:
        v = _val(placeholders[t.name])
        assert (tuple(v.shape), v.dtype) == (t.shape, DTYPES[t.dtype]), t.name
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs = [_val(x) for x in out_node.args[0]]
    assert [(tuple(v.shape), v.dtype) for v in outs] == [(t.shape, DTYPES[t.dtype]) for t in spec.outputs]

    ts = load_torchscript(d / f"{stem}.pt")
    names = [i.debugName().split(".")[0] for i in list(ts.graph.inputs())[1:]]
    assert names == spec.input_names()
    got = _as_tuple(ts(*_inputs(a, config, mode, T, DTYPES[spec.outputs[0].dtype])))
    assert [(tuple(o.shape), o.dtype) for o in got] == [(t.shape, DTYPES[t.dtype]) for t in spec.outputs]

    for fmt, e in c["exports"].items():
        from export.digest import file_digest

        assert file_digest(d / e["file"]) == e["digest"], fmt


# -- no per-T constants, finite masks ---------------------------------------------------------------

def _program_tensors(ep):
    out = {f"state_dict.{k}": v for k, v in ep.state_dict.items()}
    out.update({f"constants.{k}": v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    return out


def _torchscript_tensors(ts):
    out = {f"param.{k}": v for k, v in ts.named_parameters()}
    out.update({f"buffer.{k}": v for k, v in ts.named_buffers()})
    _, consts = ts.code_with_constants
    out.update({f"const.{k}": v for k, v in consts.const_mapping.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("arch,mode", [("student", "prefill"), ("student", "decode"), ("judge", "prefill")])
def test_no_constant_depends_on_T(exported, arch, mode, dtype):
    d = exported[(arch, dtype)]
    shapes = []
    for T in TS:
        ep = load_program(d / f"{mode}_T{T}.pt2")
        ts = load_torchscript(d / f"{mode}_T{T}.pt")
        shapes.append((
            {k: tuple(v.shape) for k, v in _program_tensors(ep).items()},
            {k: tuple(v.shape) for k, v in _torchscript_tensors(ts).items()},
        ))
        # every tensor the program holds is a parameter of the model: nothing was folded
        assert set(ep.constants) == set()
        assert not [n for n in ep.graph.nodes if n.op == "get_attr"]
        assert len(ep.graph_signature.buffers) == 0
    assert shapes[0] == shapes[1]
    _, model = checkpoint.demo_model(arch, TINY[arch])
    assert sorted(k.split(".", 1)[1] for k in shapes[0][0]) == sorted(
        ("model." + k if arch == "student" else k) for k in model.state_dict())


def _bad_scalars(graph):
    bad = []

    def visit(x, node):
        if isinstance(x, float) and not math.isfinite(x):
            bad.append((node.name, x))
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y, node)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y, node)

    for node in graph.nodes:
        visit(node.args, node)
        visit(node.kwargs, node)
    return bad


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("arch,mode,T", ENTRIES)
def test_constants_and_masks_are_finite(exported, arch, mode, T, dtype):
    d = exported[(arch, dtype)]
    stem = contract.entry_name(mode, T)
    ep = load_program(d / f"{stem}.pt2")
    for name, t in _program_tensors(ep).items():
        assert torch.isfinite(t).all(), name
    assert _bad_scalars(ep.graph) == []
    if T == TS[0]:  # the training dialect hides decompositions: check the graph coremltools will see, too
        assert _bad_scalars(ep.run_decompositions({}).graph) == []
    ts = load_torchscript(d / f"{stem}.pt")
    for name, t in _torchscript_tensors(ts).items():
        assert torch.isfinite(t).all(), name
    for node in ts.inlined_graph.nodes():
        if node.kind() == "prim::Constant" and node.output().type().kind() == "FloatType":
            assert math.isfinite(node.output().toIValue()), str(node)


# -- byte-identical exports --------------------------------------------------------------------

def _cli_export(ck: Path, out: Path, *, pythonpath: Path = REPO, cwd: Path | None = None):
    return run_module("export.export_pytorch", "--checkpoint", ck, "--out", out, "--mode", "both",
                      "--enumerated-T", *TS, cwd=cwd or out.parent, pythonpath=pythonpath)


def test_byte_identical_across_processes_and_checkouts(tmp_path, session_checkpoints, exported):
    ck = session_checkpoints["student"]
    copy = tmp_path / "elsewhere" / "checkout"
    shutil.copytree(REPO / "export", copy / "export", ignore=shutil.ignore_patterns("__pycache__"))
    jobs = [(tmp_path / "a" / "out", REPO), (tmp_path / "b" / "out", REPO), (tmp_path / "c" / "out", copy)]
    for out, _ in jobs:
        out.parent.mkdir(parents=True)
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda j: _cli_export(ck, j[0], pythonpath=j[1]), jobs))
    for r in runs:
        assert r.returncode == 0, r.stderr
    trees = [files_of(out) for out, _ in jobs]
    assert sorted(trees[0]) == sorted(
        [f"{m}_T{T}{ext}" for m in ("prefill", "decode") for T in TS for ext in (".pt", ".pt2", ".contract.json")]
        + ["contract.json"])
    for other in trees[1:]:
        assert sorted(other) == sorted(trees[0])
        diff = [name for name in trees[0] if trees[0][name] != other[name]]
        assert diff == []
    # and the in-process session export (its TorchScript mangle counter long advanced) agrees
    here = files_of(exported[("student", "fp32")])
    diff = [name for name in trees[0] if here[name] != trees[0][name]]
    assert diff == []


def test_byte_identical_twice_in_one_process(tmp_path, session_checkpoints):
    ck = checkpoint.load(session_checkpoints["judge"])
    model = ck.model()
    outs = []
    for i in range(2):
        torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2))  # advance the mangle counter
        d = tmp_path / f"o{i}"
        d.mkdir()
        export_pytorch.export_entry(ck, model, d, model_name="judge", mode="prefill", T=8, formats=list(FORMATS))
        outs.append(files_of(d))
    assert outs[0] == outs[1]


# -- how often the forward pass runs ------------------------------------------------------------

@pytest.mark.parametrize("arch,mode", [("student", "prefill"), ("student", "decode"), ("judge", "prefill")])
def test_forward_runs_once_for_torchscript_never_for_exported_program(tmp_path, session_checkpoints, arch, mode):
    ck = checkpoint.load(session_checkpoints[arch])
    model = ck.model()
    calls = []

    def hook(module, args):
        x = args[0]
        calls.append("fake" if isinstance(x, FakeTensor) or isinstance(getattr(x, "elem", None), FakeTensor)
                     or torch._subclasses.fake_tensor.is_fake(x) else "real")

    # Student's wrappers call model.prefill()/decode(), not forward(): hook the embedding, which
    # every forward of either architecture runs exactly once.
    handle = model.embed.register_forward_pre_hook(hook)
    try:
        export_pytorch.export_entry(ck, model, tmp_path, model_name=arch, mode=mode, T=16, formats=["torchscript"])
        ts_calls, calls[:] = list(calls), []
        export_pytorch.export_entry(ck, model, tmp_path, model_name=arch, mode=mode, T=16, formats=["exported_program"])
        ep_calls = list(calls)
    finally:
        handle.remove()
    assert ts_calls == ["real"]  # traced once, no check_trace re-run
    assert "real" not in ep_calls  # torch.export runs on fake tensors only
    assert 1 <= len(ep_calls) <= 2, ep_calls


# -- bad input via the CLI -----------------------------------------------------------------------

def _pickle_bomb(path: Path, marker: Path):
    import os

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": checkpoint.FORMAT, "version": 1, "architecture": "student", "config": {},
                "state_dict": {"x": Bomb()}}, path)


def _setup_case(case: str, root: Path) -> dict:
    """Build the files of one bad-input case. Returns the CLI args and what the one error line must name."""
    root.mkdir(parents=True)
    good = root / "good.pt"
    write_checkpoint(good, "student")
    out = root / "out"
    ck = root / "ck.pt"
    T = ["--enumerated-T", "8", "16"]
    arch_cfg = {"format": checkpoint.FORMAT, "version": 1, "architecture": "student"}
    c = dict(args=None, names=[], out=out)
    if case == "missing_checkpoint":
        c.update(args=["--checkpoint", root / "nope.pt", "--out", out, *T], names=[root / "nope.pt", "checkpoint"])
    elif case == "truncated":
        ck.write_bytes(good.read_bytes()[:3000])
        c.update(names=[ck, "file"])
    elif case == "corrupt":
        ck.write_bytes(bytes(range(7, 256)) * 40)
        c.update(names=[ck, "file"])
    elif case == "text":
        ck.write_text("hello, I am a text file\n")
        c.update(names=[ck, "file"])
    elif case == "zero_bytes":
        ck.write_bytes(b"")
        c.update(names=[ck, "file"])
    elif case == "code_pickle":
        _pickle_bomb(ck, root / "MARKER")
        c.update(names=[ck, "pickle", "refused"], marker=root / "MARKER")
    elif case == "corrupt_safetensors":
        ck = root / "ck.safetensors"
        ck.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2, 3]}")
        c.update(names=[ck, "header"])
    elif case == "unknown_architecture":
        torch.save({**arch_cfg, "architecture": "gpt5", "config": {}, "state_dict": {}}, ck)
        c.update(names=[ck, "architecture", "gpt5"])
    elif case in ("missing_weights", "unexpected_weights", "wrong_shape"):
        config, model = checkpoint.demo_model("student", TINY["student"])
        sd = dict(model.state_dict())
        if case == "missing_weights":
            del sd["norm.weight"]
            c.update(names=[ck, "state_dict", "missing", "norm.weight"])
        elif case == "unexpected_weights":
            sd["extra.weight"] = torch.zeros(2)
            c.update(names=[ck, "state_dict", "unexpected", "extra.weight"])
        else:
            sd["lm_head.weight"] = torch.zeros(7, 32)
            c.update(names=[ck, "state_dict.lm_head.weight"])
        checkpoint.save(ck, "student", config, sd)
    elif case == "bad_config":
        torch.save({**arch_cfg, "config": {**TINY["student"], "n_kv_heads": 3}, "state_dict": {}}, ck)
        c.update(names=[ck, "config.n_kv_heads"])
    elif case == "T_too_large":
        c.update(args=["--checkpoint", good, "--out", out, "--enumerated-T", "8", "128"],
                 names=["--enumerated-T", "prefill[1]", "128", "maximum positions"])
    elif case == "T_duplicate":
        c.update(args=["--checkpoint", good, "--out", out, "--enumerated-T", "8", "16", "8"],
                 names=["--enumerated-T", "prefill[2]", "duplicate"])
    elif case.startswith("T_"):
        bad = {"T_zero": "0", "T_negative": "-1", "T_float": "1.5", "T_word": "abc"}[case]
        c.update(args=["--checkpoint", good, "--out", out, "--enumerated-T", "8", bad], names=["--enumerated-T", bad, "positive integer"])
    elif case == "unwritable_out":
        blocker = root / "a_file"
        blocker.write_text("not a folder\n")
        out = blocker / "sub"
        c.update(args=["--checkpoint", good, "--out", out, *T], names=[out, "--out"], out=out, keep={blocker: blocker.read_bytes()})
    elif case == "existing_out_kept":
        out.mkdir()
        (out / "keep.txt").write_text("precious\n")
        ck.write_bytes(b"")
        c.update(names=[ck, "file"], keep={out / "keep.txt": b"precious\n"}, existing=True)
    elif case.startswith("shape_sets_"):
        sets = root / "shape_sets.json"
        text, names = {
            "shape_sets_not_json": ("{not json", ["shape_sets", "not JSON"]),
            "shape_sets_bad_T": ('{"student": {"prefill": [8, "16"], "decode": [8]}}', ["student.prefill[1]"]),
            "shape_sets_no_mode": ('{"student": {"prefill": [8]}}', ["student.decode"]),
            "shape_sets_missing": (None, ["shape_sets", "no such file"]),
            "shape_sets_too_large": ('{"student": {"prefill": [8, 4096], "decode": [8]}}', ["student.prefill[1]", "maximum positions"]),
        }[case]
        if text is not None:
            sets.write_text(text)
        c.update(args=["--checkpoint", good, "--out", out, "--shape-sets", sets], names=[sets, *names])
    else:
        raise AssertionError(case)
    if c["args"] is None:
        c["args"] = ["--checkpoint", ck, "--out", out, *T]
    c["before"] = files_of(c["out"]) if c["out"].is_dir() else None
    return c


CLI_CASES = [
    "missing_checkpoint", "truncated", "corrupt", "text", "zero_bytes", "code_pickle", "corrupt_safetensors",
    "unknown_architecture", "missing_weights", "unexpected_weights", "wrong_shape", "bad_config",
    "T_zero", "T_negative", "T_float", "T_word", "T_too_large", "T_duplicate",
    "unwritable_out", "existing_out_kept",
    "shape_sets_not_json", "shape_sets_bad_T", "shape_sets_no_mode", "shape_sets_missing", "shape_sets_too_large",
]


# These run as real ``python -m`` processes; the others in forked children (see conftest.fork_module).
REAL_PROCESS_CASES = ("missing_checkpoint", "code_pickle", "T_word", "wrong_shape")


@pytest.fixture(scope="session")
def cli_results(tmp_path_factory):
    """Run every bad-input case in its own process."""
    root = tmp_path_factory.mktemp("cli")
    cases = {name: _setup_case(name, root / name) for name in CLI_CASES}
    with ThreadPoolExecutor(len(REAL_PROCESS_CASES)) as pool:
        real = dict(zip(REAL_PROCESS_CASES, pool.map(
            lambda n: run_module("export.export_pytorch", *cases[n]["args"], cwd=root / n), REAL_PROCESS_CASES)))
    forked = {n: fork_module("export.export_pytorch", *cases[n]["args"], cwd=root / n)
              for n in CLI_CASES if n not in real}
    return {name: (cases[name], real.get(name) or forked[name]) for name in CLI_CASES}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input_one_clear_error(cli_results, case):
    c, r = cli_results[case]
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("error:"), line
    for name in c["names"]:
        assert str(name) in line, (name, line)
    assert r.stdout == ""
    # nothing left behind: the output folder was not created, or is exactly as it was
    out = c["out"]
    if c["before"] is None:
        assert not out.exists(), sorted(p.name for p in out.iterdir())
    else:
        assert files_of(out) == c["before"]
    for path, data in c.get("keep", {}).items():
        assert path.read_bytes() == data
    if "marker" in c:
        assert not c["marker"].exists(), "the pickle ran code"
