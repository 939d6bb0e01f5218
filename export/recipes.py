"""Compression recipes (``[tool.export.recipes.<name>]``), validated without coremltools.

A recipe gives a compression per part of the model; the compress step
(export/coreml/compress.py) applies it to a converted float package with
coremltools' ``ct.optimize.coreml``.

```toml
[tool.export.recipes.lut4]
default = { palettize_bits = 4, granularity = "per_grouped_channel", group_size = 16 }
lm_head = { palettize_bits = 6 }

[tool.export.recipes.int4]
default = { quantize = "int4", block_size = 32 }      # int4 per block
embeddings = "none"                                   # this part stays float

[tool.export.recipes.int8]
default = { quantize = "int8" }                       # int8 per output channel
```

| part | weights it covers (op-name patterns, export/coreml/compress.py) |
|---|---|
| embeddings | the token embedding table |
| attention | q/k/v/o projections |
| ffn | the feed-forward (gate/up/down) projections |
| lm_head | the output projection to the vocabulary |
| default | every other weight, and every part the recipe does not name |

A part's setting is ``"none"`` (left float) or a table with either
- ``palettize_bits`` (1, 2, 3, 4, 6, 8), ``granularity`` (``per_tensor``, the default, or
  ``per_grouped_channel`` with ``group_size``, default 16): a look-up table of 2^n values
  (coremltools' uniform palettization: no k-means, the same bytes every run); or
- ``quantize`` (``int8`` or ``int4``), ``granularity`` (``per_channel``, the default for int8, or
  ``per_block`` with ``block_size``, default 32, the default for int4): symmetric linear quantization.

Grouped look-up tables, 3-bit tables, int4 and per-block scales need ``minimum_deployment_target``
iOS18 or macOS15: a recipe that asks for them on an older target is refused when the config loads.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ExportError

PARTS = ("default", "embeddings", "attention", "ffn", "lm_head")
PALETTIZE_BITS = (1, 2, 3, 4, 6, 8)
QUANTIZE = ("int8", "int4")
PALETTIZE_GRANULARITY = ("per_tensor", "per_grouped_channel")
QUANTIZE_GRANULARITY = ("per_channel", "per_block")
IOS18_TARGETS = ("iOS18", "macOS15")
PALETTIZE_KEYS = {"palettize_bits", "granularity", "group_size"}
QUANTIZE_KEYS = {"quantize", "granularity", "block_size"}


@dataclass(frozen=True)
class PartSetting:
    kind: str                 # "none", "palettize", "quantize"
    bits: int = 0             # palettize: LUT bits
    dtype: str = ""           # quantize: int8 | int4
    granularity: str = ""
    group_size: int = 0       # palettize per_grouped_channel
    block_size: int = 0       # quantize per_block

    def needs_ios18(self) -> str | None:
        """Why this setting needs iOS18/macOS15, or None."""
        if self.kind == "palettize" and self.granularity == "per_grouped_channel":
            return "a grouped look-up table (per_grouped_channel)"
        if self.kind == "palettize" and self.bits == 3:
            return "a 3-bit look-up table"
        if self.kind == "quantize" and self.dtype == "int4":
            return "int4 quantization"
        if self.kind == "quantize" and self.granularity == "per_block":
            return "per-block quantization"
        return None

    def to_json(self) -> dict:
        if self.kind == "none":
            return {"kind": "none"}
        if self.kind == "palettize":
            d = {"kind": "palettize", "bits": self.bits, "granularity": self.granularity}
            if self.granularity == "per_grouped_channel":
                d["group_size"] = self.group_size
            return d
        d = {"kind": "quantize", "dtype": self.dtype, "granularity": self.granularity}
        if self.granularity == "per_block":
            d["block_size"] = self.block_size
        return d


@dataclass(frozen=True)
class Recipe:
    name: str
    parts: tuple[tuple[str, PartSetting], ...]  # in PARTS order, only those given

    def setting(self, part: str) -> PartSetting:
        given = dict(self.parts)
        return given.get(part, given.get("default", PartSetting("none")))

    def to_json(self) -> dict:
        """The recipe as the compress step takes it (and as its key covers it): every part resolved."""
        return {"name": self.name, "parts": {p: self.setting(p).to_json() for p in PARTS}}

    def check_target(self, target: str, *, file, field: str) -> None:
        if target in IOS18_TARGETS:
            return
        for part, s in self.parts:
            why = s.needs_ios18()
            if why:
                raise ExportError(f"recipe {self.name!r} asks for {why} in part {part!r}, which needs "
                                  f"minimum_deployment_target in {list(IOS18_TARGETS)}; this model's is {target!r}",
                                  file=file, field=field)


def _int(v, *, file, field, allowed=None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ExportError(f"expected a positive integer, got {v!r}", file=file, field=field)
    if allowed is not None and v not in allowed:
        raise ExportError(f"{v!r} is not one of {list(allowed)}", file=file, field=field)
    return v


def _choice(v, allowed, *, file, field) -> str:
    if v not in allowed:
        raise ExportError(f"{v!r} is not one of {list(allowed)}", file=file, field=field)
    return v


def parse_setting(raw, *, file, field) -> PartSetting:
    if raw == "none":
        return PartSetting("none")
    if not isinstance(raw, dict):
        raise ExportError(f"expected \"none\" or a table with palettize_bits or quantize, got {raw!r}",
                          file=file, field=field)
    if ("palettize_bits" in raw) == ("quantize" in raw):
        raise ExportError("give exactly one of palettize_bits (a look-up table) or quantize (int8, int4)",
                          file=file, field=field)
    if "palettize_bits" in raw:
        unknown = sorted(set(raw) - PALETTIZE_KEYS)
        if unknown:
            raise ExportError(f"unknown key(s) {unknown} for palettization; known: {sorted(PALETTIZE_KEYS)}",
                              file=file, field=f"{field}.{unknown[0]}")
        bits = _int(raw["palettize_bits"], file=file, field=f"{field}.palettize_bits", allowed=PALETTIZE_BITS)
        gran = _choice(raw.get("granularity", "per_tensor"), PALETTIZE_GRANULARITY, file=file, field=f"{field}.granularity")
        if "group_size" in raw and gran != "per_grouped_channel":
            raise ExportError("group_size needs granularity = \"per_grouped_channel\"", file=file, field=f"{field}.group_size")
        group = _int(raw.get("group_size", 16), file=file, field=f"{field}.group_size")
        return PartSetting("palettize", bits=bits, granularity=gran,
                           group_size=group if gran == "per_grouped_channel" else 0)
    unknown = sorted(set(raw) - QUANTIZE_KEYS)
    if unknown:
        raise ExportError(f"unknown key(s) {unknown} for quantization; known: {sorted(QUANTIZE_KEYS)}",
                          file=file, field=f"{field}.{unknown[0]}")
    dtype = _choice(raw["quantize"], QUANTIZE, file=file, field=f"{field}.quantize")
    gran = _choice(raw.get("granularity", "per_channel" if dtype == "int8" else "per_block"), QUANTIZE_GRANULARITY,
                   file=file, field=f"{field}.granularity")
    if "block_size" in raw and gran != "per_block":
        raise ExportError("block_size needs granularity = \"per_block\"", file=file, field=f"{field}.block_size")
    block = _int(raw.get("block_size", 32), file=file, field=f"{field}.block_size")
    return PartSetting("quantize", dtype=dtype, granularity=gran, block_size=block if gran == "per_block" else 0)


def parse_recipes(raw, *, file, name_pattern) -> dict[str, Recipe]:
    at = "tool.export.recipes"
    if not isinstance(raw, dict):
        raise ExportError(f"expected a table of named recipes, got {raw!r}", file=file, field=at)
    out = {}
    for name, table in raw.items():
        if not name_pattern.match(name):
            raise ExportError(f"{name!r} is not a plain name (letters, digits, '_' and '-'; it becomes part of a file name)",
                              file=file, field=f"{at}.{name}")
        if not isinstance(table, dict) or not table:
            raise ExportError("expected a table of parts (default, embeddings, attention, ffn, lm_head)",
                              file=file, field=f"{at}.{name}")
        unknown = sorted(set(table) - set(PARTS))
        if unknown:
            raise ExportError(f"unknown part(s) {unknown}; known: {list(PARTS)}", file=file, field=f"{at}.{name}.{unknown[0]}")
        parts = tuple((p, parse_setting(table[p], file=file, field=f"{at}.{name}.{p}")) for p in PARTS if p in table)
        if all(s.kind == "none" for _, s in parts):
            raise ExportError("the recipe compresses nothing", file=file, field=f"{at}.{name}")
        out[name] = Recipe(name, parts)
    return out
