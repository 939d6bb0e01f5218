"""Check a Core ML model spec against a contract: every input, output and state.

Reads the protobuf ``Model`` message (``MLModel.get_spec()``) by duck typing:
no coremltools import, so this stays as light as ``contract.py``.
"""
from __future__ import annotations

from ..errors import ExportError

# Core ML ArrayFeatureType.ArrayDataType names -> contract dtypes
_DTYPES = {"FLOAT32": "float32", "FLOAT16": "float16", "INT32": "int32", "DOUBLE": "float64"}


def _tensor(feature, kind: str) -> dict:
    ftype = feature.type
    if kind == "states":
        ftype = ftype.stateType
        array = ftype.arrayType
    else:
        array = ftype.multiArrayType
    dtype_name = type(array).ArrayDataType.Name(array.dataType)
    return {"name": feature.name, "shape": [int(d) for d in array.shape], "dtype": _DTYPES.get(dtype_name, dtype_name.lower())}


def describe(description) -> dict:
    """``{inputs, outputs, states}`` of one function description, as contract tensor lists."""
    return {
        "inputs": [_tensor(f, "inputs") for f in description.input],
        "outputs": [_tensor(f, "outputs") for f in description.output],
        "states": [_tensor(f, "states") for f in description.state],
    }


def function_descriptions(spec) -> dict:
    """Function name -> description; a single-function model is ``{"main": description}``."""
    funcs = spec.description.functions
    if len(funcs):
        return {f.name: f for f in funcs}
    return {"main": spec.description}


def check_spec(contract: dict, spec, *, file: object = None, function: str | None = None) -> None:
    """Raise ExportError naming the first tensor whose name, shape or dtype differs from the contract."""
    descs = function_descriptions(spec)
    name = function or next(iter(descs))
    if name not in descs:
        raise ExportError(f"the package has no function {name!r}; it has {sorted(descs)}", file=file, field="functions")
    got = describe(descs[name])
    where = "" if function is None else f"functions.{name}."
    for kind in ("inputs", "outputs", "states"):
        want = contract.get(kind, [])
        have = got[kind]
        if [t["name"] for t in want] != [t["name"] for t in have]:
            raise ExportError(f"names {[t['name'] for t in have]} differ from the contract's {[t['name'] for t in want]}",
                              file=file, field=where + kind)
        for w, h in zip(want, have):
            for key in ("shape", "dtype"):
                if list(w[key]) != list(h[key]) if key == "shape" else w[key] != h[key]:
                    raise ExportError(f"{key} {h[key]} differs from the contract's {w[key]}",
                                      file=file, field=f"{where}{kind}.{w['name']}.{key}")
