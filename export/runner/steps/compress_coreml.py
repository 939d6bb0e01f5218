"""compress_coreml: a converted float package + a recipe -> a compressed package, its manifest, and its
measured quality against the float package (export/coreml/quality.py: both run in the numpy Core ML
interpreter)."""
from __future__ import annotations

import json
from pathlib import Path

from ... import atomic
from ..outputs import write_package_manifest


def run(package: str, contract: str, recipe: dict, out: str, quality: str) -> None:
    from ...coreml.compress import compress
    from ...coreml.quality import measure

    counts = compress(package, out, recipe)
    write_package_manifest(Path(out))
    figures = measure(Path(package), Path(out), Path(contract))
    figures["weights_per_part"] = counts
    atomic.write_text(Path(quality), json.dumps(figures, indent=2, sort_keys=True) + "\n")
