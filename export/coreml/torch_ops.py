"""Torch op converters coremltools 9.0 lacks, registered with its torch frontend.

Imported (for its side effect) before any conversion or preflight: by
``coreml_checks``, which ``convert_coreml`` imports. Each converter is a real
MIL translation, tested numerically in tests/test_hf_causal_lm.py.

- ``aten::alias``: a view of its input with the same values. transformers 5's
  ``*ForCausalLM.forward`` emits it (``slice_logits_to_keep`` with
  ``logits_to_keep=0`` is ``hidden_states[:, -0:]``); coremltools maps
  ``alias_copy`` to a no-op but not ``alias``.
"""
from __future__ import annotations

from coremltools.converters.mil.frontend.torch.ops import _get_inputs
from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op


def alias(context, node):
    (x,) = _get_inputs(context, node, expected=1)
    context.add(x, torch_name=node.name)


for _fn in (alias,):  # idempotent: a reload of this module must not fail "already registered"
    if _TORCH_OPS_REGISTRY.get_func(_fn.__name__) is None:
        register_torch_op(_fn)
