"""``hf-causal-lm``: a transformers decoder-only causal LM (a folder with
``config.json`` + ``model.safetensors``), presented with the student's contract.

The transformers model runs its own layers, norms, rotary embeddings and head;
this module only replaces the two parts Core ML cannot take as transformers 5
builds them:

- the mask: transformers derives it from a 2D mask (``torch.diff`` to detect
  packed sequences, ``new_ones``, ...). We pass a finite additive 4D mask made
  from ``position_ids`` (``decoder_lm.prefill_mask`` / ``decode_slots``), which
  transformers uses as is;
- the KV cache: instead of transformers' ``Cache`` classes, ``_StackedKV`` is
  handed to every attention layer as its ``cache``; its ``update`` records the
  layer's new K/V and returns the K/V the layer attends over (the token's K/V
  written into its slot of the caller's cache, in place for the stateful
  variant).

Attention runs in transformers' ``eager`` implementation (plain matmul +
additive mask + softmax), which converts; K/V come out stacked as
[L, 1, n_kv, T, head_dim] like the student's.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ExportError
from . import decoder_lm
from .decoder_lm import LMDims, PartSpec, decode_slots, prefill_mask, run_part, with_token
from .names import ARCHITECTURE_MODES, ARCHITECTURE_TOOLS
from .spec import Architecture

MODES = ARCHITECTURE_MODES["hf-causal-lm"]
FILES = ("config.json", "model.safetensors")  # what a model folder must hold (see export.checkpoint_files)
ATTENTION = "eager"
# config fields that give a mixture-of-experts model its number of experts (Mixtral, Qwen2-MoE, DeepSeek, ...)
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - the hf extra is part of the test extra
        raise ExportError("the hf-causal-lm architecture needs transformers: pip install 'model-export[hf]'",
                          field="architecture") from None
    return transformers


def load_config(folder: Path):
    """The folder's transformers config, read offline, without remote code."""
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"not a transformers config: {first}", file=folder / "config.json", field="model_type") from None
    check_config(config, file=folder / "config.json")
    return config


def check_config(config, *, file=None) -> None:
    """Refuse what the stacked K/V contract cannot express, naming the field."""
    tf = _transformers()
    if type(config) not in tf.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ExportError(f"model_type {config.model_type!r} has no causal LM class in transformers", file=file, field="model_type")
    if getattr(config, "is_encoder_decoder", False):
        raise ExportError("an encoder-decoder model is not a decoder-only causal LM", file=file, field="is_encoder_decoder")
    for need in ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size"):
        if not isinstance(getattr(config, need, None), int):
            raise ExportError(f"the config has no integer {need}", file=file, field=need)
    experts = {k: getattr(config, k, None) for k in MOE_FIELDS}
    experts = {k: v for k, v in experts.items() if isinstance(v, int) and not isinstance(v, bool) and v > 1}
    if experts:
        k, v = next(iter(experts.items()))
        raise ExportError(f"model_type {config.model_type!r} is a mixture of experts ({k}={v}): its per-token routing "
                          "(aten::histc, grouped matmuls of the chosen experts) has no Core ML conversion", file=file,
                          field=k)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    other = sorted(kinds - {"full_attention", "sliding_attention"})
    if other:
        raise ExportError(f"layers of type {other} keep no K/V cache the stacked contract can hold", file=file, field="layer_types")


def check_fits(model: "HFCausalLM", *, file=None) -> None:
    """Before any export: run the model once, eagerly, on two tokens with our mask and cache, and refuse it,
    naming its model_type and what does not fit, if its attention layers do not drive our cache as its
    config says (e.g. GPT-2 and GPT-NeoX attend with every head: a config's num_key_value_heads is not theirs)."""
    config, d = model.lm.config, model.dims
    kind = f"model_type {config.model_type!r}"
    ids = torch.zeros(1, 2, dtype=torch.int32)
    pos = torch.arange(2, dtype=torch.int32)[None]
    cache = _StackedKV()
    try:
        with torch.no_grad():
            model.lm(input_ids=ids, attention_mask=prefill_mask(pos, model._dtype()), position_ids=pos, cache=cache,
                     use_cache=False, return_dict=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"{kind}: its layers do not run with the finite 4D mask and stacked K/V cache of "
                          f"hf-causal-lm ({type(e).__name__}: {first})", file=file, field="model_type") from None
    if len(cache.keys) != d.n_layers:
        raise ExportError(f"{kind}: {len(cache.keys)} of its {d.n_layers} layers updated the K/V cache: its attention "
                          "does not fit the stacked K/V contract", file=file, field="model_type")
    want = (1, d.n_kv_heads, 2, d.head_dim)
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        if tuple(k.shape) != want or tuple(v.shape) != want:
            got = tuple(k.shape)
            raise ExportError(f"{kind}: its attention keeps K/V of {got[1]} heads x {got[-1]} (layer {i}), not the "
                              f"{d.n_kv_heads} x {d.head_dim} its config declares (num_key_value_heads, head_dim): "
                              "the stacked K/V contract cannot describe it", file=file, field="num_key_value_heads")


