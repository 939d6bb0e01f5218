"""The reference interpreter and the numerical verification, for real: every op of the
interpreter against coremltools' own semantics (tiny MIL programs converted to ML
Program packages), real conversions of the student, the judge and transformers
families checked against their ExportedPrograms (fp32 and fp16), compressed and
stateful packages, the bundle, decode against prefill through the packages, and
three deliberately broken packages caught and named."""
from __future__ import annotations

import ast
import shutil
import struct
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from conftest import REPO, run_module
from coreml_helpers import STUDENT
from export import checkpoint, export_pytorch
from export.coreml.bundle import bundle
from export.coreml.convert import convert
from export.coreml.interpreter import OPS, InterpreterError, Package, op_types
from export import contract as contract_mod
from export.coreml.verify import FP16_RTOL, FP32_RTOL, Program, verify, verify_bundle

T = 8
rng = np.random.default_rng(0)


def _convert(tmp: Path, exported: Path, mode: str, name: str, T: int = T, **options) -> Path:
    return convert(exported / f"{mode}_T{T}.pt2", tmp / f"{name}.mlpackage", exported / f"{mode}_T{T}.contract.json",
                   options, log=lambda *_: None)


_PROGRAMS: dict = {}


def _program(exported: Path, mode: str, T: int = T) -> Program:
    """The ExportedProgram of one (mode, T), loaded once per session (never for compressed packages: verify
    replaces their weights)."""
    key = (exported, mode, T)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = Program(exported / f"{mode}_T{T}.pt2", contract_mod.read(exported / f"{mode}_T{T}.contract.json"))
    return _PROGRAMS[key]


def _check(pkg: Path, exported: Path, mode: str, T: int = T, shared: bool = True):
    v = verify(pkg, exported / f"{mode}_T{T}.pt2", exported / f"{mode}_T{T}.contract.json",
               program=_program(exported, mode, T) if shared else None)
    assert v.failure() is None, v.failure()
    return v


# ------------------------------------------------------------------ ops against coremltools

def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def _sl(x, begin, end, squeeze_mask=None):
    sl = tuple(slice(b, e) for b, e in zip(begin, end))
    out = x[sl]
    return out if squeeze_mask is None else np.squeeze(out, axis=tuple(i for i, m in enumerate(squeeze_mask) if m))


def _upd(x, u, begin, end):
    x = x.copy()
    x[tuple(slice(b, e) for b, e in zip(begin, end))] = u
    return x


def _ln(x, g, b):
    m = x.mean(-1, keepdims=True)
    return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b


def _erf(x):
    import math

    return np.vectorize(math.erf)(x.astype(np.float64))


