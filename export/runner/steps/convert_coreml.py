"""convert_coreml: an exported (mode, T) -> a Core ML package checked against its contract, + its manifest."""
from __future__ import annotations

from pathlib import Path

from ..checkpoints import forget
from ..programs import PROGRAMS
from ..outputs import write_package_manifest


def run(exported: str, contract: str, out: str, options: dict, weights: str | None = None,
        device_limits: dict | None = None) -> None:
    from ...coreml.checks import check_device_limits, problem_line
    from ...coreml.convert import convert
    from ...coreml.options import CoreMLOptions
    from ...digest import file_digest

    program = PROGRAMS.take(file_digest(exported)) if exported.endswith(".pt2") and PROGRAMS else None
    if program is not None:
        print(f"{exported}: the program this worker exported, still in memory (not loaded again)")
    else:  # what the worker holds (another part's weights, its programs) does not serve this conversion
        forget()
    limits = device_limits or {"target": CoreMLOptions.from_dict(options, file=contract, field="options")
                               .minimum_deployment_target, "policy": "warn"}
    convert(exported, out, contract, options, program=program, weights=weights, device_limits=limits["policy"])
    device = check_device_limits(out, limits["target"], None, file=out)
    for p in device["problems"]:
        print(f"warning: {out}: {problem_line(p)}")
    write_package_manifest(Path(out), device=device)