def dims(config) -> LMDims:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return LMDims(n_layers=config.num_hidden_layers, n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                  head_dim=head_dim, vocab_size=config.vocab_size)


def max_positions(config) -> int:
    """The longest T: the position table, and a sliding window (our mask is plain causal)."""
    limit = getattr(config, "max_position_embeddings", None) or 1 << 20
    window = getattr(config, "sliding_window", None)
    uses_window = "sliding_attention" in (getattr(config, "layer_types", None) or []) or (
        window and getattr(config, "use_sliding_window", True))
    return min(limit, window) if uses_window and window else limit


class _StackedKV:
    """Handed to transformers' attention layers as their ``cache``.

    ``update(k, v, layer_idx)`` records the layer's new K/V [1, n_kv, t, hd] and
    returns what the layer attends over: the new K/V themselves (prefill), or the
    caller's cache with the token written into slot ``here`` (decode).
    """

    def __init__(self, k_cache=None, v_cache=None, here=None, write: bool = False, first: int = 0):
        self.k_cache, self.v_cache, self.here, self.write = k_cache, v_cache, here, write
        self.first = first  # a chunk's cache holds its layers only: layer i is its slot i - first
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys.append(key_states)
        self.values.append(value_states)
        if self.k_cache is None:
            return key_states, value_states
        return with_token(key_states, value_states, self.k_cache, self.v_cache, layer_idx - self.first, self.here,
                          self.write)

    def stacked(self):
        return torch.stack(self.keys), torch.stack(self.values)


