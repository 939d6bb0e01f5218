"""The judge: a sequence scorer. A bidirectional transformer trunk (LayerNorm,
GELU MLP, learned absolute positions) whose masked mean over the real tokens
feeds a score head. ``prefill`` only: ``input_ids`` and ``attention_mask``
(1 = token, 0 = padding) in, ``score`` out.

Positions are counted from the mask (``cumsum``), so neither the position
table nor the padding mask is folded into a per-T constant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from .names import ARCHITECTURE_MODES
from .spec import MASK_VALUE, Architecture, ModeSpec, TensorSpec

MODES = ARCHITECTURE_MODES["judge"]


@dataclass(frozen=True)
class JudgeConfig:
    vocab_size: int = 32000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 1024
    max_positions: int = 4096
    n_scores: int = 1
    norm_eps: float = 1e-5

    def check(self):
        if self.d_model % self.n_heads:
            return "n_heads", f"must divide d_model={self.d_model}, got {self.n_heads}"
        return None


class Layer(nn.Module):
    def __init__(self, c: JudgeConfig):
        super().__init__()
        self.c = c
        self.norm1 = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.out = nn.Linear(c.d_model, c.d_model)
        self.norm2 = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.fc1 = nn.Linear(c.d_model, c.ffn_hidden)
        self.fc2 = nn.Linear(c.ffn_hidden, c.d_model)

    def forward(self, x, mask):
        b, t, d = x.shape
        h, hd = self.c.n_heads, d // self.c.n_heads
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (hd ** -0.5) + mask
        att = torch.matmul(torch.softmax(scores.float(), -1).to(x.dtype), v)
        x = x + self.out(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Judge(nn.Module):
    def __init__(self, c: JudgeConfig):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.max_positions, c.d_model)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.head = nn.Linear(c.d_model, c.n_scores)

    def forward(self, input_ids, attention_mask):
        keep = attention_mask.to(torch.int32)
        positions = torch.cumsum(keep, dim=-1) - keep  # 0, 1, ... over the tokens; never negative
        x = self.embed(input_ids) + self.pos(positions)
        w = keep.to(x.dtype)  # [B,T]
        mask = ((1.0 - w) * MASK_VALUE)[:, None, None, :]  # padding keys get a finite -1e4
        for layer in self.layers:
            x = layer(x, mask)
        x = self.norm(x)
        # A one-sided clamp converts to a clip with an infinite bound (a NaN/Inf constant in fp16).
        pooled = (x * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(1.0, float(self.c.max_positions))
        return self.head(pooled)


def wrap(model: Judge, mode: str, kv_cache: str = "explicit", T: int | None = None) -> nn.Module:
    """The judge has no cache: ``kv_cache`` does not change it."""
    if mode != "prefill":
        raise KeyError(mode)
    return model


def io(c: JudgeConfig, mode: str, T: int, dtype: str = "float32", kv_cache: str = "explicit") -> ModeSpec:
    if mode != "prefill":
        raise KeyError(mode)
    return ModeSpec(
        inputs=(TensorSpec("input_ids", (1, T), "int32"), TensorSpec("attention_mask", (1, T), "int32")),
        outputs=(TensorSpec("score", (1, c.n_scores), dtype),),
    )


def example_inputs(c: JudgeConfig, mode: str, T: int, dtype: torch.dtype, generator: torch.Generator,
                   kv_cache: str = "explicit"):
    ids = torch.randint(0, c.vocab_size, (1, T), dtype=torch.int32, generator=generator)
    mask = torch.ones(1, T, dtype=torch.int32)
    mask[:, T - T // 4:] = 0  # a padded tail
    return ids, mask


ARCHITECTURE = Architecture(
    name="judge", config_cls=JudgeConfig, build=Judge, modes=MODES, io=io, wrap=wrap,
    example_inputs=example_inputs, max_positions=lambda c: c.max_positions,
)
