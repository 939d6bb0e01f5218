"""hf-causal-lm: real transformers causal LMs (tiny, random weights, made here with
transformers' own config classes and ``save_pretrained``) through export, Core ML
conversion and bundle, with parity against transformers; the aten::alias converter;
the preflight that names unsupported ops and where they come from; a real doit build.
No hub access: every model is built locally.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from export.coreml import bundle, convert as convert_coreml
from export import checkpoint, export_pytorch  # noqa: E402
from export.coreml.convert import load_program  # noqa: E402
from export.coreml.checks import check_supported, unsupported_ops  # noqa: E402
from export.errors import ExportError  # noqa: E402

from conftest import run_module  # noqa: E402
from test_models import rollout_logits  # noqa: E402

# Independent tests with no module fixture, most of them a whole export + conversion: either worker.
pytestmark = pytest.mark.spread

T = 16
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": 64}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16}),           # q/k norms
    "gemma": (transformers.GemmaConfig, {"head_dim": 16}),           # scaled embeddings, (1 + w) norms, gelu
    "phi3": (transformers.Phi3Config, {}),                           # fused qkv and gate_up projections
}
ATOL = 1e-4


def save_family(root, family: str, seed: int = 0):
    """A tiny random-weight model of ``family`` saved as users have it: config.json + model.safetensors."""
    config_cls, extra = FAMILIES[family]
    config = config_cls(**SIZES, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    folder = root / family
    model.save_pretrained(folder)
    return folder


def reference_logits(folder, ids: list[int]) -> torch.Tensor:
    """transformers' own forward (its own mask and cache code), fp32: logits [len(ids), V]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return lm(input_ids=torch.tensor([ids])).logits[0]


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, SIZES["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_through_export_conversion_and_bundle(tmp_path, family):
    folder = save_family(tmp_path, family)
    ck = checkpoint.load(folder)
    assert ck.arch.name == "hf-causal-lm" and ck.config.model_type == family
    out = tmp_path / "exported"
    agg = export_pytorch.export_model(folder, out, enumerated_T=[T], formats=["exported_program"], model_name=family)
    assert sorted(agg["functions"]) == ["decode_T16", "prefill_T16"]
    prefill = load_program(out / "prefill_T16.pt2")[1].module()
    decode = load_program(out / "decode_T16.pt2")[1].module()

    # Parity of the exported prefill with transformers (logits at the real tokens; the tail is padding).
    ids = tokens(12, seed=1)
    want = reference_logits(folder, ids)
    inp = torch.zeros(1, T, dtype=torch.int32)
    inp[0, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    with torch.no_grad():
        logits, k_cache, v_cache = prefill(inp, torch.arange(T, dtype=torch.int32)[None])
    torch.testing.assert_close(logits[0, :len(ids)], want, atol=ATOL, rtol=ATOL)
    d = ck.arch.io(ck.config, "prefill", T)
    assert [tuple(t.shape) for t in (logits, k_cache, v_cache)] == [t.shape for t in d.outputs]

    # Rollout: prefill of n tokens, then k exported decode steps = transformers on all n + k tokens.
    n, k = 5, 7
    with torch.no_grad():
        got, _, _ = rollout_logits(prefill, decode, ids, n, T)
    torch.testing.assert_close(got, want[n:n + k], atol=ATOL, rtol=ATOL)

    # Core ML: each (mode, T), checked against its contract, then one bundle.
    packages = []
    for fn in agg["functions"]:
        packages.append(convert_coreml.convert(out / f"{fn}.pt2", tmp_path / f"{fn}.mlpackage",
                                               out / f"{fn}.contract.json", log=lambda _: None))
    bundle.bundle(packages, [out / f"{fn}.contract.json" for fn in agg["functions"]],
                           tmp_path / f"{family}.mlpackage", tmp_path / "contract.json")
    assert (tmp_path / f"{family}.mlpackage" / "Manifest.json").exists()
    contract = json.loads((tmp_path / "contract.json").read_text())
    assert sorted(contract["functions"]) == ["decode_T16", "prefill_T16"]
    assert contract["functions"]["decode_T16"]["architecture"] == "hf-causal-lm"
    assert "transformers" in contract["functions"]["decode_T16"]["toolchain"]


def test_stateful_decode_matches_explicit_and_converts(tmp_path):
    """kv_cache = "state": the cache is a buffer written in place; same logits as the explicit decode."""
    folder = save_family(tmp_path, "qwen2")
    ck = checkpoint.load(folder)
    model = ck.model()
    arch = ck.arch
    stateful = arch.wrap(model, "decode", kv_cache="state", T=T).eval()
    explicit = arch.wrap(model, "decode").eval()
    ids = tokens(4, seed=2)
    kc = torch.zeros(arch.io(ck.config, "decode", T).inputs[2].shape)
    vc = torch.zeros_like(kc)
    with torch.no_grad():
        for p, tok in enumerate(ids):
            a = torch.tensor([[tok]], dtype=torch.int32)
            pos = torch.tensor([[p]], dtype=torch.int32)
            (s_logits,) = stateful(a, pos)
            e_logits, k_new, v_new = explicit(a, pos, kc, vc)
            kc[:, :, :, p:p + 1], vc[:, :, :, p:p + 1] = k_new, v_new
            torch.testing.assert_close(s_logits, e_logits, atol=5e-3, rtol=5e-3)  # fp16 state vs fp32 cache
    out = tmp_path / "exported"
    export_pytorch.export_model(folder, out, modes=["decode"], enumerated_T=[T], formats=["exported_program"],
                                kv_cache="state")
    pkg = convert_coreml.convert(out / "decode_T16.pt2", tmp_path / "decode_T16.mlpackage", out / "decode_T16.contract.json",
                                 {"kv_cache": "state", "minimum_deployment_target": "iOS18"}, log=lambda _: None)
    assert pkg.exists()


class _Alias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.arange(8, dtype=torch.float32).reshape(2, 4) / 7)

    def forward(self, x):
        return torch.ops.aten.alias(x) * 2 + torch.ops.aten.alias(self.w)


def test_alias_converter_is_numerically_the_identity():
    """aten::alias (transformers' slice_logits_to_keep) has our converter: the converted program
    computes x * 2 + w, with w's values intact."""
    import coremltools as ct

    ep = torch.export.export(_Alias(), (torch.randn(2, 4),)).run_decompositions({})
    assert "aten::alias" in {n.target.name() for n in ep.graph.nodes if n.op == "call_function"}
    assert unsupported_ops(ep) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(ep, inputs=[ct.TensorType(name="x", shape=(2, 4))], convert_to="mlprogram",
                        compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    ops = list(ml._mil_program.functions["main"].operations)
    consts = [op.outputs[0].val for op in ops if op.op_type == "const" and np.shape(op.outputs[0].val) == (2, 4)]
    assert len(consts) == 1
    np.testing.assert_allclose(consts[0], _Alias().w.numpy(), rtol=0, atol=0)
    kinds = [op.op_type for op in ops if op.op_type != "const"]
    assert kinds == ["mul", "add"]  # the aliases are gone; nothing else was added


class _TransformersMask(torch.nn.Module):
    """What one first tries: the transformers model with its own mask code (a 2D attention mask)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids):
        return self.lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=position_ids,
                       use_cache=False).logits


def test_preflight_names_unsupported_ops_and_where_they_come_from(tmp_path):
    folder = save_family(tmp_path, "llama")
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = torch.ones(1, T, dtype=torch.int32)
    pt2 = tmp_path / "naive.pt2"
    pt2.write_bytes(export_pytorch.export_program(_TransformersMask(lm).eval(), (ids, torch.arange(T, dtype=torch.int32)[None])))
    _, program = load_program(pt2)
    with pytest.raises(ExportError) as e:
        check_supported(program, file=pt2)
    msg = str(e.value)
    assert "coremltools cannot convert" in msg and "aten::new_ones" in msg
    assert "lm.model (LlamaModel)" in msg  # the module ...
    assert "transformers/models/llama/modeling_llama.py:" in msg and "create_causal_mask" in msg  # ... and the source line
    assert str(tmp_path) not in msg.split(":", 1)[1]  # portable: no absolute path of this checkout


def test_folder_checkpoints_are_refused_clearly(tmp_path):
    folder = save_family(tmp_path, "llama")
    (folder / "model.safetensors").rename(folder / "weights.bin")
    with pytest.raises(ExportError) as e:
        checkpoint.load(folder)
    assert "model.safetensors" in str(e.value)
    (folder / "weights.bin").rename(folder / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "t5", "is_encoder_decoder": True}))
    with pytest.raises(ExportError) as e:
        checkpoint.load(folder)
    assert "config.json" in str(e.value)


def test_doit_builds_a_model_folder_and_tracks_its_files(tmp_path):
    from scenario import Project

    project = Project.create(tmp_path / "p")
    save_family(project.root / "models", "llama")
    (project.root / "pyproject.toml").write_text(
        '[tool.export]\nartifacts = "artifacts"\nshape_sets = "shape_sets.json"\n\n'
        '[[tool.export.models]]\nname = "llama"\narchitecture = "hf-causal-lm"\ncheckpoint = "models/llama"\n'
        'shape_set = "hf"\n')
    project.set_shape_sets({"hf": {"prefill": [T], "decode": [T]}})
    project.doit()
    assert project.ran() == {"export_pytorch:llama.prefill.T16", "export_pytorch:llama.decode.T16",
                             "convert_coreml:llama.prefill.T16", "convert_coreml:llama.decode.T16",
                             "verify_coreml:llama.prefill.T16", "verify_coreml:llama.decode.T16",
                             "bundle_coreml:llama", "verify_coreml:llama"}
    assert (project.root / "artifacts" / "llama" / "llama.mlpackage").is_dir()
    project.doit()
    assert project.ran() == set()
    save_family(project.root / "models", "llama", seed=1)  # new weights in the folder: everything rebuilds
    project.doit()
    assert {"export_pytorch:llama.prefill.T16", "export_pytorch:llama.decode.T16"} <= project.ran()


# Families the hf-causal-lm path cannot drive: refused before export, one error line naming model_type
# and what does not fit (issue #20; GPT-2 and GPT-NeoX ended in torch's broadcast error, a MoE in the converter).
REFUSED = {
    # their attention uses every head: the config's num_key_value_heads is not what their layers keep
    "gpt2": (transformers.GPT2Config, {}, "num_key_value_heads", "4 heads"),
    "gpt_neox": (transformers.GPTNeoXConfig, {}, "num_key_value_heads", "4 heads"),
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}, "num_local_experts",
                "mixture of experts"),
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_unsupported_family_is_refused_before_export(tmp_path, family):
    config_cls, extra, field, reason = REFUSED[family]
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config_cls(**SIZES, **extra)).save_pretrained(tmp_path / family)
    out = tmp_path / "exported"
    r = run_module("export.export_pytorch", "--checkpoint", tmp_path / family, "--out", out, "--enumerated-T", "16",
                   "--format", "exported_program")
    both = r.stdout + r.stderr
    errors = [ln for ln in both.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and "Traceback" not in both, both[-3000:]
    assert len(errors) == 1, both[-3000:]
    assert f"model_type {family!r}" in errors[0] and f"config.json: {field}:" in errors[0] and reason in errors[0], errors
    assert not list(out.glob("*.pt2")) if out.exists() else True