# (op, graph inputs, constant params, numpy reference of the inputs; None: coremltools' value_inference only)
_x, _y, _p = f32(2, 3, 4), f32(2, 3, 4), np.abs(f32(2, 3, 4)) + 0.5
_ids = np.array([[3, 0, 5, 1]], np.int32)
_g, _b = f32(4), f32(4)
CASES = [
    ("add", {"x": _x, "y": _y}, {}, lambda x, y: x + y),
    ("sub", {"x": _x, "y": _y}, {}, lambda x, y: x - y),
    ("mul", {"x": _x, "y": _y}, {}, lambda x, y: x * y),
    ("real_div", {"x": _x, "y": _p}, {}, lambda x, y: x / y),
    ("pow", {"x": _p}, {"y": np.float32(2.5)}, lambda x: x ** 2.5),
    ("maximum", {"x": _x, "y": _y}, {}, np.maximum),
    ("minimum", {"x": _x, "y": _y}, {}, np.minimum),
    ("floor_div", {"x": _x, "y": _p}, {}, np.floor_divide),
    ("mod", {"x": _x, "y": _p}, {}, np.mod),
    ("equal", {"x": np.round(_x), "y": np.round(_y)}, {}, np.equal),
    ("not_equal", {"x": np.round(_x), "y": np.round(_y)}, {}, np.not_equal),
    ("greater", {"x": _x, "y": _y}, {}, np.greater),
    ("greater_equal", {"x": _x, "y": _y}, {}, np.greater_equal),
    ("less", {"x": _x, "y": _y}, {}, np.less),
    ("less_equal", {"x": _x, "y": _y}, {}, np.less_equal),
    ("sin", {"x": _x * 5}, {}, np.sin), ("cos", {"x": _x * 5}, {}, np.cos),
    ("exp", {"x": _x}, {}, np.exp), ("sqrt", {"x": _p}, {}, np.sqrt), ("tanh", {"x": _x}, {}, np.tanh),
    ("abs", {"x": _x}, {}, np.abs), ("square", {"x": _x}, {}, np.square),
    ("floor", {"x": _x * 3}, {}, np.floor), ("ceil", {"x": _x * 3}, {}, np.ceil), ("round", {"x": _x * 3}, {}, np.round),
    ("sign", {"x": _x}, {}, np.sign), ("erf", {"x": _x}, {}, _erf),
    ("relu", {"x": _x}, {}, lambda x: np.maximum(x, 0)), ("sigmoid", {"x": _x}, {}, lambda x: 1 / (1 + np.exp(-x))),
    ("silu", {"x": _x}, {}, lambda x: x / (1 + np.exp(-x))),
    ("rsqrt", {"x": _p}, {}, lambda x: 1 / np.sqrt(x + 1e-12)),
    ("log", {"x": _p}, {}, np.log), ("inverse", {"x": _p}, {}, lambda x: 1 / (x + 1e-4)),
    ("clip", {"x": _x}, {"alpha": np.float32(-0.5), "beta": np.float32(0.7)}, lambda x: np.clip(x, -0.5, 0.7)),
    ("gelu", {"x": _x}, {"mode": "EXACT"}, lambda x: 0.5 * x * (1 + _erf(x / np.sqrt(2)))),
    ("gelu", {"x": _x}, {"mode": "TANH_APPROXIMATION"},
     lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))),
    ("softmax", {"x": _x * 4}, {"axis": -1}, lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)),
    ("cast", {"x": _x * 4}, {"dtype": "int32"}, lambda x: x.astype(np.int32)),
    ("reduce_mean", {"x": _x}, {"axes": [-1], "keep_dims": True}, lambda x: x.mean(-1, keepdims=True)),
    ("reduce_sum", {"x": _x}, {"axes": [1]}, lambda x: x.sum(1)),
    ("reduce_max", {"x": _x}, {"axes": [0, 2]}, lambda x: x.max((0, 2))),
    ("reduce_min", {"x": _x}, {"axes": [2]}, lambda x: x.min(2)),
    ("reduce_prod", {"x": _p}, {"axes": [2]}, lambda x: x.prod(2)),
    ("reshape", {"x": _x}, {"shape": np.array([3, -1], np.int32)}, lambda x: x.reshape(3, -1)),
    ("expand_dims", {"x": _x}, {"axes": [0, -1]}, lambda x: x[None, ..., None]),
    ("squeeze", {"x": f32(1, 3, 1, 4)}, {"axes": [0, 2]}, lambda x: x[0, :, 0]),
    ("transpose", {"x": _x}, {"perm": [2, 0, 1]}, lambda x: x.transpose(2, 0, 1)),
    ("tile", {"x": _x}, {"reps": [1, 2, 3]}, lambda x: np.tile(x, (1, 2, 3))),
    ("concat", {"x": _x, "y": _y}, {"axis": 1}, None),
    ("stack", {"x": _x, "y": _y}, {"axis": 1}, None),
    ("split", {"x": f32(2, 6, 4)}, {"split_sizes": [1, 2, 3], "axis": 1}, lambda x: x[:, 3:]),
    ("slice_by_index", {"x": _x}, {"begin": [0, 1, 1], "end": [1, 3, 4], "squeeze_mask": [True, False, False]},
     lambda x: _sl(x, [0, 1, 1], [1, 3, 4], [True, False, False])),
    ("slice_update", {"x": _x, "update": f32(2, 1, 4)}, {"begin": [0, 2, 0], "end": [2, 3, 4]},
     lambda x, update: _upd(x, update, [0, 2, 0], [2, 3, 4])),
    ("gather", {"x": f32(6, 5), "indices": _ids}, {"axis": 0}, lambda x, indices: x[indices]),
    ("gather_along_axis", {"x": f32(3, 6), "indices": np.array([[0, 5], [2, 2], [1, 0]], np.int32)}, {"axis": 1},
     lambda x, indices: np.take_along_axis(x, indices, 1)),
    ("select", {"cond": _x > 0, "a": _x, "b": _y}, {}, np.where),
    ("cumsum", {"x": _x}, {"axis": 1, "exclusive": True, "reverse": True}, None),
    ("matmul", {"x": f32(2, 3, 4), "y": f32(2, 5, 4)}, {"transpose_y": True}, lambda x, y: x @ y.transpose(0, 2, 1)),
    ("linear", {"x": f32(2, 4)}, {"weight": f32(5, 4), "bias": f32(5)}, None),
    ("layer_norm", {"x": _x}, {"axes": [-1], "gamma": _g, "beta": _b}, lambda x: _ln(x, _g, _b)),
    ("band_part", {"x": f32(5, 5)}, {"lower": 1, "upper": 0}, lambda x: np.tril(np.triu(x, -1))),
    ("logical_and", {"x": _x > 0, "y": _y > 0}, {}, np.logical_and),
    ("logical_or", {"x": _x > 0, "y": _y > 0}, {}, np.logical_or),
    ("logical_not", {"x": _x > 0}, {}, np.logical_not),
    ("identity", {"x": _x}, {}, lambda x: x),
]
_NUMPY_OP_REFS = {"concat": lambda x, y: np.concatenate([x, y], 1), "stack": lambda x, y: np.stack([x, y], 1),
                  "cumsum": lambda x: np.flip(np.cumsum(np.flip(x, 1), 1), 1) - x,
                  "linear": None}


