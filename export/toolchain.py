"""Toolchain versions, read from package metadata: nothing is imported."""
from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata

PACKAGES = ("torch", "coremltools", "numpy", "onnx", "onnxruntime")


@lru_cache(maxsize=None)
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
