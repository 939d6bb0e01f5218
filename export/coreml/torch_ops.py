"""Torch op converters coremltools 9.0 lacks, registered with its torch frontend.

Imported (for its side effect) before any conversion or preflight: by
``coreml_checks``, which ``convert_coreml`` imports. Each converter is a real
MIL translation, tested numerically in tests/test_hf_causal_lm.py.

- ``aten::alias``: a view of its input with the same values. transformers 5's
  ``*ForCausalLM.forward`` emits it (``slice_logits_to_keep`` with
  ``logits_to_keep=0`` is ``hidden_states[:, -0:]``); coremltools maps
  ``alias_copy`` to a no-op but not ``alias``.
- ``aten::reciprocal``: coremltools maps it to MIL ``inverse`` with its default
  ``epsilon=1e-4``, i.e. ``1 / (x + 1e-4)``; the student's rotary frequencies
  (``1.0 / theta ** ...``) came out as 0.9999 instead of 1, a phase error that
  grows with the position. Here it is an exact ``real_div(1, x)``. Found by the
  numerical verification (export/coreml/interpreter.py), tested in
  tests/test_verify_coreml.py.
"""
from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.torch.ops import _get_inputs
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op


def alias(context, node):
    (x,) = _get_inputs(context, node, expected=1)
    context.add(x, torch_name=node.name)


def reciprocal(context, node):
    (x,) = _get_inputs(context, node, expected=1)
    if not types.is_float(x.dtype):
        x = mb.cast(x=x, dtype="fp32")
    one = np.array(1, dtype=types.nptype_from_builtin(x.dtype))
    context.add(mb.real_div(x=one, y=x, name=node.name))


register_torch_op(reciprocal, override=True)  # replaces coremltools' inverse(epsilon=1e-4)
for _fn in (alias,):  # idempotent: a reload of this module must not fail "already registered"
    if _TORCH_OPS_REGISTRY.get_func(_fn.__name__) is None:
        register_torch_op(_fn)