def _spec(x: np.ndarray):
    dtype = {np.dtype(np.float32): types.fp32, np.dtype(np.int32): types.int32, np.dtype(np.bool_): types.bool}[x.dtype]
    return mb.TensorSpec(shape=x.shape, dtype=dtype)


def _call(op, ins: dict, params: dict):
    if op in ("concat", "stack"):
        return getattr(mb, op)(values=[ins["x"], ins["y"]], **params)
    return getattr(mb, op)(**ins, **params)


@pytest.fixture(scope="module")
def op_package(tmp_path_factory):
    """Every case in one program (its ops on graph inputs, one output each), converted once to an iOS18 ML Program
    in fp32; the references: coremltools' own value_inference of each op on constant inputs (numpy where
    coremltools has none)."""
    feeds = {f"c{i}_{n}": v for i, (_, ins, _, _) in enumerate(CASES) for n, v in ins.items()}

    def body(args):
        outs = []
        for i, (op, ins, params, _) in enumerate(CASES):
            res = _call(op, {n: args[f"c{i}_{n}"] for n in ins}, params)
            outs.append(res[-1] if isinstance(res, (list, tuple)) else res)
        return outs

    scope = {"body": body}  # mb.program reads the function's argument names: one named argument per input
    exec(f"def prog({', '.join(feeds)}):\n    return body(dict({', '.join(f'{n}={n}' for n in feeds)}))", scope)
    prog = mb.program(input_specs=[_spec(v) for v in feeds.values()], opset_version=ct.target.iOS18)(scope["prog"])

    wants = []

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS18)
    def consts(dummy):
        for op, ins, params, ref in CASES:
            try:
                res = _call(op, dict(ins), params)
                val = (res[-1] if isinstance(res, (list, tuple)) else res).val
            except Exception:  # a value_inference that fails (cumsum exclusive in coremltools 9.0)
                val = None
            if val is None:
                ref = ref or _NUMPY_OP_REFS[op]
                val = ref(**ins) if op != "linear" else ins["x"] @ params["weight"].T + params["bias"]
            wants.append(np.asarray(val))
        return dummy

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    path = tmp_path_factory.mktemp("ops") / "ops.mlpackage"
    model.save(str(path))
    outputs = [o.name for o in model.get_spec().description.output]
    return path, feeds, outputs, wants


