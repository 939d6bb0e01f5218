"""``shape_sets.json``: named shape sets, each mapping a mode to its enumerated T.

```json
{"default": {"prefill": [512, 1024, 2048, 4096], "decode": [512, 1024, 2048, 4096]}}
```
Imports no torch: task generation reads it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ExportError

MAX_T = 1 << 20


def check_ts(values: object, *, file: object, field: str, max_positions: int | None = None) -> list[int]:
    """A list of distinct positive integer T (not bools, floats or strings), each within max_positions."""
    if not isinstance(values, list) or not values:
        raise ExportError(f"expected a non-empty list of sequence lengths, got {values!r}", file=file, field=field)
    seen = set()
    for i, t in enumerate(values):
        where = f"{field}[{i}]"
        if isinstance(t, bool) or not isinstance(t, int):
            raise ExportError(f"T must be a positive integer, got {t!r}", file=file, field=where)
        if t <= 0:
            raise ExportError(f"T must be a positive integer, got {t}", file=file, field=where)
        if t > MAX_T:
            raise ExportError(f"T={t} is larger than the largest supported ({MAX_T})", file=file, field=where)
        if max_positions is not None and t > max_positions:
            raise ExportError(f"T={t} exceeds the model's maximum positions ({max_positions})", file=file, field=where)
        if t in seen:
            raise ExportError(f"duplicate T={t}", file=file, field=where)
        seen.add(t)
    return list(values)


def load(path: Path | str) -> dict[str, dict[str, list[int]]]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ExportError("no such file", file=path, field="shape_sets") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"cannot read: {e}", file=path, field="shape_sets") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f"not JSON ({e.msg} at line {e.lineno})", file=path, field="shape_sets") from None
    if not isinstance(data, dict) or not data:
        raise ExportError("expected a non-empty object of named shape sets", file=path, field="shape_sets")
    out = {}
    for name, modes in data.items():
        if not isinstance(modes, dict) or not modes:
            raise ExportError("expected an object mapping each mode to a list of T", file=path, field=name)
        out[name] = {mode: check_ts(ts, file=path, field=f"{name}.{mode}") for mode, ts in modes.items()}
    return out


def pick(sets: dict, name: str, *, file: object, field: str = "shape_set") -> dict[str, list[int]]:
    if name not in sets:
        raise ExportError(f"unknown shape set {name!r}; defined: {sorted(sets)}", file=file, field=field)
    return sets[name]
