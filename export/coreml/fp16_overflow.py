"""coremltools' fp16 overflow check, in bounded memory.

Converting with fp16 compute precision, coremltools asks of every op whether one of its fp32 constants would
overflow fp16 (``FP16ComputePrecision.fp16_overflow``, coremltools/converters/mil/mil/passes/defs/
quantization.py): ``max(|v| for v in the constant if |v| < 1e38) > 65504``. It computes that with
``np.where`` over the whole constant, which makes one int64 index array per dimension: 24 bytes per 4-byte
value for an embedding table read by a ``gather``, besides ``|v|`` and the selected copy. That is why a
part holding one large table peaked at 8-9x the table (an 8B model's 2.1 GB fp32 embedding part: 18.4 GB;
bench/results/scale-llama-3.1-8b-*.json), while a chunk of many smaller weights stayed near 2x.

``lean_fp16_overflow()`` replaces the check, while a conversion runs, with the same decision made over
slices of the constant: the largest magnitude below 1e38 (NaN and |v| >= 1e38 excluded, as before), one
slice at a time. The op set, every cast and every byte of the package are the same; only the memory differs.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

FP16_MAX = 65504.0
INFINITE = 1e38   # coremltools' bound: |v| at or above it may become fp16 inf (attention masks' -inf, -1e38)
SLICE = 1 << 22   # values per slice: 16 MB of fp32 at a time

_LOCK = threading.RLock()


def overflows_fp16(value) -> bool:
    """Whether a finite fp32 value of ``value`` (|v| < 1e38) lies outside fp16's range: coremltools' decision."""
    flat = np.asarray(value).reshape(-1)
    for a in range(0, flat.size, SLICE):
        part = np.abs(flat[a:a + SLICE])
        finite = part < INFINITE  # False for NaN and for |v| >= 1e38: neither counts
        if finite.any() and part[finite].max() > FP16_MAX:
            return True
    return False


def _fp16_overflow(op) -> bool:
    for inputs in op.inputs.values():
        for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                if overflows_fp16(var.op.val.val):
                    return True
    return False


@contextmanager
def lean_fp16_overflow():
    """While inside: coremltools' fp16 overflow check is ``overflows_fp16`` over each fp32 constant input (the same
    decision, in slices). Threads of one process take turns."""
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    with _LOCK:
        original = FP16ComputePrecision.__dict__["fp16_overflow"]
        FP16ComputePrecision.fp16_overflow = staticmethod(_fp16_overflow)
        try:
            yield
        finally:
            FP16ComputePrecision.fp16_overflow = original