def test_every_op_of_the_interpreter_matches_coremltools(op_package):
    path, feeds, outputs, wants = op_package
    have = set(op_types(path)["main"])
    missing = {op for op, *_ in CASES} - have
    assert not missing, f"rewritten by the converter, so the case tests nothing: {missing}"
    got = Package(path).run("main", feeds)
    for (op, *_), name, want in zip(CASES, outputs, wants):
        value = got[name]
        assert value.shape == want.shape, op
        np.testing.assert_allclose(value.astype(np.float64), want.astype(np.float64), rtol=2e-6, atol=2e-6, err_msg=op)
    special = {"const", "cast", "read_state", "write_state", "coreml_update_state", "scaled_dot_product_attention",
               "fill", "range_1d", "shape", "logical_xor", "constexpr_affine_dequantize", "constexpr_lut_to_dense",
               "constexpr_blockwise_shift_scale", "constexpr_cast"}  # covered by the package tests below
    assert set(OPS) - {op for op, *_ in CASES} <= special, sorted(set(OPS) - {op for op, *_ in CASES} - special)


def test_fp16_program_rounds_and_overflows_like_the_device(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(4,)), mb.TensorSpec(shape=(4,))], opset_version=ct.target.iOS17)
    def prog(x, y):
        return mb.mul(x=x, y=y)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                       compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    model.save(str(tmp_path / "m.mlpackage"))
    assert {"cast", "mul"} <= set(op_types(tmp_path / "m.mlpackage")["main"])
    x = np.array([300.0, 1.0001, 2.0, -300.0], np.float32)
    y = np.array([300.0, 1.0, 3.0, 300.0], np.float32)
    (got,) = Package(tmp_path / "m.mlpackage").run("main", {"x": x, "y": y}).values()
    assert got.dtype == np.float32 and np.isposinf(got[0]) and np.isneginf(got[3])  # 90000 > fp16 max 65504
    assert got[1] == np.float32(np.float16(1.0001)) and got[2] == 6.0


def test_sdpa_and_states_against_numpy(tmp_path):
    """iOS18 scaled_dot_product_attention, read_state and coreml_update_state: a state that accumulates."""
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 3, 4)), mb.TensorSpec(shape=(1, 2, 5, 4)),
                             mb.TensorSpec(shape=(1, 2, 5, 4)), mb.StateTensorSpec(shape=(1, 2, 3, 4), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(q, k, v, acc):
        att = mb.scaled_dot_product_attention(query=q, key=k, value=v)
        att16 = mb.cast(x=att, dtype="fp16")
        total = mb.add(x=mb.read_state(input=acc), y=att16)
        mb.coreml_update_state(state=acc, value=total)
        return mb.cast(x=total, dtype="fp32")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    model.save(str(tmp_path / "m.mlpackage"))
    pkg = Package(tmp_path / "m.mlpackage")
    assert "scaled_dot_product_attention" in op_types(tmp_path / "m.mlpackage")["main"]
    q, k, v = f32(1, 2, 3, 4), f32(1, 2, 5, 4), f32(1, 2, 5, 4)
    s = q @ k.transpose(0, 1, 3, 2) / 2.0
    want = (np.exp(s) / np.exp(s).sum(-1, keepdims=True)) @ v
    state = pkg.make_state("main")
    for step in (1, 2):
        (got,) = pkg.run("main", {"q": q, "k": k, "v": v}, state=state).values()
        np.testing.assert_allclose(got, step * want, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(state["acc"], 2 * want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("target,compress", [("iOS17", "palettize"), ("iOS18", "palettize"),
                                             ("iOS17", "int8"), ("iOS18", "int8")])
def test_compression_ops_decompress_the_weights(tmp_path, target, compress):
    """constexpr_lut_to_dense (iOS16 and iOS18 forms), constexpr_affine_dequantize, constexpr_blockwise_shift_scale:
    a linear layer's output within the compression's error of the dense weight's."""
    from coremltools.optimize import coreml as cto

    w = f32(64, 64)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 64))], opset_version=getattr(ct.target, target))
    def prog(x):
        return mb.linear(x=x, weight=w)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target),
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    if compress == "palettize":
        model = cto.palettize_weights(model, cto.OptimizationConfig(cto.OpPalettizerConfig(nbits=8, mode="uniform")))
        op, tol = "constexpr_lut_to_dense", 0.02
    else:
        model = cto.linear_quantize_weights(model, cto.OptimizationConfig(cto.OpLinearQuantizerConfig(dtype="int8")))
        op, tol = ("constexpr_affine_dequantize" if target == "iOS17" else "constexpr_blockwise_shift_scale"), 0.02
    model.save(str(tmp_path / "m.mlpackage"))
    assert op in op_types(tmp_path / "m.mlpackage")["main"]
    x = f32(3, 64)
    (got,) = Package(tmp_path / "m.mlpackage").run("main", {"x": x}).values()
    want = x @ w.T
    assert np.abs(got - want).max() / np.abs(want).max() < tol


