"""The student: a Llama-style decoder-only LM (RMSNorm, rotary positions,
grouped-query attention, SwiGLU), in one file.

Modes
- ``prefill`` at fixed T: ``input_ids`` and ``position_ids`` in; ``logits`` and
  the stacked per-layer ``k_cache``/``v_cache`` for the T positions out.
- ``decode`` at cache capacity T: one token, its position and the K/V cache of
  capacity T in; ``logits`` and the token's new K/V (``k_new``/``v_new``) out.
  The caller writes ``k_new`` into slot ``position`` of its cache.

Neither mode bakes a T x T constant into the graph: the causal mask and the
rotary angles are computed from the ``position_ids`` input, so the only weights
are the parameters, identical for every T (the bundle shares them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .names import ARCHITECTURE_MODES
from .spec import KV_CACHE_STYLES, MASK_VALUE, ModeSpec, TensorSpec

MODES = ARCHITECTURE_MODES["student"]


@dataclass(frozen=True)
class StudentConfig:
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 2
    ffn_hidden: int = 1408
    max_positions: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def check(self):
        if self.d_model % self.n_heads:
            return "n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}"
        if (self.d_model // self.n_heads) % 2:
            return "n_heads", "d_model / n_heads must be even for rotary positions"
        if self.n_heads % self.n_kv_heads:
            return "n_kv_heads", f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}"
        return None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(position_ids, head_dim: int, theta: float, dtype):
    """cos/sin of shape [B, 1, T, head_dim] computed from the positions input."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.c = c
        hd = c.head_dim
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.wq = nn.Linear(c.d_model, c.n_heads * hd, bias=False)
        self.wk = nn.Linear(c.d_model, c.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(c.d_model, c.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(c.n_heads * hd, c.d_model, bias=False)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.w_gate = nn.Linear(c.d_model, c.ffn_hidden, bias=False)
        self.w_up = nn.Linear(c.d_model, c.ffn_hidden, bias=False)
        self.w_down = nn.Linear(c.ffn_hidden, c.d_model, bias=False)

    def qkv(self, x, cos, sin):
        """Queries [B,H,T,hd] and this step's keys/values [B,KV,T,hd], rotated."""
        c, (b, t, _) = self.c, x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(b, t, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.wk(h).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.wv(h).view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def finish(self, x, q, k, v, mask):
        """Grouped-query attention of q over k/v [B,KV,S,hd] with an additive mask, then the MLP."""
        c = self.c
        b, _, t, hd = q.shape
        s, g = k.shape[2], c.n_heads // c.n_kv_heads
        q = q.reshape(b, c.n_kv_heads, g * t, hd)  # heads of one group share their K/V
        scores = torch.matmul(q, k.transpose(-1, -2)) * (hd ** -0.5)
        scores = scores.view(b, c.n_kv_heads, g, t, s) + mask[:, :, None]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype).view(b, c.n_kv_heads, g * t, s)
        out = torch.matmul(probs, v).view(b, c.n_heads, t, hd).transpose(1, 2).reshape(b, t, c.n_heads * hd)
        x = x + self.wo(out)
        h = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class Student(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)

    def _rotary(self, position_ids, dtype):
        return rotary(position_ids, self.c.head_dim, self.c.rope_theta, dtype)

    def prefill(self, input_ids, position_ids):
        x = self.embed(input_ids)
        cos, sin = self._rotary(position_ids, x.dtype)
        pos = position_ids[:, None]  # [B,1,T]
        mask = (pos[..., None, :] > pos[..., :, None]).to(x.dtype) * MASK_VALUE  # [B,1,Tq,Tk]: later keys masked
        ks, vs = [], []
        for block in self.blocks:
            q, k, v = block.qkv(x, cos, sin)
            x = block.finish(x, q, k, v, mask)
            ks.append(k)
            vs.append(v)
        return self.lm_head(self.norm(x)), torch.stack(ks), torch.stack(vs)

    def decode(self, input_ids, position_ids, k_cache, v_cache, write_cache: bool = False):
        """One token at ``position_ids`` over a cache of capacity T; slots >= position are ignored.

        ``write_cache``: also write the token's K/V into slot ``position`` of
        ``k_cache``/``v_cache`` in place (the stateful variant's buffers).
        """
        x = self.embed(input_ids)
        cos, sin = self._rotary(position_ids, x.dtype)
        slots = torch.arange(k_cache.shape[3], dtype=torch.int32).view(1, 1, -1, 1)
        pos = position_ids.view(-1, 1, 1, 1)
        here = slots == pos  # [B,1,T,1]: the slot this token's K/V take
        mask = (slots > pos).to(x.dtype).transpose(-1, -2) * MASK_VALUE  # [B,1,1,T]: free slots masked
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            q, k, v = block.qkv(x, cos, sin)
            k_all = torch.where(here, k, k_cache[i])
            v_all = torch.where(here, v, v_cache[i])
            if write_cache:
                k_cache[i] = k_all
                v_cache[i] = v_all
            x = block.finish(x, q, k_all, v_all, mask)
            ks.append(k)
            vs.append(v)
        return self.lm_head(self.norm(x)), torch.stack(ks), torch.stack(vs)


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
        c = model.c
        kv = (c.n_layers, 1, c.n_kv_heads, T, c.head_dim)
        self.register_buffer("k_cache", torch.zeros(kv, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(kv, dtype=torch.float16))

    def forward(self, input_ids, position_ids):
        logits, _, _ = self.model.decode(input_ids, position_ids, self.k_cache, self.v_cache, write_cache=True)
        return (logits,)


def wrap(model: Student, mode: str, kv_cache: str = "explicit", T: int | None = None) -> nn.Module:
    if kv_cache not in KV_CACHE_STYLES:
        raise KeyError(kv_cache)
    if mode == "decode" and kv_cache == "state":
        if T is None:
            raise ValueError("the stateful decode needs the cache capacity T")
        return _StatefulDecode(model, T)
    return {"prefill": _Prefill, "decode": _Decode}[mode](model)


def io(c: StudentConfig, mode: str, T: int, dtype: str = "float32", kv_cache: str = "explicit") -> ModeSpec:
    kv = (c.n_layers, 1, c.n_kv_heads, T, c.head_dim)
    new_kv = (c.n_layers, 1, c.n_kv_heads, 1, c.head_dim)
    if kv_cache not in KV_CACHE_STYLES:
        raise KeyError(kv_cache)
    if mode == "decode" and kv_cache == "state":
        return ModeSpec(
            inputs=(TensorSpec("input_ids", (1, 1), "int32"), TensorSpec("position_ids", (1, 1), "int32")),
            outputs=(TensorSpec("logits", (1, 1, c.vocab_size), dtype),),
            states=(TensorSpec("k_cache", kv, "float16"), TensorSpec("v_cache", kv, "float16")),
        )
    if mode == "prefill":
        return ModeSpec(
            inputs=(TensorSpec("input_ids", (1, T), "int32"), TensorSpec("position_ids", (1, T), "int32")),
            outputs=(
                TensorSpec("logits", (1, T, c.vocab_size), dtype),
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
                TensorSpec("logits", (1, 1, c.vocab_size), dtype),
                TensorSpec("k_new", new_kv, dtype),
                TensorSpec("v_new", new_kv, dtype),
            ),
        )
    raise KeyError(mode)


def example_inputs(c: StudentConfig, mode: str, T: int, dtype: torch.dtype, generator: torch.Generator,
                   kv_cache: str = "explicit"):
    if mode == "prefill":
        ids = torch.randint(0, c.vocab_size, (1, T), dtype=torch.int32, generator=generator)
        return ids, torch.arange(T, dtype=torch.int32)[None]
    kv = (c.n_layers, 1, c.n_kv_heads, T, c.head_dim)
    ids = torch.randint(0, c.vocab_size, (1, 1), dtype=torch.int32, generator=generator)
    pos = torch.tensor([[T // 2]], dtype=torch.int32)
    if kv_cache == "state":
        return ids, pos
    return ids, pos, torch.randn(kv, generator=generator).to(dtype), torch.randn(kv, generator=generator).to(dtype)
