"""A reference interpreter for ML Program packages, in numpy: runs the ``.mlpackage``
as written, on any machine.

    pkg = Package("student.mlpackage")
    out = pkg.run("prefill_T512", {"input_ids": ids, "position_ids": pos})   # -> {name: ndarray}
    state = pkg.make_state("decode_T512")                                     # like MLModel.make_state()
    out = pkg.run("decode_T512", {...}, state=state)                          # read_state/write_state carry over

It reads the spec with ``coremltools.models.utils.load_spec`` and the weights
from ``weights/weight.bin`` with coremltools' blob storage reader; it never
loads or re-converts the source program, so what it checks is the bytes shipped.

Semantics follow the MIL op definitions of coremltools
(``coremltools/converters/mil/mil/ops/defs/iOS15..iOS18``): the compression ops
use their own ``decompress`` functions and ``slice_by_index`` its slice solver.
Every op's result is cast to the dtype its output is declared with in the
program, so an fp16 program rounds (and overflows to inf) after every op as the
device does. The op itself is computed in fp32 from its fp16 inputs (numpy has
no fp16 BLAS): for elementwise ops this is the correctly rounded fp16 result;
matmul, linear, softmax, reductions and norms accumulate in fp32 and round once
(a device may accumulate in fp16, see README "Numerical verification").

Constants (``const`` and the ``constexpr_*`` decompressions) are materialized
once per package load; weights stored in ``weight.bin`` are read-only views of
the file (a memory map), never copied. ``linear`` widens an fp16 weight to fp32
one slice at a time (``LINEAR_CHUNK``), and every value is freed after the
last op that reads it, so a run holds the live values and one op's temporaries.
An op it does not know is an error naming the op and the function, never a skip.
This module imports no torch (coremltools itself may, when it is installed).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ExportError

__all__ = ["Package", "InterpreterError", "OPS"]


class InterpreterError(ExportError):
    """The package cannot be run: an unknown op, a bad input, an unreadable weight."""


# MIL proto DataType name -> numpy dtype (sub-byte types are unpacked into the next byte type).
_NP = {
    "FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "BOOL": np.bool_, "INT4": np.int8, "UINT1": np.uint8, "UINT2": np.uint8, "UINT3": np.uint8,
    "UINT4": np.uint8, "UINT6": np.uint8,
}
_SUB_BYTE = {"INT4": (4, True), "UINT1": (1, False), "UINT2": (2, False), "UINT3": (3, False),
             "UINT4": (4, False), "UINT6": (6, False)}
_BLOB_READ = {
    "FLOAT16": "read_fp16_data", "FLOAT32": "read_float_data", "INT8": "read_int8_data", "UINT8": "read_uint8_data",
    "INT16": "read_int16_data", "UINT16": "read_uint16_data", "INT32": "read_int32_data", "UINT32": "read_uint32_data",
    "INT4": "read_int4_data", "UINT1": "read_uint1_data", "UINT2": "read_uint2_data", "UINT3": "read_uint3_data",
    "UINT4": "read_uint4_data", "UINT6": "read_uint6_data",
}
# cast's dtype strings (iOS15 elementwise_unary.cast)
_CAST = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int8": np.int8, "uint8": np.uint8,
         "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "int64": np.int64, "uint32": np.uint32,
         "bool": np.bool_}
CONST_OPS = ("const", "constexpr_affine_dequantize", "constexpr_lut_to_dense", "constexpr_blockwise_shift_scale",
             "constexpr_cast")


def _dtype_name(value_type) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(value_type.tensorType.dataType)


def _shape(value_type) -> tuple | None:
    """Static shape of a tensor type (None when a dimension is unknown)."""
    dims = []
    for d in value_type.tensorType.dimensions:
        if d.WhichOneof("dimension") != "constant":
            return None
        dims.append(int(d.constant.size))
    return tuple(dims)


# --------------------------------------------------------------------------- values

class _Weights:
    """The weight files of a package, read as read-only memory maps: a weight is a view of the file's bytes,
    never a copy (a 0.5B model's 1 GB of fp16 weights costs no anonymous memory). Sub-byte types, and a blob
    whose header this reader does not recognise, go through coremltools' ``_BlobStorageReader``.

    The layout (coremltools' mil/storage: a 64-byte file header, then per blob a 64-byte header of
    sentinel 0xDEADBEEF, data type, size in bytes and data offset, each uint32/uint32/uint64/uint64
    little-endian) is checked blob by blob: a bad sentinel, type, size or offset is an error naming the file."""

    _SENTINEL = 0xDEADBEEF
    # coremltools' BlobDataType codes of the types read by mapping
    _MAPPED = {"FLOAT16": 1, "FLOAT32": 2, "UINT8": 3, "INT8": 4, "INT16": 6, "UINT16": 7, "INT32": 14, "UINT32": 15}

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.readers: dict[str, object] = {}
        self.maps: dict[str, np.ndarray] = {}

    def read(self, blob, dtype: str, shape: tuple, where: str) -> np.ndarray:
        rel = blob.fileName.replace("@model_path/", "", 1)
        path = self.model_dir / rel
        if dtype not in _BLOB_READ:
            raise InterpreterError(f"weights of dtype {dtype} cannot be read", file=path, field=where)
        if not path.is_file():
            raise InterpreterError("the weight file is missing", file=path, field=where)
        if dtype in self._MAPPED:
            data = self._mapped(rel, path, int(blob.offset), dtype)
            if data is not None:
                if int(np.prod(shape)) != data.size:
                    raise InterpreterError(f"{data.size} values at offset {blob.offset}, the type says {shape}",
                                           file=path, field=where)
                return data.reshape(shape)
        return self._read(rel, path, blob, dtype, shape, where)

    def _mapped(self, rel: str, path: Path, offset: int, dtype: str) -> np.ndarray | None:
        """The blob at ``offset`` as a read-only view of the file, or None when its header is not one this reads."""
        m = self.maps.get(rel)
        if m is None:
            try:
                m = self.maps[rel] = np.memmap(path, np.uint8, mode="r").view(np.ndarray)
            except (OSError, ValueError):
                return None
        if offset < 0 or offset + 32 > m.size:
            return None
        sentinel, code = (int(v) for v in m[offset:offset + 8].view("<u4"))
        size, data_offset = (int(v) for v in m[offset + 8:offset + 24].view("<u8"))
        item = np.dtype(_NP[dtype]).itemsize
        if sys.byteorder != "little" or sentinel != self._SENTINEL or code != self._MAPPED[dtype] or size % item or data_offset + size > m.size:
            return None
        return m[data_offset:data_offset + size].view(_NP[dtype])  # little-endian, as the file

    def _read(self, rel: str, path: Path, blob, dtype: str, shape: tuple, where: str) -> np.ndarray:
        from coremltools.libmilstoragepython import _BlobStorageReader

        try:
            reader = self.readers.get(rel)
            if reader is None:
                reader = self.readers[rel] = _BlobStorageReader(str(path))
            data = getattr(reader, _BLOB_READ[dtype])(int(blob.offset))
        except Exception as e:  # the reader raises RuntimeError/ValueError for a damaged file
            raise InterpreterError(f"cannot read weights at offset {blob.offset}: {e}", file=path, field=where) from None
        data = np.asarray(data)
        if dtype == "FLOAT16":
            data = data.view(np.float16)
        data = data.astype(_NP[dtype], copy=False)
        if int(np.prod(shape)) != data.size:
            raise InterpreterError(f"{data.size} values at offset {blob.offset}, the type says {shape}", file=path, field=where)
        return data.reshape(shape)


def _load_value(value, weights: _Weights, where: str):
    """A MIL ``Value`` (immediate or in the weight file) -> ndarray (0-d for a scalar), str or list."""
    kind = value.type.WhichOneof("type")
    if kind != "tensorType":
        raise InterpreterError(f"values of type {kind} are not supported", field=where)
    dtype, shape = _dtype_name(value.type), _shape(value.type)
    if shape is None:
        raise InterpreterError("a constant with an unknown dimension", field=where)
    if value.WhichOneof("value") == "blobFileValue":
        return weights.read(value.blobFileValue, dtype, shape, where)
    tensor = value.immediateValue.tensor
    which = tensor.WhichOneof("value")
    if which == "strings":
        vals = list(tensor.strings.values)
        return vals[0] if shape == () else vals
    if which == "bytes":
        raw = tensor.bytes.values
        if dtype in _SUB_BYTE:
            from coremltools.optimize import _utils as optimize_utils

            nbits, signed = _SUB_BYTE[dtype]
            packed = np.frombuffer(raw, np.uint8)
            arr = optimize_utils.restore_elements_from_packed_bits(packed, nbits, int(np.prod(shape)), signed)
            return np.asarray(arr).astype(_NP[dtype]).reshape(shape)
        return np.frombuffer(raw, _NP[dtype]).reshape(shape).copy()
    if which is None:
        return np.zeros(shape, _NP.get(dtype, np.float32))
    vals = getattr(tensor, which).values
    return np.array(list(vals)).astype(_NP[dtype]).reshape(shape)


# --------------------------------------------------------------------------- ops

def _f32(x):
    """Compute dtype of a float input: fp16 goes up to fp32 (the result is rounded back by its declared type)."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _ax(v) -> int:
    return int(np.asarray(v))


def _axes(v) -> tuple:
    return tuple(int(a) for a in np.atleast_1d(np.asarray(v)))


def _bool(v, default=False) -> bool:
    return default if v is None else bool(np.asarray(v))


def _erf(x):
    """erf in float64 (W. J. Cody's rational approximations via math.erf would be per element; this is
    Numerical Recipes' erfc Chebyshev fit, fractional error < 1.2e-7)."""
    x = np.asarray(x, np.float64)
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    r = t * np.exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
    return np.where(x >= 0, 1.0 - r, r - 1.0)


def _softmax(x, axis):
    """In one new array (besides fp16's widened copy): T x T attention scores are the largest values of a prefill."""
    x = _f32(x)
    e = x - np.max(x, axis=axis, keepdims=True)
    np.exp(e, out=e)
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


def _reduce(fn):
    def op(x, axes=None, keep_dims=None):
        ax = None if axes is None else _axes(axes)
        return fn(_f32(x), axis=ax, keepdims=_bool(keep_dims))
    return op


def _slices(x_shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    from coremltools.converters.mil.mil.ops.defs._utils import solve_slice_by_index_slice

    rank = len(x_shape)
    stride = [1] * rank if stride is None else [int(s) for s in np.asarray(stride)]
    lst = lambda m: None if m is None else [bool(b) for b in np.asarray(m)]  # noqa: E731
    return solve_slice_by_index_slice(x_shape, np.asarray(begin), np.asarray(end), stride, lst(begin_mask),
                                      lst(end_mask), lst(squeeze_mask))


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = np.asarray(x)
    res = x[_slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)]
    if squeeze_mask is not None:
        axes = tuple(i for i, m in enumerate(np.asarray(squeeze_mask)) if m)
        if axes:
            res = np.squeeze(res, axis=axes)
    return res


def _slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = np.array(x, copy=True)
    sl = _slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    target = x[sl]
    x[sl] = np.asarray(update).reshape(target.shape)
    return x


def _reshape(x, shape):
    x = np.asarray(x)
    shape = [int(s) for s in np.asarray(shape)]
    shape = [x.shape[i] if s == 0 and i < x.ndim else s for i, s in enumerate(shape)]  # iOS17: 0 copies a dimension
    return x.reshape(shape)


def _expand_dims(x, axes):
    x = np.asarray(x)
    out_rank = x.ndim + len(_axes(axes))
    axes = sorted(a + out_rank if a < 0 else a for a in _axes(axes))
    for a in axes:
        x = np.expand_dims(x, a)
    return x


def _squeeze(x, axes=None):
    x = np.asarray(x)
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=_axes(axes))