class HFCausalLM(nn.Module):
    """A transformers ``*ForCausalLM`` with the student's ``prefill``/``decode``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        check_config(lm.config)
        lm.config._attn_implementation = ATTENTION
        self.lm = lm
        self.dims = dims(lm.config)

    def _dtype(self):
        return self.lm.get_input_embeddings().weight.dtype

    def _run(self, input_ids, position_ids, mask, cache: _StackedKV):
        out = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                      use_cache=False, return_dict=True)
        if len(cache.keys) != self.dims.n_layers:
            raise ExportError(f"{type(self.lm).__name__} updated the K/V cache of {len(cache.keys)} of its "
                              f"{self.dims.n_layers} layers: its attention does not fit the stacked K/V contract",
                              field="architecture")
        return (out.logits, *cache.stacked())

    def prefill(self, input_ids, position_ids):
        return self._run(input_ids, position_ids, prefill_mask(position_ids, self._dtype()), _StackedKV())

    def decode(self, input_ids, position_ids, k_cache, v_cache, write_cache: bool = False):
        here, mask = decode_slots(position_ids, k_cache.shape[3], self._dtype())
        return self._run(input_ids, position_ids, mask, _StackedKV(k_cache, v_cache, here, write_cache))


class HFPart(nn.Module):
    """One part of a transformers causal LM's chain (export/models/decoder_lm.py, "parts"): built from the
    config on the current device (``torch.device("meta")`` when loading: no weight of another part is ever
    made), keeping the transformers modules of its layers under their names in the checkpoint."""

    def __init__(self, config, part: PartSpec):
        super().__init__()
        tf = _transformers()
        check_config(config)
        config._attn_implementation = ATTENTION
        self.config, self.part, self.dims, self.hidden = config, part, dims(config), config.hidden_size
        full = tf.AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        self.lm = nn.Module()
        self.lm.model = nn.Module()
        if part.embed:
            self.lm.model.embed_tokens = full.model.embed_tokens
        if part.layers:
            self.lm.model.layers = nn.ModuleDict({str(i): full.model.layers[i] for i in range(part.first, part.end)})
        if part.head:
            self.lm.model.norm = full.model.norm
            if part.head_split:
                self.lm.lm_head = nn.ModuleList(nn.Linear(config.hidden_size, b - a, bias=False)
                                                for a, b in part.pieces(config.vocab_size))
            else:
                self.lm.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._rotary_cls = type(full.model.rotary_emb)
        del full

    def sources(self) -> dict[str, tuple[str, tuple[int, int] | None]]:
        """Each weight's checkpoint tensor (``lm_head.weight``, which the loader takes from the embeddings
        when the checkpoint ties them), and vocabulary rows for a piece of a split head."""
        out = {}
        pieces = self.part.pieces(self.config.vocab_size)
        for key in self.state_dict():
            name = key[len("lm."):]
            if self.part.head_split and name.startswith("lm_head."):
                out[key] = ("lm_head.weight", pieces[int(name.split(".")[1])])
            else:
                out[key] = (name, None)
        return out

    def finish(self) -> None:
        """After the weights are in: the rotary embedding (its inverse frequencies are computed, not stored)."""
        if self.part.layers:
            with torch.device("cpu"):
                self.rotary = self._rotary_cls(config=self.config)

    def embed_in(self, input_ids):
        return self.lm.model.embed_tokens(input_ids)

    def context(self, x, position_ids, mask, here):
        cache = _StackedKV() if here is None else None
        return {"mask": mask, "here": here, "pos": position_ids, "pe": self.rotary(x, position_ids), "cache": cache}

    def layer(self, j: int, x, ctx, k_cache, v_cache, write: bool):
        cache = ctx["cache"] if ctx["here"] is None else _StackedKV(k_cache, v_cache, ctx["here"], write,
                                                                    first=self.part.first)
        seen = len(cache.keys)
        x = self.lm.model.layers[str(self.part.first + j)](
            x, attention_mask=ctx["mask"], position_ids=ctx["pos"], cache=cache, use_cache=False,
            position_embeddings=ctx["pe"])
        if len(cache.keys) != seen + 1:
            raise ExportError(f"layer {self.part.first + j} updated the K/V cache {len(cache.keys) - seen} times: its "
                              "attention does not fit the stacked K/V contract", field="architecture")
        return x, cache.keys[-1], cache.values[-1]

    def head_out(self, x):
        h = self.lm.model.norm(x)
        return tuple(piece(h) for piece in self.lm.lm_head) if self.part.head_split else (self.lm.lm_head(h),)

    def run(self, mode: str, *args, write_cache: bool = False):
        return run_part(self, mode, *args, write_cache=write_cache)


def build_part(config, part: PartSpec) -> HFPart:
    return HFPart(config, part)


def build(config) -> HFCausalLM:
    """A randomly initialised model of ``config`` (the caller seeds)."""
    tf = _transformers()
    config._attn_implementation = ATTENTION
    return HFCausalLM(tf.AutoModelForCausalLM.from_config(config, trust_remote_code=False))


def load_model(folder: Path) -> HFCausalLM:
    """The folder's model with its weights: safetensors only, offline, no remote code, fp32, eval."""
    tf = _transformers()
    lm = tf.AutoModelForCausalLM.from_pretrained(
        str(folder), local_files_only=True, trust_remote_code=False, use_safetensors=True,
        attn_implementation=ATTENTION, dtype=torch.float32)
    model = HFCausalLM(lm).float().eval()
    check_fits(model, file=Path(folder) / "config.json")
    return model


def io(config, mode: str, T: int, dtype: str = "float32", kv_cache: str = "explicit"):
    return decoder_lm.io(dims(config), mode, T, dtype, kv_cache)


def example_inputs(config, mode: str, T: int, dtype: torch.dtype, generator: torch.Generator,
                   kv_cache: str = "explicit"):
    return decoder_lm.example_inputs(dims(config), mode, T, dtype, generator, kv_cache)


wrap = decoder_lm.wrap


ARCHITECTURE = Architecture(
    name="hf-causal-lm", config_cls=None, build=build, modes=MODES, io=io, wrap=wrap,
    example_inputs=example_inputs, max_positions=max_positions, load_model=load_model,
    load_config=load_config, tools=ARCHITECTURE_TOOLS["hf-causal-lm"],
    build_part=build_part, hidden_size=lambda c: c.hidden_size,
)
