"""Shared by the Core ML tests: a tiny student big enough for weight compression
(every linear weight above coremltools' 2048-element threshold), exported once."""
from __future__ import annotations

from pathlib import Path

from export import checkpoint, export_pytorch

STUDENT = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_positions=64)
TS = (16, 32)
SUFFIX = {"torchscript": ".pt", "exported_program": ".pt2"}


def export_tiny(root: Path, *, kv_cache: str = "explicit", modes=None) -> Path:
    """Checkpoint + exports (both formats, T in TS) under ``root``; returns the export folder."""
    root.mkdir(parents=True, exist_ok=True)
    config, model = checkpoint.demo_model("student", STUDENT)
    ck = root / "student.pt"
    checkpoint.save(ck, "student", config, model.state_dict())
    out = root / "exported"
    export_pytorch.export_model(ck, out, modes=modes, enumerated_T=list(TS), kv_cache=kv_cache)
    return out


def entry(exported: Path, mode: str, T: int, fmt: str) -> tuple[Path, Path]:
    """(exported file, contract) of one (mode, T)."""
    stem = f"{mode}_T{T}"
    return exported / (stem + SUFFIX[fmt]), exported / f"{stem}.contract.json"


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders left beside outputs."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") and (".tmp" in p.name or ".merge" in p.name))