def _gather(x, indices, axis=0, batch_dims=0, validate_indices=None):
    x, indices, axis, bd = np.asarray(x), np.asarray(indices).astype(np.int64), _ax(axis), _ax(batch_dims)
    axis = axis + x.ndim if axis < 0 else axis
    if bd == 0:
        return np.take(x, indices, axis=axis)
    # batch_dims > 0: gather per batch (iOS16 gather)
    out = [_gather(x[i], indices[i], axis - 1, bd - 1) for i in range(x.shape[0])]
    return np.stack(out)


def _gather_along_axis(x, indices, axis=0, validate_indices=None):
    x = np.asarray(x)
    idx = np.asarray(indices).astype(np.int64)
    axis = _ax(axis)
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    return np.take_along_axis(x, idx, axis=axis)


def _concat(values, axis, interleave=None):
    values = [np.asarray(v) for v in values]
    axis = _ax(axis)
    if not _bool(interleave):
        return np.concatenate(values, axis=axis)
    # interleave: alternate single slices along axis (iOS15 concat)
    axis = axis + values[0].ndim if axis < 0 else axis
    stacked = np.stack(values, axis=axis + 1)
    shape = list(values[0].shape)
    shape[axis] = shape[axis] * len(values)
    return stacked.reshape(shape)


