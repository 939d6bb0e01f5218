"""compress_coreml: a converted float package + a recipe -> a compressed package, its manifest, and its
measured quality against the float package (export/coreml/quality.py: both run in the numpy Core ML
interpreter)."""
from __future__ import annotations

import json
from pathlib import Path

from ... import atomic
from ..outputs import write_package_manifest


def run(package: str, contract: str, recipe: dict, out: str, quality: str, device_limits: dict | None = None) -> None:
    from ...coreml.checks import check_device_limits, problem_line
    from ...coreml.compress import compress
    from ...coreml.quality import measure

    counts = compress(package, out, recipe, device_limits=device_limits)
    device = check_device_limits(out, device_limits["target"], None, file=out) if device_limits else None
    for p in (device or {}).get("problems", ()):
        print(f"warning: {out}: {problem_line(p)}")
    write_package_manifest(Path(out), device=device)
    figures = measure(Path(package), Path(out), Path(contract))
    figures["weights_per_part"] = counts
    atomic.write_text(Path(quality), json.dumps(figures, indent=2, sort_keys=True) + "\n")
