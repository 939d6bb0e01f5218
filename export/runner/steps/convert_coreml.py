"""convert_coreml: an exported (mode, T) -> a Core ML package checked against its contract, + its manifest."""
from __future__ import annotations

from pathlib import Path

from ..programs import PROGRAMS
from ..outputs import write_package_manifest


def run(exported: str, contract: str, out: str, options: dict, weights: str | None = None) -> None:
    from ...coreml.convert import convert
    from ...digest import file_digest

    program = PROGRAMS.take(file_digest(exported)) if exported.endswith(".pt2") and PROGRAMS else None
    if program is not None:
        print(f"{exported}: the program this worker exported, still in memory (not loaded again)")
    convert(exported, out, contract, options, program=program, weights=weights)
    write_package_manifest(Path(out))