def _split(x, axis, num_splits=None, split_sizes=None):
    x, axis = np.asarray(x), _ax(axis)
    if split_sizes is not None:
        points = np.cumsum(np.asarray(split_sizes).astype(np.int64))[:-1]
        return tuple(np.split(x, points, axis=axis))
    return tuple(np.split(x, int(np.asarray(num_splits)), axis=axis))


def _cumsum(x, axis=0, exclusive=None, reverse=None):
    x, axis = _f32(x), _ax(axis)
    if _bool(reverse):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if _bool(exclusive):
        out = out - x
    if _bool(reverse):
        out = np.flip(out, axis)
    return out


def _matmul(x, y, transpose_x=None, transpose_y=None):
    x, y = _f32(x), _f32(y)
    if _bool(transpose_x):
        x = np.swapaxes(x, -1, -2)
    if _bool(transpose_y):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=None):
    x = _f32(x)
    ax = tuple(range(x.ndim)) if axes is None else _axes(axes)
    eps = 1e-5 if epsilon is None else float(np.asarray(epsilon))
    mean = np.mean(x, axis=ax, keepdims=True)
    var = np.mean(np.square(x - mean), axis=ax, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps)
    if gamma is not None:
        out = out * _f32(gamma)
    if beta is not None:
        out = out + _f32(beta)
    return out


