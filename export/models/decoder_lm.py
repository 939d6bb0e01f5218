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
