"""bundle_coreml: a model's (mode, T) packages -> one multifunction package + contract.json, + its manifest."""
from __future__ import annotations

from pathlib import Path

from ..outputs import write_package_manifest


def run(packages: list[str], contracts: list[str], out: str, contract_out: str) -> None:
    from ...coreml.bundle import bundle

    bundle([Path(p) for p in packages], [Path(c) for c in contracts], Path(out), Path(contract_out))
    write_package_manifest(Path(out))
