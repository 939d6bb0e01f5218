"""The architecture registry. ``get(name)`` returns an ``Architecture``. Imports torch.

Each architecture lives in its own module (``export/models/<name>.py``, its ``ARCHITECTURE``), imported
only when asked for: a build of the student never loads the judge's code, which is why a step's code key
holds only its leaf's architecture module (export/codekey.py).
"""
from __future__ import annotations

import importlib

from ..errors import ExportError
from .names import ARCHITECTURE_NAMES, module_name
from .spec import Architecture


def get(name: str, *, file: object = None, field: str = "architecture") -> Architecture:
    if not isinstance(name, str) or name not in ARCHITECTURE_NAMES:
        raise ExportError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURE_NAMES)}", file=file,
                          field=field)
    arch = importlib.import_module(f"{__package__}.{module_name(name)}").ARCHITECTURE
    assert arch.name == name
    return arch


def all_architectures() -> dict[str, Architecture]:
    """Every architecture, by name (loads them all)."""
    return {name: get(name) for name in ARCHITECTURE_NAMES}
