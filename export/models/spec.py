"""The declaration every architecture makes once: its tensors per mode.

Export, contracts, conversion and tests all read these specs; nothing else
restates an input name, a shape or a dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Callable

from ..contract import KV_CACHE_STYLES  # noqa: F401  (the architectures' kv_cache values)

# Finite "minus infinity" for additive attention masks. coremltools 9.0 turns
# -inf mask constants into NaN; -1e4 is exact in fp16 and swamps any logit.
MASK_VALUE = -1.0e4


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "int32" | "float32" | "float16"

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(name=d["name"], shape=tuple(int(x) for x in d["shape"]), dtype=d["dtype"])


@dataclass(frozen=True)
class ModeSpec:
    """Inputs, outputs and (for stateful variants) states of one mode at one T."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[TensorSpec, ...] = ()  # buffers the program updates in place (Core ML states)

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class Architecture:
    """An entry of the registry.

    - ``config_cls``: a dataclass sizing the model; ``from_dict`` validates.
    - ``build(config)``: an ``nn.Module`` with random (seeded by the caller) weights.
    - ``modes``: the modes it supports, in order.
    - ``io(config, mode, T, dtype, kv_cache="explicit")``: the ``ModeSpec`` of that mode at T.
    - ``wrap(model, mode, kv_cache="explicit", T=None)``: a module whose ``forward`` takes the
      mode's inputs positionally, in declared order, and returns its outputs as
      a tuple in declared order (the exported signature).
    - ``example_inputs(config, mode, T, dtype, generator, kv_cache="explicit")``: valid inputs.

    - ``load_model(folder)``, ``load_config(folder)``: for architectures whose checkpoints
      are model folders (``hf-causal-lm``), the model with its weights and its config;
      ``None`` for single-file checkpoints.
    - ``tools``: packages besides torch whose version changes the exported bytes.
    - ``build_part(config, part)``, ``hidden_size(config)``: decoder LMs that can be cut into parts
      (export/models/decoder_lm.py, "parts"); the part's modules only, on the current device.

    ``kv_cache``: ``"explicit"`` (caches are inputs and outputs) or ``"state"``
    (caches are buffers updated in place, declared as ``states``; needs T in
    ``wrap``). Modes without a cache ignore it.
    """

    name: str
    config_cls: type
    build: Callable
    modes: tuple[str, ...]
    io: Callable[..., ModeSpec]
    wrap: Callable
    example_inputs: Callable
    max_positions: Callable  # config -> int
    load_model: Callable | None = None
    load_config: Callable | None = None
    tools: tuple[str, ...] = ()
    build_part: Callable | None = None  # (config, decoder_lm.PartSpec) -> one part of the chain (decoder LMs)
    hidden_size: Callable | None = None  # config -> the hidden states' width between parts


TORCH_DTYPES = {"float32": "float32", "float16": "float16", "int32": "int32"}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16"}
