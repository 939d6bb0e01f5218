"""How the steps finish their outputs: a package's manifest, written last."""
from __future__ import annotations

import json
from pathlib import Path

from .. import atomic
from ..digest import file_digest, tree_digest, tree_files
from ..layout import manifest_of


def write_package_manifest(package: Path, device: dict | None = None) -> Path:
    """Write ``<package>.manifest.json`` (its tree digest and file digests), last, atomically.

    doit cannot take a folder as a dependency; this file stands for it downstream. ``device``: the package's
    figures against its devices' limits (export/coreml/checks.py, ``check_device_limits``), which the
    planner reports (export/planner/tasks.py, ``_device``).
    """
    files = {rel: file_digest(package / rel) for rel in tree_files(package)}
    manifest = manifest_of(package)
    body = {"package": package.name, "digest": tree_digest(package), "files": files}
    if device is not None:
        body["device"] = device
    atomic.write_text(manifest, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return manifest
