"""bundle_coreml: a model's (mode, T) packages -> one multifunction package + contract.json, + its manifest."""
from __future__ import annotations

from pathlib import Path

from ..outputs import write_package_manifest


def run(contract_out: str, packages: list[str] = (), contracts: list[str] = (), out: str | None = None,
        metadata: dict | None = None, files: list[str] = (), files_out: str | None = None, chain: list | None = None,
        model: str | None = None, architecture: str | None = None, device_limits: dict | None = None) -> None:
    from ...coreml.bundle import bundle
    from ...coreml.checks import check_device_limits, problem_line

    if chain is not None:  # a parted model: contract.json, the chain of its parts' bundles
        from ...coreml.bundle import write_chain

        write_chain(chain, Path(contract_out), model=model, architecture=architecture, files=[Path(f) for f in files],
                    files_out=Path(files_out) if files_out else None)
        return

    bundle([Path(p) for p in packages], [Path(c) for c in contracts], Path(out), Path(contract_out),
           model_metadata=metadata, files=[Path(f) for f in files], files_out=Path(files_out) if files_out else None,
           device_limits=device_limits)
    device = check_device_limits(out, device_limits["target"], None, file=out) if device_limits else None
    for p in (device or {}).get("problems", ()):
        print(f"warning: {out}: {problem_line(p)}")
    write_package_manifest(Path(out), device=device)