def _gelu(x, mode=None):
    x = _f32(x)
    mode = "EXACT" if mode is None else str(mode)
    if mode == "EXACT":
        return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(np.float32)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    raise InterpreterError(f"gelu mode {mode!r} is not one of EXACT, TANH_APPROXIMATION, SIGMOID_APPROXIMATION")


def _sdpa(query, key, value, attn_mask=None):
    q, k, v = _f32(query), _f32(key), _f32(value)
    scores = np.matmul(q, np.swapaxes(k, -1, -2))
    scores /= math.sqrt(q.shape[-1])  # in place: the scores are the op's largest array
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        if np.broadcast_shapes(scores.shape, m.shape) != scores.shape:
            scores = np.where(m, scores, -np.inf) if m.dtype == np.bool_ else scores + _f32(m)
        elif m.dtype == np.bool_:
            np.copyto(scores, -np.inf, where=~m)
        else:
            scores += _f32(m)
    return np.matmul(_softmax(scores, -1), v)


LINEAR_CHUNK = 1 << 24  # fp32 values of one slice of a linear weight (64 MB): the most one linear op adds


def _linear(x, weight, bias=None):
    """``x @ weight.T + bias``, the weight taken LINEAR_CHUNK values of output rows at a time: an fp16 weight (a
    view of the weight file) is widened to fp32 one slice at a time, so a 150k x 896 output layer costs its
    output and 64 MB, not a 545 MB fp32 copy of the weight. Each output element is the same dot product."""
    x, w = _f32(x), np.asarray(weight)
    out = np.empty(x.shape[:-1] + (w.shape[0],), np.result_type(x.dtype, _f32(w[:0]).dtype))
    rows = max(1, LINEAR_CHUNK // max(1, w.shape[1]))
    for r in range(0, w.shape[0], rows):
        np.matmul(x, _f32(w[r:r + rows]).T, out=out[..., r:r + rows])
    if bias is not None:
        out += _f32(bias)
    return out


def _cast(x, dtype):
    x = np.asarray(x)
    want = _CAST.get(str(dtype))
    if want is None:
        raise InterpreterError(f"cast to {dtype!r} is not supported")
    if want == np.bool_:
        return x != 0
    return x.astype(want)


def _binary(fn):
    return lambda x, y: fn(_f32(x), _f32(y))


def _compare(fn):
    return lambda x, y: fn(np.asarray(x), np.asarray(y))


def _constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import constexpr_affine_dequantize

    return constexpr_affine_dequantize.decompress(np.asarray(quantized_data), np.asarray(zero_point),
                                                  np.asarray(scale), _ax(axis))


def _constexpr_lut_to_dense(lut, indices, shape=None, vector_axis=None):
    if shape is not None:  # iOS16: packed indices, a flat lut, the output shape
        from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import constexpr_lut_to_dense

        return constexpr_lut_to_dense.decompress(np.asarray(lut), np.asarray(indices),
                                                 tuple(int(s) for s in np.asarray(shape)))
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_lut_to_dense

    return constexpr_lut_to_dense.decompress(np.asarray(indices), np.asarray(lut),
                                             None if vector_axis is None else np.asarray(vector_axis))


def _constexpr_blockwise_shift_scale(data, scale, offset=None):
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale

    return constexpr_blockwise_shift_scale.decompress(np.asarray(data), np.asarray(scale),
                                                      None if offset is None else np.asarray(offset))


def _constexpr_cast(source_val, output_dtype):
    return _cast(source_val, output_dtype)


def _rsqrt(x, epsilon=None):
    eps = 1e-12 if epsilon is None else float(np.asarray(epsilon))
    return 1.0 / np.sqrt(_f32(x) + np.float32(eps))


def _log(x, epsilon=None):
    eps = 1e-45 if epsilon is None else float(np.asarray(epsilon))
    return np.log(_f32(x) + np.float32(eps))


def _inverse(x, epsilon=None):
    eps = 1e-4 if epsilon is None else float(np.asarray(epsilon))
    return 1.0 / (_f32(x) + np.float32(eps))


def _clip(x, alpha, beta):
    return np.minimum(np.maximum(_f32(x), _f32(alpha)), _f32(beta))


def _sigmoid(x):
    x = _f32(x)
    return 1.0 / (1.0 + np.exp(-x))


def _silu(x):
    x = _f32(x)
    return x / (1.0 + np.exp(-x))


def _real_div(x, y):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind in "iub" and y.dtype.kind in "iub":
        return np.true_divide(x, y).astype(np.float32)
    return _f32(x) / _f32(y)


def _fill(shape, value=None):
    return np.full(tuple(int(s) for s in np.asarray(shape)), 0.0 if value is None else np.asarray(value))


def _range_1d(end, start, step):
    return np.arange(np.asarray(start), np.asarray(end), np.asarray(step))


def _band_part(x, lower=None, upper=None):
    x = np.asarray(x)
    lo = -1 if lower is None else int(np.asarray(lower))
    up = -1 if upper is None else int(np.asarray(upper))
    m, n = x.shape[-2:]
    i, j = np.arange(m)[:, None], np.arange(n)[None, :]
    keep = ((lo < 0) | (i - j <= lo)) & ((up < 0) | (j - i <= up))
    return np.where(keep, x, np.zeros((), x.dtype))


def _tile(x, reps):
    return np.tile(np.asarray(x), tuple(int(r) for r in np.asarray(reps)))


def _transpose(x, perm):
    return np.transpose(np.asarray(x), _axes(perm))


def _stack(values, axis):
    return np.stack([np.asarray(v) for v in values], axis=_ax(axis))


def _select(cond, a, b):
    return np.where(np.asarray(cond), np.asarray(a), np.asarray(b))


def _identity(x):
    return np.asarray(x)


def _shape_op(x):
    return np.array(np.asarray(x).shape, np.int32)


# name -> (function, parameters that take a list of values). Semantics: coremltools' MIL op
# definitions, coremltools/converters/mil/mil/ops/defs/iOS15..iOS18 (docstrings and value_inference).
OPS: dict[str, tuple[Callable, frozenset]] = {name: (fn, frozenset(lists)) for name, fn, lists in [
    ("add", _binary(np.add), ()), ("sub", _binary(np.subtract), ()), ("mul", _binary(np.multiply), ()),
    ("real_div", _real_div, ()), ("pow", _binary(np.power), ()),
    ("maximum", _binary(np.maximum), ()), ("minimum", _binary(np.minimum), ()),
    ("floor_div", _binary(np.floor_divide), ()), ("mod", _binary(np.mod), ()),
    ("equal", _compare(np.equal), ()), ("not_equal", _compare(np.not_equal), ()),
    ("greater", _compare(np.greater), ()), ("greater_equal", _compare(np.greater_equal), ()),
    ("less", _compare(np.less), ()), ("less_equal", _compare(np.less_equal), ()),
    ("logical_and", _compare(np.logical_and), ()), ("logical_or", _compare(np.logical_or), ()),
    ("logical_xor", _compare(np.logical_xor), ()), ("logical_not", lambda x: np.logical_not(x), ()),
    ("sin", lambda x: np.sin(_f32(x)), ()), ("cos", lambda x: np.cos(_f32(x)), ()),
    ("exp", lambda x: np.exp(_f32(x)), ()), ("sqrt", lambda x: np.sqrt(_f32(x)), ()),
    ("tanh", lambda x: np.tanh(_f32(x)), ()), ("abs", lambda x: np.abs(_f32(x)), ()),
    ("square", lambda x: np.square(_f32(x)), ()), ("floor", lambda x: np.floor(_f32(x)), ()),
    ("ceil", lambda x: np.ceil(_f32(x)), ()), ("round", lambda x: np.round(_f32(x)), ()),
    ("sign", lambda x: np.sign(_f32(x)), ()), ("erf", lambda x: _erf(_f32(x)), ()),
    ("relu", lambda x: np.maximum(_f32(x), 0), ()), ("sigmoid", _sigmoid, ()), ("silu", _silu, ()),
    ("rsqrt", _rsqrt, ()), ("log", _log, ()), ("inverse", _inverse, ()), ("clip", _clip, ()),
    ("gelu", _gelu, ()), ("softmax", lambda x, axis=-1: _softmax(x, _ax(axis)), ()),
    ("cast", _cast, ()), ("identity", _identity, ()), ("shape", _shape_op, ()),
    ("reduce_mean", _reduce(np.mean), ()), ("reduce_sum", _reduce(np.sum), ()),
    ("reduce_max", _reduce(np.max), ()), ("reduce_min", _reduce(np.min), ()), ("reduce_prod", _reduce(np.prod), ()),
    ("reshape", _reshape, ()), ("expand_dims", _expand_dims, ()), ("squeeze", _squeeze, ()),
    ("transpose", _transpose, ()), ("tile", _tile, ()), ("concat", _concat, ("values",)),
    ("stack", _stack, ("values",)), ("split", _split, ()), ("slice_by_index", _slice_by_index, ()),
    ("slice_update", _slice_update, ()), ("gather", _gather, ()), ("gather_along_axis", _gather_along_axis, ()),
    ("select", _select, ()), ("cumsum", _cumsum, ()), ("matmul", _matmul, ()), ("layer_norm", _layer_norm, ()),
    ("fill", _fill, ()), ("range_1d", _range_1d, ()), ("band_part", _band_part, ()),
    ("scaled_dot_product_attention", _sdpa, ()),
    ("constexpr_affine_dequantize", _constexpr_affine_dequantize, ()),
    ("constexpr_lut_to_dense", _constexpr_lut_to_dense, ()),
    ("constexpr_blockwise_shift_scale", _constexpr_blockwise_shift_scale, ()),
    ("constexpr_cast", _constexpr_cast, ()),
]}
# handled by the interpreter itself: const, linear (pre-transposed weights), read_state, write_state,
# coreml_update_state
SPECIAL = ("const", "linear", "read_state", "write_state", "coreml_update_state")


# --------------------------------------------------------------------------- programs

@dataclass
class _Step:
    op_type: str
    name: str
    fn: Callable | None
    args: dict          # param -> ("ref", name) | ("val", value) | ("list", [("ref"|"val", x), ...])
    outputs: list       # [(name, numpy dtype, static shape or None)]


@dataclass
class Function:
    name: str
    inputs: dict        # name -> (numpy dtype, shape)
    states: dict        # name -> (numpy dtype, shape)
    outputs: list       # names
    steps: list
    consts: dict        # name -> value, materialized once
    last_use: dict = field(default_factory=dict)  # name -> index of the last step reading it


class Package:
    """A loaded ``.mlpackage``: ``functions``, ``run(function, inputs, state=None)``, ``make_state(function)``."""

    def __init__(self, path: Path | str):
        import coremltools as ct  # noqa: F401  (before the proto modules)
        from coremltools.models.utils import load_spec

        self.path = Path(path)
        model = self.path / "Data" / "com.apple.CoreML" / "model.mlmodel"
        if not model.is_file():
            raise InterpreterError("not an .mlpackage (no Data/com.apple.CoreML/model.mlmodel)", file=self.path, field="package")
        try:
            self.spec = load_spec(str(self.path))
        except Exception as e:
            raise InterpreterError(f"cannot read the spec: {type(e).__name__}: {e}", file=self.path, field="model.mlmodel") from None
        if self.spec.WhichOneof("Type") != "mlProgram":
            raise InterpreterError(f"not an ML Program (the model is a {self.spec.WhichOneof('Type')})", file=self.path, field="model.mlmodel")
        self.weights = _Weights(model.parent)
        self.default_function = self.spec.description.defaultFunctionName or "main"
        self._fns: dict[str, Function] = {}
        for name in self.spec.mlProgram.functions:
            self._fns[name] = self._compile(name, self.spec.mlProgram.functions[name])

    @property
    def functions(self) -> list[str]:
        return sorted(self._fns)

    def function(self, name: str | None) -> Function:
        if name is None:
            name = self.default_function if self.default_function in self._fns else next(iter(self._fns))
        if name not in self._fns:
            raise InterpreterError(f"no function {name!r}; the package has {self.functions}", file=self.path, field="function")
        return self._fns[name]

    # ------------------------------------------------------------------ loading

    def _compile(self, fname: str, fn) -> Function:
        block = fn.block_specializations[fn.opset]
        inputs, states = {}, {}
        for v in fn.inputs:
            kind = v.type.WhichOneof("type")
            if kind == "stateType":
                wrapped = v.type.stateType.wrappedType
                states[v.name] = (_NP[_dtype_name(wrapped)], _shape(wrapped))
            else:
                inputs[v.name] = (_NP[_dtype_name(v.type)], _shape(v.type))
        consts: dict = {}
        steps: list[_Step] = []
        for op in block.operations:
            where = f"{fname}: {op.type} {self._op_name(op)}"
            if len(op.blocks):
                raise InterpreterError(f"op {op.type!r} (nested blocks) is not supported", file=self.path, field=f"function {fname}")
            if op.type not in OPS and op.type not in SPECIAL:
                raise InterpreterError(f"op {op.type!r} is not supported by the interpreter (op {self._op_name(op)!r})",
                                       file=self.path, field=f"function {fname}")
            lists = OPS[op.type][1] if op.type in OPS else frozenset()
            args: dict = {}
            for param, arg in op.inputs.items():
                bound = []
                for b in arg.arguments:
                    if b.WhichOneof("binding") == "name":
                        bound.append(("ref", b.name))
                    else:
                        bound.append(("val", _load_value(b.value, self.weights, f"{where}.{param}")))
                args[param] = ("list", bound) if param in lists else bound[0]
            outs = [(o.name, _NP.get(_dtype_name(o.type)) if o.type.WhichOneof("type") == "tensorType" else None,
                     _shape(o.type) if o.type.WhichOneof("type") == "tensorType" else None) for o in op.outputs]
            if op.type in CONST_OPS:
                attrs = {k: _load_value(v, self.weights, f"{where}.{k}") for k, v in op.attributes.items() if k != "name"}
                if op.type == "const":
                    value = np.asarray(attrs["val"]) if not isinstance(attrs["val"], str) else attrs["val"]
                else:
                    kwargs = {**attrs, **{p: self._const_arg(a, consts, where) for p, a in args.items()}}
                    value = OPS[op.type][0](**kwargs)
                name, dtype, _ = outs[0]
                consts[name] = value.astype(dtype, copy=False) if dtype is not None and isinstance(value, np.ndarray) else value
                continue
            fn_ = OPS[op.type][0] if op.type in OPS else None
            steps.append(_Step(op.type, self._op_name(op), fn_, args, outs))
        f = Function(fname, inputs, states, list(block.outputs), steps, consts)
        for i, s in enumerate(f.steps):
            for a in s.args.values():
                for kind, x in (a[1] if a[0] == "list" else [a]):
                    if kind == "ref":
                        f.last_use[x] = i
        return f

    @staticmethod
    def _op_name(op) -> str:
        a = op.attributes.get("name")
        if a is not None and a.immediateValue.tensor.strings.values:
            return a.immediateValue.tensor.strings.values[0]
        return op.outputs[0].name if op.outputs else "?"

    def _const_arg(self, arg, consts, where):
        kind, x = arg
        if kind == "val":
            return x
        if kind == "ref" and x in consts:
            return consts[x]
        raise InterpreterError(f"a constexpr op reads {x!r}, which is not a constant", file=self.path, field=where)

    # ------------------------------------------------------------------ running

    def make_state(self, function: str | None = None) -> dict[str, np.ndarray]:
        """Zeroed states of ``function`` (name -> array), updated in place by ``run``, as an MLState is."""
        f = self.function(function)
        return {n: np.zeros(shape, dtype) for n, (dtype, shape) in f.states.items()}

    def run(self, function: str | None, inputs: dict, state: dict | None = None,
            trace: dict | None = None) -> dict[str, np.ndarray]:
        """Outputs of ``function`` on ``inputs``; ``trace``, a dict, receives every value the program computes."""
        f = self.function(function)
        env: dict = dict(f.consts)
        for name, (dtype, shape) in f.inputs.items():
            if name not in inputs:
                raise InterpreterError(f"input {name!r} is missing (the function takes {list(f.inputs)})",
                                       file=self.path, field=f"function {f.name}")
            x = np.asarray(inputs[name])
            if shape is not None and tuple(x.shape) != shape:
                raise InterpreterError(f"input {name!r} has shape {list(x.shape)}, the function takes {list(shape)}",
                                       file=self.path, field=f"function {f.name}")
            env[name] = x.astype(dtype, copy=False)
        if f.states:
            if state is None:
                raise InterpreterError(f"the function keeps states {list(f.states)}: pass state=package.make_state()",
                                       file=self.path, field=f"function {f.name}")
            for name, (dtype, shape) in f.states.items():
                if name not in state or tuple(state[name].shape) != shape:
                    raise InterpreterError(f"state {name!r} must be an array of shape {list(shape)}",
                                           file=self.path, field=f"function {f.name}")
        for i, s in enumerate(f.steps):
            try:
                results = self._step(s, env, state, f)
            except InterpreterError:
                raise
            except Exception as e:
                raise InterpreterError(f"op {s.op_type} {s.name!r} failed: {type(e).__name__}: {e}",
                                       file=self.path, field=f"function {f.name}") from None
            for (name, dtype, shape), value in zip(s.outputs, results):
                value = np.asarray(value)
                if dtype is not None and value.dtype != dtype:
                    value = value.astype(dtype)
                if shape is not None and value.shape != shape:
                    raise InterpreterError(f"op {s.op_type} {s.name!r} gave shape {list(value.shape)}, its output "
                                           f"{name!r} is declared {list(shape)}", file=self.path, field=f"function {f.name}")
                env[name] = value
                if trace is not None:
                    trace[name] = value
            for a in s.args.values():  # free what no later step reads
                for kind, x in (a[1] if a[0] == "list" else [a]):
                    if kind == "ref" and f.last_use.get(x) == i and x not in f.outputs and x not in f.consts:
                        env.pop(x, None)
        return {name: env[name] for name in f.outputs}

    def _step(self, s: _Step, env: dict, state: dict | None, f: Function):
        def val(a):
            kind, x = a
            if kind == "val":
                return x
            if kind == "list":
                return [val(b) for b in x]
            if x in env:
                return env[x]
            if state is not None and x in state:
                return x  # a state handle: read_state/write_state take its name
            raise InterpreterError(f"op {s.op_type} {s.name!r} reads {x!r}, which no earlier op produced",
                                   file=self.path, field=f"function {f.name}")

        kw = {p: val(a) for p, a in s.args.items()}
        if s.op_type == "linear":
            return [_linear(kw["x"], kw["weight"], kw.get("bias"))]
        if s.op_type == "read_state":
            return [state[kw["input"]].copy()]
        if s.op_type == "write_state":
            name = kw["input"]
            state[name][...] = np.asarray(kw["data"]).astype(state[name].dtype)
            return []
        if s.op_type == "coreml_update_state":
            name = kw["state"]
            state[name][...] = np.asarray(kw["value"]).astype(state[name].dtype)
            return [np.asarray(kw["value"])]
        out = s.fn(**kw)
        return list(out) if isinstance(out, (tuple, list)) else [out]


def op_types(path: Path | str) -> dict[str, list[str]]:
    """function -> sorted op types of a package's program (what ``Package`` must know to run it)."""
    from coremltools.models.utils import load_spec

    spec = load_spec(str(path))
    out = {}
    for name, fn in spec.mlProgram.functions.items():
        out[name] = sorted({op.type for op in fn.block_specializations[fn.opset].operations})
    return out
