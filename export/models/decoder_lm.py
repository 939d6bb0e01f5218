"""What every decoder-only LM architecture shares: its IO contract, masks, KV-cache
plumbing and the per-mode wrappers.

A model that provides ``dims`` (an ``LMDims``), ``prefill(input_ids, position_ids)``
and ``decode(input_ids, position_ids, k_cache, v_cache, write_cache=False)``, both
returning ``(logits, k, v)`` with K/V stacked as [L, 1, n_kv, T, head_dim], gets
``io``, ``example_inputs`` and ``wrap`` from here: the student and the transformers
causal LMs present the same contract.

Masks are finite (``MASK_VALUE``) and computed from ``position_ids``: no T x T
constant is baked into a graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .spec import KV_CACHE_STYLES, MASK_VALUE, ModeSpec, TensorSpec


@dataclass(frozen=True)
class LMDims:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int

    def kv_shape(self, T: int) -> tuple[int, ...]:
        return (self.n_layers, 1, self.n_kv_heads, T, self.head_dim)


# --- masks and cache slots ---------------------------------------------------


def prefill_mask(position_ids, dtype):
    """Additive causal mask [B,1,Tq,Tk] from the positions: keys later than the query are masked."""
    pos = position_ids[:, None]  # [B,1,T]
    return (pos[..., None, :] > pos[..., :, None]).to(dtype) * MASK_VALUE


def decode_slots(position_ids, capacity: int, dtype):
    """For one token at ``position_ids`` over a cache of ``capacity`` slots:
    ``here`` [B,1,T,1] (the slot its K/V take) and the additive mask [B,1,1,T] (free slots masked)."""
    slots = torch.arange(capacity, dtype=torch.int32).view(1, 1, -1, 1)
    pos = position_ids.view(-1, 1, 1, 1)
    here = slots == pos
    mask = (slots > pos).to(dtype).transpose(-1, -2) * MASK_VALUE
    return here, mask


def with_token(k, v, k_cache, v_cache, layer: int, here, write: bool):
    """Layer ``layer``'s cache with this token's K/V in its slot; written in place when ``write``."""
    k_all = torch.where(here, k, k_cache[layer])
    v_all = torch.where(here, v, v_cache[layer])
    if write:
        k_cache[layer] = k_all
        v_cache[layer] = v_all
    return k_all, v_all


# --- the declaration ---------------------------------------------------------


def io(d: LMDims, mode: str, T: int, dtype: str = "float32", kv_cache: str = "explicit") -> ModeSpec:
    kv, new_kv = d.kv_shape(T), d.kv_shape(1)
    if kv_cache not in KV_CACHE_STYLES:
        raise KeyError(kv_cache)
    if mode == "decode" and kv_cache == "state":
        return ModeSpec(
            inputs=(TensorSpec("input_ids", (1, 1), "int32"), TensorSpec("position_ids", (1, 1), "int32")),
            outputs=(TensorSpec("logits", (1, 1, d.vocab_size), dtype),),
            states=(TensorSpec("k_cache", kv, "float16"), TensorSpec("v_cache", kv, "float16")),
        )
    if mode == "prefill":
        return ModeSpec(
            inputs=(TensorSpec("input_ids", (1, T), "int32"), TensorSpec("position_ids", (1, T), "int32")),
            outputs=(
                TensorSpec("logits", (1, T, d.vocab_size), dtype),
                TensorSpec("k_cache", kv, dtype),
                TensorSpec("v_cache", kv, dtype),
            ),
        )
    if mode == "decode":
        return ModeSpec(
            inputs=(
                TensorSpec("input_ids", (1, 1), "int32"),
                TensorSpec("position_ids", (1, 1), "int32"),
                TensorSpec("k_cache", kv, dtype),
                TensorSpec("v_cache", kv, dtype),
            ),
            outputs=(
                TensorSpec("logits", (1, 1, d.vocab_size), dtype),
                TensorSpec("k_new", new_kv, dtype),
                TensorSpec("v_new", new_kv, dtype),
            ),
        )
    raise KeyError(mode)


def example_inputs(d: LMDims, mode: str, T: int, dtype: torch.dtype, generator: torch.Generator,
                   kv_cache: str = "explicit"):
    if mode == "prefill":
        ids = torch.randint(0, d.vocab_size, (1, T), dtype=torch.int32, generator=generator)
        return ids, torch.arange(T, dtype=torch.int32)[None]
    kv = d.kv_shape(T)
    ids = torch.randint(0, d.vocab_size, (1, 1), dtype=torch.int32, generator=generator)
    pos = torch.tensor([[T // 2]], dtype=torch.int32)
    if kv_cache == "state":
        return ids, pos
    return ids, pos, torch.randn(kv, generator=generator).to(dtype), torch.randn(kv, generator=generator).to(dtype)


# --- the exported signatures -------------------------------------------------


class _Prefill(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids):
        return self.model.prefill(input_ids, position_ids)


class _Decode(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, k_cache, v_cache):
        return self.model.decode(input_ids, position_ids, k_cache, v_cache)


class _StatefulDecode(nn.Module):
    """Decode whose K/V caches are fp16 buffers updated in place: Core ML turns them into states."""

    def __init__(self, model, T: int):
        super().__init__()
        self.model = model
        kv = model.dims.kv_shape(T)
        self.register_buffer("k_cache", torch.zeros(kv, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(kv, dtype=torch.float16))

    def forward(self, input_ids, position_ids):
        logits, _, _ = self.model.decode(input_ids, position_ids, self.k_cache, self.v_cache, write_cache=True)
        return (logits,)


def wrap(model: nn.Module, mode: str, kv_cache: str = "explicit", T: int | None = None) -> nn.Module:
    if kv_cache not in KV_CACHE_STYLES:
        raise KeyError(kv_cache)
    if mode == "decode" and kv_cache == "state":
        if T is None:
            raise ValueError("the stateful decode needs the cache capacity T")
        return _StatefulDecode(model, T)
    return {"prefill": _Prefill, "decode": _Decode}[mode](model)


# --- parts: a decoder LM cut into a chain of modules ---------------------------------
#
# A parted model (export/parts.py plans it from the config) runs as a chain: ``embed`` (input_ids ->
# hidden_out), ``chunk0`` .. ``chunk{N-1}`` (each a contiguous range of decoder layers: hidden_in ->
# hidden_out, with only its own layers' K/V cache), ``head`` (hidden_in -> logits). Without a part of
# its own, the embeddings are in the first chunk (which then takes input_ids) and the head in the last
# (which then gives the logits). Each part's ``hidden_out`` [1, t, H] feeds the next part's
# ``hidden_in``; t = T in prefill, 1 in decode. A split head gives ``logits_0`` .. ``logits_k``, pieces
# of the vocabulary in order: the app concatenates them on the last axis (or merges their top-k).
# A chunk's K/V tensors keep the names of the whole model's (k_cache, v_cache, k_new, v_new) with the
# chunk's layers only: [end - first, 1, n_kv, T, head_dim]; the contract says which layers.


@dataclass(frozen=True)
class PartSpec:
    """One part of the chain (export/parts.py ``Part.to_json()`` gives these fields)."""
    name: str
    first: int
    end: int
    embed: bool
    head: bool
    head_split: int | None = None

    @classmethod
    def from_json(cls, d: dict) -> "PartSpec":
        return cls(d["name"], int(d["first"]), int(d["end"]), bool(d["embed"]), bool(d["head"]), d.get("head_split"))

    @property
    def layers(self) -> int:
        return self.end - self.first

    def pieces(self, vocab: int) -> list[tuple[int, int]]:
        rows = self.head_split or vocab
        return [(a, min(a + rows, vocab)) for a in range(0, vocab, rows)]

    def logits_names(self, vocab: int) -> list[str]:
        return ["logits"] if not self.head_split else [f"logits_{i}" for i in range(len(self.pieces(vocab)))]


def part_io(d: LMDims, hidden: int, part: PartSpec, mode: str, T: int, dtype: str = "float32",
            kv_cache: str = "explicit") -> ModeSpec:
    """The inputs, outputs and states of one part at (mode, T)."""
    if kv_cache not in KV_CACHE_STYLES:
        raise KeyError(kv_cache)
    if mode not in ("prefill", "decode"):
        raise KeyError(mode)
    t = T if mode == "prefill" else 1
    kv = (part.layers, 1, d.n_kv_heads, T, d.head_dim)
    new_kv = (part.layers, 1, d.n_kv_heads, t, d.head_dim)
    inputs = [TensorSpec("input_ids", (1, t), "int32") if part.embed else TensorSpec("hidden_in", (1, t, hidden), dtype)]
    outputs, states = [], []
    if part.layers:
        inputs.append(TensorSpec("position_ids", (1, t), "int32"))
        if mode == "decode" and kv_cache == "state":
            states = [TensorSpec("k_cache", kv, "float16"), TensorSpec("v_cache", kv, "float16")]
        elif mode == "decode":
            inputs += [TensorSpec("k_cache", kv, dtype), TensorSpec("v_cache", kv, dtype)]
    if part.head:
        outputs += [TensorSpec(n, (1, t, b - a), dtype)
                    for n, (a, b) in zip(part.logits_names(d.vocab_size), part.pieces(d.vocab_size))]
    else:
        outputs.append(TensorSpec("hidden_out", (1, t, hidden), dtype))
    if part.layers and not states:
        names = ("k_cache", "v_cache") if mode == "prefill" else ("k_new", "v_new")
        outputs += [TensorSpec(n, new_kv, dtype) for n in names]
    return ModeSpec(inputs=tuple(inputs), outputs=tuple(outputs), states=tuple(states))


def part_example_inputs(d: LMDims, hidden: int, part: PartSpec, mode: str, T: int, dtype: torch.dtype,
                        generator: torch.Generator, kv_cache: str = "explicit"):
    spec = part_io(d, hidden, part, mode, T, "float32", kv_cache)
    out = []
    for t in spec.inputs:
        if t.name == "input_ids":
            out.append(torch.randint(0, d.vocab_size, t.shape, dtype=torch.int32, generator=generator))
        elif t.name == "position_ids":
            out.append(torch.arange(T, dtype=torch.int32)[None] if mode == "prefill"
                       else torch.tensor([[T // 2]], dtype=torch.int32))
        else:
            out.append(torch.randn(t.shape, generator=generator).to(dtype))
    return tuple(out)


def split_logits(x, weights):
    """The head over vocabulary pieces: one logits tensor per piece of the weight."""
    return tuple(torch.nn.functional.linear(x, w) for w in weights)


class _PartForward(nn.Module):
    def __init__(self, model, mode: str):
        super().__init__()
        self.model, self.mode = model, mode


class _Part1(_PartForward):  # embed, head: input_ids or hidden_in
    def forward(self, x):
        return self.model.run(self.mode, x)


class _Part2(_PartForward):  # a chunk's prefill (or stateless call): + position_ids
    def forward(self, x, position_ids):
        return self.model.run(self.mode, x, position_ids)


class _Part4(_PartForward):  # a chunk's decode: + its layers' K/V cache
    def forward(self, x, position_ids, k_cache, v_cache):
        return self.model.run(self.mode, x, position_ids, k_cache, v_cache)


class _StatefulPart(nn.Module):
    """A chunk's decode whose K/V caches (its layers only) are fp16 buffers updated in place."""

    def __init__(self, model, T: int):
        super().__init__()
        self.model = model
        kv = (model.part.layers, 1, model.dims.n_kv_heads, T, model.dims.head_dim)
        self.register_buffer("k_cache", torch.zeros(kv, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(kv, dtype=torch.float16))

    def forward(self, x, position_ids):
        out = self.model.run("decode", x, position_ids, self.k_cache, self.v_cache, write_cache=True)
        return tuple(out[:-2])


def wrap_part(model: nn.Module, mode: str, kv_cache: str = "explicit", T: int | None = None) -> nn.Module:
    """A part module (``run(mode, *inputs)``, ``part``, ``dims``) as the exported signature of (mode, T)."""
    if kv_cache not in KV_CACHE_STYLES:
        raise KeyError(kv_cache)
    if mode == "decode" and kv_cache == "state" and model.part.layers:
        if T is None:
            raise ValueError("the stateful decode needs the cache capacity T")
        return _StatefulPart(model, T)
    if not model.part.layers:
        return _Part1(model, mode)
    return (_Part2 if mode == "prefill" else _Part4)(model, mode)


def run_part(model, mode: str, x, position_ids=None, k_cache=None, v_cache=None, write_cache: bool = False):
    """The chain's shared plumbing: ``model.embed_in(ids)``, ``model.layer(j, x, pos, mask-info...)``,
    ``model.head_out(x)`` are the architecture's; masks and cache slots are made here."""
    part = model.part
    x = model.embed_in(x) if part.embed else x
    outs = []
    ks, vs = [], []
    if part.layers:
        if mode == "prefill":
            ctx = model.context(x, position_ids, prefill_mask(position_ids, x.dtype), None)
        else:
            ctx = model.context(x, position_ids, *reversed(decode_slots(position_ids, k_cache.shape[3], x.dtype)))
        for j in range(part.layers):
            x, k, v = model.layer(j, x, ctx, k_cache, v_cache, write_cache)
            ks.append(k)
            vs.append(v)
    if part.head:
        outs += list(model.head_out(x))
    else:
        outs.append(x)
    if part.layers:
        outs += [torch.stack(ks), torch.stack(vs)]
    return tuple(outs)
