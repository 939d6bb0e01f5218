"""Core ML conversion options: one plain, validated record, importable without
coremltools (the build graph keys conversions by ``to_json()``).

| option | values | default |
|---|---|---|
| compute_precision | fp16, fp32 | fp16 |
| minimum_deployment_target | iOS16, iOS17, iOS18, macOS13, macOS14, macOS15 | iOS17 |
| compute_units | all, cpu_only, cpu_and_gpu, cpu_and_ne | all |
| kv_cache | explicit, state (decode only; needs iOS18/macOS15) | explicit |
| compression | none, palettize, linear_int8 | none |
| palettize_bits | 1, 2, 3, 4, 6, 8 (with compression = palettize) | 4 |
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import ExportError
from ..contract import KV_CACHE_STYLES

CHOICES = {
    "compute_precision": ("fp16", "fp32"),
    "minimum_deployment_target": ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15"),
    "compute_units": ("all", "cpu_only", "cpu_and_gpu", "cpu_and_ne"),
    "kv_cache": KV_CACHE_STYLES,
    "compression": ("none", "palettize", "linear_int8"),
    "palettize_bits": (1, 2, 3, 4, 6, 8),
}
STATEFUL_TARGETS = ("iOS18", "macOS15")


@dataclass(frozen=True)
class CoreMLOptions:
    compute_precision: str = "fp16"
    minimum_deployment_target: str = "iOS17"
    compute_units: str = "all"
    kv_cache: str = "explicit"
    compression: str = "none"
    palettize_bits: int = 4

    @classmethod
    def from_dict(cls, data: object, *, file: object = None, field: str = "coreml") -> "CoreMLOptions":
        if not isinstance(data, dict):
            raise ExportError(f"expected a table of Core ML options, got {data!r}", file=file, field=field)
        known = [f.name for f in fields(cls)]
        for key, value in data.items():
            if key not in CHOICES:
                raise ExportError(f"unknown Core ML option; known: {known}", file=file, field=f"{field}.{key}")
            allowed = CHOICES[key]
            if isinstance(value, bool) or value not in allowed:
                raise ExportError(f"{value!r} is not one of {list(allowed)}", file=file, field=f"{field}.{key}")
        opts = cls(**data)
        if opts.kv_cache == "state" and opts.minimum_deployment_target not in STATEFUL_TARGETS:
            raise ExportError(
                f"a stateful KV cache needs minimum_deployment_target in {list(STATEFUL_TARGETS)}, "
                f"got {opts.minimum_deployment_target!r}", file=file, field=f"{field}.kv_cache")
        return opts

    def to_json(self) -> dict:
        return asdict(self)
