"""bundle_coreml: a model's (mode, T) packages -> one multifunction package + contract.json, + its manifest."""
from __future__ import annotations

from pathlib import Path

from ..outputs import write_package_manifest


def run(packages: list[str], contracts: list[str], out: str, contract_out: str, metadata: dict | None = None,
        files: list[str] = (), files_out: str | None = None) -> None:
    from ...coreml.bundle import bundle

    bundle([Path(p) for p in packages], [Path(c) for c in contracts], Path(out), Path(contract_out),
           model_metadata=metadata, files=[Path(f) for f in files], files_out=Path(files_out) if files_out else None)
    write_package_manifest(Path(out))
