"""Toolchain versions, read from package metadata: nothing is imported."""
from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata

PACKAGES = ("torch", "coremltools", "numpy", "onnx", "onnxruntime")


@lru_cache(maxsize=None)
def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Python's version and each package's (``absent`` when not installed)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