def test_the_interpreter_imports_no_torch():
    src = (REPO / "export/coreml/interpreter.py").read_text()
    names = {a.name.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in names


def test_an_unknown_op_is_an_error_naming_op_and_function(tmp_path, exported):
    pkg = _convert(tmp_path, exported[("judge", "fp32")], "prefill", "j", compute_precision="fp32")
    bad = _edit_spec(pkg, tmp_path / "bad.mlpackage", lambda op: op.type == "softmax", lambda op: setattr(op, "type", "softermax"))
    with pytest.raises(InterpreterError, match=r"function main.*'softermax'"):
        Package(bad)
    r = run_module("export.verify_coreml", "--package", bad, "--exported", exported[("judge", "fp32")] / "prefill_T8.pt2",
                   "--contract", exported[("judge", "fp32")] / "prefill_T8.contract.json")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "softermax" in r.stderr, r.stderr


# ------------------------------------------------------------------ real packages vs their programs

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_student_and_judge_agree_with_the_program(tmp_path, exported, precision):
    for arch, modes in (("student", ("prefill", "decode")), ("judge", ("prefill",))):
        for mode in modes:
            pkg = _convert(tmp_path, exported[(arch, "fp32")], mode, f"{arch}-{mode}", compute_precision=precision)
            v = _check(pkg, exported[(arch, "fp32")], mode)
            assert v.precision == precision
            tol = FP32_RTOL if precision == "fp32" else FP16_RTOL
            assert all(o.tol == tol for o in v.outputs)
            assert {o.name for o in v.outputs} == ({"score"} if arch == "judge" else
                                                   {"logits", "k_cache", "v_cache"} if mode == "prefill" else
                                                   {"logits", "k_new", "v_new"})


HF_FAMILIES = ("llama", "qwen3", "gemma", "phi3")


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_transformers_families_agree_with_the_program(tmp_path, family):
    pytest.importorskip("transformers")
    from test_hf_causal_lm import save_family

    folder = save_family(tmp_path, family)
    out = tmp_path / "exported"
    export_pytorch.export_model(folder, out, enumerated_T=[T], formats=["exported_program"], model_name=family)
    # each family converts both modes, one in fp32 and the other in fp16 (alternating across the families: every
    # (mode, precision) is covered by two families; the student covers all four itself)
    first = "fp32" if HF_FAMILIES.index(family) % 2 == 0 else "fp16"
    for mode, precision in (("prefill", first), ("decode", {"fp32": "fp16", "fp16": "fp32"}[first])):
        v = _check(_convert(tmp_path, out, mode, f"{mode}-{precision}", compute_precision=precision), out, mode)
        assert v.precision == precision


@pytest.fixture(scope="module")
def student64(tmp_path_factory):
    """The compression-sized student (coreml_helpers.STUDENT): ExportedPrograms at T=16, explicit and stateful."""
    root = tmp_path_factory.mktemp("student64")
    config, model = checkpoint.demo_model("student", STUDENT)
    ck = root / "student.pt"
    checkpoint.save(ck, "student", config, model.state_dict())
    explicit, state = root / "explicit", root / "state"
    export_pytorch.export_model(ck, explicit, enumerated_T=[16], formats=["exported_program"])
    export_pytorch.export_model(ck, state, modes=["decode"], enumerated_T=[16], formats=["exported_program"], kv_cache="state")
    return {"explicit": explicit, "state": state}


@pytest.mark.parametrize("options", [
    {"compression": "palettize", "palettize_bits": 4},
    {"compression": "linear_int8"},
    {"compression": "linear_int8", "minimum_deployment_target": "iOS18"},
])
def test_compressed_packages_agree(tmp_path, student64, options):
    mode = "decode" if options.get("minimum_deployment_target") else "prefill"
    pkg = _convert(tmp_path, student64["explicit"], mode, "c", T=16, **options)
    v = _check(pkg, student64["explicit"], mode, T=16, shared=False)
    assert len(v.weights) == 12 and 0 < max(v.weights.values()) <= v.weight_tol  # 2 layers x 6 linears


def test_stateful_decode_agrees_including_the_states(tmp_path, student64):
    pkg = _convert(tmp_path, student64["state"], "decode", "s", T=16, kv_cache="state", minimum_deployment_target="iOS18")
    v = _check(pkg, student64["state"], "decode", T=16)
    assert {o.name for o in v.outputs} == {"logits", "state k_cache", "state v_cache"}


def test_bundle_functions_reproduce_their_leaves(tmp_path, exported):
    ex = exported[("student", "fp32")]
    leaves, contracts = {}, {}
    for mode, t in (("prefill", 8), ("decode", 8), ("decode", 16)):
        leaves[f"{mode}_T{t}"] = _convert(tmp_path, ex, mode, f"{mode}_T{t}", T=t)
        contracts[f"{mode}_T{t}"] = ex / f"{mode}_T{t}.contract.json"
    bundle(list(leaves.values()), list(contracts.values()), tmp_path / "b" / "student.mlpackage")
    verdicts = verify_bundle(tmp_path / "b" / "student.mlpackage", leaves, contracts=contracts)
    assert sorted(verdicts) == sorted(leaves)
    for fn, v in verdicts.items():
        assert v.failure() is None and all(o.max_abs == 0 for o in v.outputs), (fn, v.failure())
    # and a bundle function verifies against its program like its leaf does
    v = verify(tmp_path / "b" / "student.mlpackage", ex / "decode_T16.pt2", ex / "decode_T16.contract.json", "decode_T16",
               program=_program(ex, "decode", 16))
    assert v.failure() is None


# ------------------------------------------------------------------ decode against prefill, through Core ML

def _rollout(prefill: Package, decode: Package, ids, n: int, Tcap: int, stateful: bool):
    inp = np.zeros((1, Tcap), np.int32)
    inp[0, :n] = ids[:n]
    out = prefill.run(None, {"input_ids": inp, "position_ids": np.arange(Tcap, dtype=np.int32)[None]})
    k, v = out["k_cache"].copy(), out["v_cache"].copy()
    k[:, :, :, n:], v[:, :, :, n:] = 1e3, -1e3  # the padding's slots: loud garbage the mask must hide
    state = None
    if stateful:
        state = decode.make_state(None)
        state["k_cache"][...], state["v_cache"][...] = k.astype(np.float16), np.clip(v, -6e4, 6e4).astype(np.float16)
    logits = []
    for p in range(n, len(ids)):
        feed = {"input_ids": np.array([[ids[p]]], np.int32), "position_ids": np.array([[p]], np.int32)}
        if not stateful:
            feed.update(k_cache=k, v_cache=v)
        o = decode.run(None, feed, state=state)
        logits.append(o["logits"][0, 0])
        if not stateful:
            k[:, :, :, p:p + 1], v[:, :, :, p:p + 1] = o["k_new"], o["v_new"]
    return np.stack(logits)


@pytest.mark.parametrize("cache", ["explicit", "state"])
def test_prefill_then_decode_equals_a_longer_prefill_through_the_packages(tmp_path, student64, cache):
    ids = np.random.default_rng(3).integers(3, STUDENT["vocab_size"], 9).astype(np.int32)
    n, Tcap = 5, 16
    precision = "fp32" if cache == "explicit" else "fp16"
    prefill = Package(_convert(tmp_path, student64["explicit"], "prefill", "p", T=16, compute_precision=precision,
                               minimum_deployment_target="iOS18"))
    if cache == "explicit":
        decode = Package(_convert(tmp_path, student64["explicit"], "decode", "d", T=16, compute_precision=precision))
    else:
        decode = Package(_convert(tmp_path, student64["state"], "decode", "d", T=16, kv_cache="state",
                                  minimum_deployment_target="iOS18"))
    got = _rollout(prefill, decode, ids, n, Tcap, stateful=cache == "state")
    full = np.zeros((1, Tcap), np.int32)
    full[0, :len(ids)] = ids
    want = prefill.run(None, {"input_ids": full, "position_ids": np.arange(Tcap, dtype=np.int32)[None]})["logits"][0, n:len(ids)]
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < (FP32_RTOL if precision == "fp32" else FP16_RTOL), rel


# ------------------------------------------------------------------ broken packages are caught and named

def _edit_spec(pkg: Path, out: Path, match, change) -> Path:
    shutil.copytree(pkg, out)
    model = out / "Data/com.apple.CoreML/model.mlmodel"
    spec = ct.utils.load_spec(str(out))
    for fn in spec.mlProgram.functions.values():
        for op in fn.block_specializations[fn.opset].operations:
            if match(op):
                change(op)
                model.write_bytes(spec.SerializeToString())
                return out
    raise AssertionError("no op matched")


def _flip_signs(pkg: Path, out: Path, const_name: str) -> Path:
    """Negate every fp16 value of one weight blob (the sign bit of each element) in weights/weight.bin."""
    shutil.copytree(pkg, out)
    spec = ct.utils.load_spec(str(out))
    op = next(op for fn in spec.mlProgram.functions.values() for op in fn.block_specializations[fn.opset].operations
              if op.type == "const" and op.outputs[0].name == const_name)
    meta = op.attributes["val"].blobFileValue.offset
    blob = out / "Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(blob.read_bytes())
    sentinel, dtype, size, offset = struct.unpack_from("<IIQQ", data, meta)  # the blob's metadata record
    assert sentinel == 0xDEADBEEF
    for i in range(offset + 1, offset + size, 2):  # little-endian fp16: the sign is the top bit of the second byte
        data[i] ^= 0x80
    blob.write_bytes(bytes(data))
    return out


def _mask_const(op) -> bool:
    if op.type != "const":
        return False
    t = op.attributes["val"]
    if t.WhichOneof("value") != "immediateValue":
        return False
    tv = t.immediateValue.tensor
    vals = np.frombuffer(tv.bytes.values, np.float16) if tv.WhichOneof("value") == "bytes" else np.array(tv.floats.values)
    return vals.size == 1 and vals[0] == -1e4


def _set_mask(op):
    tv = op.attributes["val"].immediateValue.tensor
    if tv.WhichOneof("value") == "bytes":
        tv.bytes.values = np.array([-1.0], np.float16).tobytes()
    else:
        tv.floats.values[:] = [-1.0]


def _cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI's main in this process (a fork of a process that ran torch and BLAS threads can hang)."""
    from export.coreml.verify import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_three_broken_packages_are_caught_and_named(tmp_path, exported, capsys):
    ex = exported[("student", "fp32")]
    pkg = _convert(tmp_path, ex, "decode", "ok")
    args = (ex / "decode_T8.pt2", ex / "decode_T8.contract.json")
    program = _program(ex, "decode")
    assert verify(pkg, *args, program=program).failure() is None

    weight = next(s.args["weight"][1] for s in Package(pkg).function(None).steps if s.op_type == "linear")
    broken = {
        "flipped weight signs": _flip_signs(pkg, tmp_path / "flipped.mlpackage", weight),
        "swapped op": _edit_spec(pkg, tmp_path / "swapped.mlpackage", lambda op: op.type == "silu",
                                 lambda op: setattr(op, "type", "sigmoid")),
        "wrong mask constant": _edit_spec(pkg, tmp_path / "mask.mlpackage", _mask_const, _set_mask),
    }
    for kind, bad in broken.items():
        v = verify(bad, *args, program=program)
        msg = v.failure()
        assert msg is not None and msg.split(":")[0] in ("logits", "k_new", "v_new"), (kind, msg)
        assert "relative" in msg
    # the CLI: one line naming the output, exit 1; a good package: one line per output, exit 0
    code, out, err = _cli(capsys, "--package", broken["swapped op"], "--exported", args[0], "--contract", args[1])
    assert code == 1 and err.count("\n") == 1 and "logits: max abs error" in err, err
    code, out, err = _cli(capsys, "--package", pkg, "--exported", args[0], "--contract", args[1])
    assert code == 0 and [ln.split(":")[0] for ln in out.splitlines()] == ["logits", "k_new", "v_new"], out
