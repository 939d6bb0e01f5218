"""Architectures: ``get(name)`` returns an ``Architecture`` (see ``spec.py``).

Importing this package does not import torch (task generation imports
``export.models.names``); ``get`` and ``REGISTRY`` load the models on first use.
"""
from __future__ import annotations


def __getattr__(name: str):
    if name in ("REGISTRY", "get"):
        from . import registry

        return getattr(registry, name)
    if name in ("Architecture", "ModeSpec", "TensorSpec"):
        from . import spec

        return getattr(spec, name)
    raise AttributeError(name)
