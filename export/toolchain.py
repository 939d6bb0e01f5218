"""Toolchain versions, read from package metadata: nothing is imported.

Every doit run keys its tasks by these, so they are read fast: one listing of
each ``sys.path`` folder, taking the version from the ``<name>-<version>.dist-info``
folder names (the first on the path wins, as for imports); importlib.metadata
answers for anything installed otherwise.
"""
from __future__ import annotations

import os
import platform
import re
import sys
from functools import lru_cache
from importlib import metadata

PACKAGES = ("torch", "coremltools", "numpy", "onnx", "onnxruntime")


@lru_cache(maxsize=None)
def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Python's version and each package's (``absent`` when not installed)."""
    out = {"python": platform.python_version()}
    found = _dist_infos()
    for name in packages:
        version = found.get(_normal(name))
        if version is None:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                version = "absent"
        out[name] = version
    return out


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@lru_cache(maxsize=None)
def _dist_infos() -> dict[str, str]:
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for n in names:
            if n.endswith(".dist-info") and "-" in n:
                name, version = n[: -len(".dist-info")].rsplit("-", 1)
                found.setdefault(_normal(name), version)
    return found
