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

from . import decoder_lm
from .decoder_lm import LMDims, PartSpec, decode_slots, prefill_mask, run_part, with_token
from .names import ARCHITECTURE_MODES
from .spec import Architecture, ModeSpec

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
        self.dims = dims(c)

    def _rotary(self, position_ids, dtype):
        return rotary(position_ids, self.c.head_dim, self.c.rope_theta, dtype)

    def prefill(self, input_ids, position_ids):
        x = self.embed(input_ids)
        cos, sin = self._rotary(position_ids, x.dtype)
        mask = prefill_mask(position_ids, x.dtype)  # [B,1,Tq,Tk]: later keys masked
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
        here, mask = decode_slots(position_ids, k_cache.shape[3], x.dtype)  # this token's slot; free slots masked
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            q, k, v = block.qkv(x, cos, sin)
            k_all, v_all = with_token(k, v, k_cache, v_cache, i, here, write_cache)
            x = block.finish(x, q, k_all, v_all, mask)
            ks.append(k)
            vs.append(v)
        return self.lm_head(self.norm(x)), torch.stack(ks), torch.stack(vs)


class StudentPart(nn.Module):
    """One part of the student's chain (export/models/decoder_lm.py, "parts"): its embeddings, its blocks
    (named by their index in the whole model, as in the checkpoint), its final norm and head."""

    def __init__(self, c: StudentConfig, part: PartSpec):
        super().__init__()
        self.c, self.part, self.dims, self.hidden = c, part, dims(c), c.d_model
        if part.embed:
            self.embed = nn.Embedding(c.vocab_size, c.d_model)
        if part.layers:
            self.blocks = nn.ModuleDict({str(i): Block(c) for i in range(part.first, part.end)})
        if part.head:
            self.norm = RMSNorm(c.d_model, c.norm_eps)
            if part.head_split:
                self.lm_head = nn.ModuleList(nn.Linear(c.d_model, b - a, bias=False)
                                             for a, b in part.pieces(c.vocab_size))
            else:
                self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)

    def sources(self) -> dict[str, tuple[str, tuple[int, int] | None]]:
        """Each weight's checkpoint tensor (and vocabulary rows, for a piece of a split head)."""
        out = {}
        pieces = self.part.pieces(self.c.vocab_size)
        for key in self.state_dict():
            if self.part.head_split and key.startswith("lm_head."):
                out[key] = ("lm_head.weight", pieces[int(key.split(".")[1])])
            else:
                out[key] = (key, None)
        return out

    def finish(self) -> None:
        """Nothing computed: the rotary angles come from the positions in forward."""

    def embed_in(self, input_ids):
        return self.embed(input_ids)

    def context(self, x, position_ids, mask, here):
        cos, sin = rotary(position_ids, self.c.head_dim, self.c.rope_theta, x.dtype)
        return cos, sin, mask, here

    def layer(self, j: int, x, ctx, k_cache, v_cache, write: bool):
        cos, sin, mask, here = ctx
        block = self.blocks[str(self.part.first + j)]
        q, k, v = block.qkv(x, cos, sin)
        k_all, v_all = (k, v) if here is None else with_token(k, v, k_cache, v_cache, j, here, write)
        return block.finish(x, q, k_all, v_all, mask), k, v

    def head_out(self, x):
        h = self.norm(x)
        return tuple(piece(h) for piece in self.lm_head) if self.part.head_split else (self.lm_head(h),)

    def run(self, mode: str, *args, write_cache: bool = False):
        return run_part(self, mode, *args, write_cache=write_cache)


def dims(c: StudentConfig) -> LMDims:
    return LMDims(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, vocab_size=c.vocab_size)


def io(c: StudentConfig, mode: str, T: int, dtype: str = "float32", kv_cache: str = "explicit") -> ModeSpec:
    return decoder_lm.io(dims(c), mode, T, dtype, kv_cache)


def example_inputs(c: StudentConfig, mode: str, T: int, dtype: torch.dtype, generator: torch.Generator,
                   kv_cache: str = "explicit"):
    return decoder_lm.example_inputs(dims(c), mode, T, dtype, generator, kv_cache)


wrap = decoder_lm.wrap


ARCHITECTURE = Architecture(
    name="student", config_cls=StudentConfig, build=Student, modes=MODES, io=io, wrap=wrap,
    example_inputs=example_inputs, max_positions=lambda c: c.max_positions,
    build_part=StudentPart, hidden_size=lambda c: c.d_model,
)
