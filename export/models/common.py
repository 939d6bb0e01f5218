"""Building blocks and config validation shared by the architectures."""
from __future__ import annotations

import dataclasses
import typing

from ..errors import ExportError


def config_from_dict(cls, data: object, *, file: object = None, field: str = "config"):
    """Build the dataclass ``cls`` from a dict, refusing unknown or ill-typed fields."""
    if not isinstance(data, dict):
        raise ExportError(f"expected a table of {cls.__name__} fields, got {type(data).__name__}", file=file, field=field)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ExportError(f"unknown field(s) {unknown}; known: {sorted(names)}", file=file, field=field)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v, want = data[f.name], hints[f.name]
        ok = (want is int and isinstance(v, int) and not isinstance(v, bool)) or (
            want is float and isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        if not ok:
            raise ExportError(f"expected {want.__name__}, got {v!r}", file=file, field=f"{field}.{f.name}")
        if v <= 0:
            raise ExportError(f"must be positive, got {v!r}", file=file, field=f"{field}.{f.name}")
        values[f.name] = float(v) if want is float else v
    cfg = cls(**values)
    check = getattr(cfg, "check", None)
    if check is not None:
        problem = check()
        if problem:
            fname, msg = problem
            raise ExportError(msg, file=file, field=f"{field}.{fname}")
    return cfg
