"""The pipeline config: ``[tool.export]`` in pyproject.toml plus shape_sets.json.

```toml
[tool.export]
artifacts = "artifacts"            # build outputs
shape_sets = "shape_sets.json"

[[tool.export.models]]
name = "student"                   # a plain name: it is also a folder name
architecture = "student"
checkpoint = "demo"                # "demo" (made on demand, deterministic) or a path (a file, or a model folder)
shape_set = "default"              # a set of shape_sets.json
modes = ["prefill", "decode"]      # default: every mode of the architecture
formats = ["exported_program"]     # export formats: exported_program, torchscript
convert_from = "exported_program"  # which export Core ML converts
dtype = "fp32"                     # export dtype: fp32 | fp16
coreml = { compute_precision = "fp16" }   # Core ML options, see export.coreml.options
# a decoder LM built as a chain of parts (export/parts.py; a safetensors checkpoint); none of these: one whole model
chunks = 4                         # decoder-layer chunks (or max_part_mb = 900: the fewest chunks whose parts fit)
embed_part = false                 # the embeddings as a part of their own ("embed")
head_part = false                  # the final norm and the LM head as a part of their own ("head")
head_split = "none"                # "auto": logits in pieces of at most 16384 vocabulary rows; or a number of rows

[tool.export.cache]                # optional
local = "~/.cache/model-export"    # shared by checkouts; $MODEL_EXPORT_CACHE
remote = "s3://bucket/prefix"      # or a directory; $MODEL_EXPORT_REMOTE_CACHE
read_only = false                  # $MODEL_EXPORT_CACHE_READ_ONLY=1

[tool.export.dask]                 # optional: run the steps on a Dask cluster (needs cache.remote)
scheduler = "tcp://host:8786"      # $MODEL_EXPORT_DASK_SCHEDULER, doit --dask ADDRESS; "" = off
lanes = 8                          # steps in flight at once (default: the cluster's worker threads)
```
Every error names the file and the field. Imports no torch.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import shape_sets as shape_sets_mod
from .coreml.options import STATEFUL_TARGETS, CoreMLOptions
from .errors import ExportError
from .recipes import Recipe, parse_recipes
from .contract import FORMATS as EXPORT_FORMATS
from .models.names import ARCHITECTURE_MODES, ARCHITECTURE_NAMES, DEMO_ARCHITECTURES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
FORMATS = tuple(sorted(EXPORT_FORMATS))  # exported_program, torchscript
TOP_KEYS = {"artifacts", "shape_sets", "models", "cache", "memory_budget_mb", "dask", "recipes"}
CACHE_KEYS = {"local", "remote", "read_only"}
DASK_KEYS = {"scheduler", "lanes"}
MODEL_KEYS = {"name", "architecture", "checkpoint", "shape_set", "modes", "formats", "convert_from", "dtype", "coreml",
              "recipes", "metadata", "chunks", "max_part_mb", "embed_part", "head_part", "head_split",
              "device_limits"}
PART_KEYS = ("chunks", "max_part_mb", "embed_part", "head_part", "head_split")  # any of them makes a model parted
ANE_MAX_DIM = 16384  # the Neural Engine's largest tensor dimension: head_split = "auto" keeps logits pieces within it
PART_ARCHITECTURES = ("student", "hf-causal-lm")  # the decoder LMs of export/models/decoder_lm.py
DEVICE_LIMITS = ("warn", "fail")  # what a package over a device limit does (export/coreml/checks.py, device_problems)
METADATA_KEYS = ("author", "license", "version", "short_description")  # the package's own metadata fields


@dataclass(frozen=True)
class PartsConfig:
    """How a model is cut into parts (export/parts.py makes the plan from the checkpoint's header)."""
    chunks: int | None = None          # decoder-layer chunks; None: derived from max_part_mb (else 1)
    max_part_mb: float | None = None   # the largest part's weights in its package, MB (2**20 bytes)
    embed_part: bool = False           # the embeddings as a part of their own ("embed")
    head_part: bool = False            # the final norm and LM head as a part of their own ("head")
    head_split: int | None = None      # logits in pieces of at most this many vocabulary rows (None: one piece)

    def to_json(self) -> dict:
        return {"chunks": self.chunks, "max_part_mb": self.max_part_mb, "embed_part": self.embed_part,
                "head_part": self.head_part, "head_split": self.head_split}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    architecture: str
    checkpoint: str  # "demo" or a path relative to the project
    shape_set: str
    modes: tuple[str, ...]
    enumerated_T: dict[str, tuple[int, ...]]
    formats: tuple[str, ...]
    convert_from: str
    dtype: str
    coreml: CoreMLOptions
    recipes: tuple[Recipe, ...] = ()                 # export/recipes.py: each builds compressed packages + a bundle
    metadata: tuple[tuple[str, str], ...] = ()       # METADATA_KEYS given, in that order
    parts: PartsConfig | None = None                 # a parted model (chunks, ...); None: one package per (mode, T)
    index: int = 0                                   # its place in tool.export.models (errors name the field)
    device_limits: str = "warn"                      # DEVICE_LIMITS: a package over a device limit warns, or fails

    @property
    def is_demo(self) -> bool:
        return self.checkpoint == "demo"

    def leaves(self):
        """(mode, T) pairs, in a stable order."""
        return [(m, t) for m in self.modes for t in self.enumerated_T[m]]


@dataclass(frozen=True)
class CacheConfig:
    local: str | None = None   # default: $MODEL_EXPORT_CACHE, else ~/.cache/model-export
    remote: str | None = None  # an fsspec URL: a directory, s3://bucket/prefix ($MODEL_EXPORT_REMOTE_CACHE)
    read_only: bool = False    # never publish to the remote ($MODEL_EXPORT_CACHE_READ_ONLY=1)


@dataclass(frozen=True)
class DaskConfig:
    scheduler: str | None = None  # a Dask scheduler's address; None: steps run on this machine
    lanes: int | None = None      # steps in flight at once; default: the cluster's worker threads


@dataclass(frozen=True)
class Config:
    root: Path
    artifacts: Path
    shape_sets_file: Path
    models: tuple[ModelConfig, ...] = field(default_factory=tuple)
    cache: CacheConfig = CacheConfig()
    memory_budget_mb: int | None = None  # what parallel steps may use together; default 3/4 of the machine
    dask: DaskConfig = DaskConfig()

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)


def _expect(value, kind, *, file, field, what=None):
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        want = what or getattr(kind, "__name__", str(kind))
        raise ExportError(f"expected {want}, got {value!r}", file=file, field=field)
    return value


def _str_list(value, *, file, field, allowed) -> tuple[str, ...]:
    _expect(value, list, file=file, field=field, what="a list")
    if not value:
        raise ExportError("must not be empty", file=file, field=field)
    for i, v in enumerate(value):
        if v not in allowed:
            raise ExportError(f"unknown value {v!r}; allowed: {list(allowed)}", file=file, field=f"{field}[{i}]")
    if len(set(value)) != len(value):
        raise ExportError(f"duplicate values in {value}", file=file, field=field)
    return tuple(value)


def load(root: Path | str = ".") -> Config:
    root = Path(root).resolve()
    file = root / "pyproject.toml"
    try:
        data = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ExportError("no pyproject.toml in the project folder", file=file, field="tool.export") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"not valid TOML: {e}", file=file, field="(file)") from None
    table = data.get("tool", {}).get("export")
    if table is None:
        raise ExportError("no [tool.export] table", file=file, field="tool.export")
    return parse(table, root=root, file=file)


def parse(table: object, *, root: Path, file: Path) -> Config:
    _expect(table, dict, file=file, field="tool.export", what="a table")
    unknown = sorted(set(table) - TOP_KEYS)
    if unknown:
        raise ExportError(f"unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}", file=file, field=f"tool.export.{unknown[0]}")
    artifacts = root / _expect(table.get("artifacts", "artifacts"), str, file=file, field="tool.export.artifacts")
    sets_file = root / _expect(table.get("shape_sets", "shape_sets.json"), str, file=file, field="tool.export.shape_sets")
    artifacts = _artifacts_folder(artifacts, root=root, file=file, keep=[sets_file])
    models_raw = table.get("models")
    if models_raw is None:
        raise ExportError("no models: add at least one [[tool.export.models]]", file=file, field="tool.export.models")
    _expect(models_raw, list, file=file, field="tool.export.models", what="an array of tables")
    if not models_raw:
        raise ExportError("the model list is empty", file=file, field="tool.export.models")
    sets = shape_sets_mod.load(sets_file)
    recipes = parse_recipes(table.get("recipes", {}), file=file, name_pattern=NAME)
    models, seen = [], {}
    for i, raw in enumerate(models_raw):
        m = _model(raw, i, sets=sets, sets_file=sets_file, file=file, recipes=recipes, root=root)
        if m.name in seen:
            raise ExportError(f"duplicate model name {m.name!r} (also models[{seen[m.name]}])", file=file, field=f"tool.export.models[{i}].name")
        # names become folder names: macOS's case-insensitive disks, where the artifacts are opened, merge these
        same = next((j for n, j in seen.items() if n.lower() == m.name.lower()), None)
        if same is not None:
            raise ExportError(f"model name {m.name!r} differs from models[{same}]'s {models[same].name!r} only in case: "
                              "their folders would be one on a case-insensitive disk (macOS)", file=file,
                              field=f"tool.export.models[{i}].name")
        seen[m.name] = i
        models.append(m)
    _check_set_modes(sets, models, sets_file=sets_file)
    for i, m in enumerate(models):
        if not m.is_demo:
            _outside_artifacts(root / m.checkpoint, artifacts, file=file, field=f"tool.export.models[{i}].checkpoint",
                               what=f"the checkpoint of model {m.name!r}")
    cache = _cache(table.get("cache", {}), root=root, file=file)
    budget = table.get("memory_budget_mb")
    if budget is not None and (_expect(budget, int, file=file, field="tool.export.memory_budget_mb") <= 0):
        raise ExportError(f"must be a positive number of MB, got {budget}", file=file, field="tool.export.memory_budget_mb")
    return Config(root=root, artifacts=artifacts, shape_sets_file=sets_file, models=tuple(models), cache=cache,
                  memory_budget_mb=budget, dask=_dask(table.get("dask", {}), file=file))


# What an artifacts folder may never hold: the build prunes there, and a project file in it could be
# taken for an output (the promise: the build never deletes or alters a file it did not write).
PROJECT_FILES = ("pyproject.toml", "dodo.py", "export", ".export", ".git")


def _inside(p: Path, folder: Path) -> bool:
    return p == folder or folder in p.parents


def _artifacts_folder(artifacts: Path, *, root: Path, file, keep: list[Path]) -> Path:
    """The artifacts folder, resolved: a folder of its own inside the project, holding none of its files."""
    at = "tool.export.artifacts"
    if "\0" in str(artifacts):
        raise ExportError("not a folder name (it holds a NUL character)", file=file, field=at)
    resolved = Path(os.path.realpath(artifacts))
    if not _inside(resolved, root) or resolved == root:
        where = "the project folder itself" if resolved == root else f"{resolved}, outside the project folder {root}"
        raise ExportError(f"the artifacts folder is {where}: give a folder of its own inside the project "
                          "(e.g. \"artifacts\")", file=file, field=at)
    for name in PROJECT_FILES:
        if _inside(resolved, root / name) or _inside(root / name, resolved):
            raise ExportError(f"the artifacts folder {resolved.relative_to(root)} {'is inside' if _inside(resolved, root / name) else 'holds'} "
                              f"the project's {name}: give a folder of its own (e.g. \"artifacts\")", file=file, field=at)
    for p in keep:
        _outside_artifacts(p, resolved, file=file, field=at, what=f"the project's {p.name}")
    return resolved


def _outside_artifacts(p: Path, artifacts: Path, *, file, field: str, what: str) -> None:
    if "\0" in str(p):
        raise ExportError("not a file name (it holds a NUL character)", file=file, field=field)
    if _inside(Path(os.path.realpath(p)), artifacts):
        raise ExportError(f"{what} ({p}) is inside the artifacts folder {artifacts}: the build writes and prunes "
                          "there; keep inputs outside it", file=file, field=field)


def _check_set_modes(sets: dict, models: list, *, sets_file: Path) -> None:
    """A mode in a shape set that no architecture has, or that no model using the set has, is an error (it
    would be silently ignored)."""
    known = sorted({mode for modes in ARCHITECTURE_MODES.values() for mode in modes})
    for name, modes in sets.items():
        users = [m for m in models if m.shape_set == name]
        have = {mode for m in users for mode in ARCHITECTURE_MODES[m.architecture]}
        for mode in modes:
            if mode not in known:
                raise ExportError(f"unknown mode {mode!r}; the architectures have {known}", file=sets_file,
                                  field=f"{name}.{mode}")
            if users and mode not in have:
                archs = sorted({m.architecture for m in users})
                raise ExportError(f"mode {mode!r} is not a mode of {' or '.join(repr(a) for a in archs)} (the "
                                  f"architecture of every model using shape set {name!r}): it would never be built",
                                  file=sets_file, field=f"{name}.{mode}")


def _dask(raw, *, file) -> DaskConfig:
    at = "tool.export.dask"
    _expect(raw, dict, file=file, field=at, what="a table")
    unknown = sorted(set(raw) - DASK_KEYS)
    if unknown:
        raise ExportError(f"unknown key(s) {unknown}; known: {sorted(DASK_KEYS)}", file=file, field=f"{at}.{unknown[0]}")
    scheduler = _expect(raw.get("scheduler", ""), str, file=file, field=f"{at}.scheduler") or None
    lanes = raw.get("lanes")
    if lanes is not None and _expect(lanes, int, file=file, field=f"{at}.lanes") <= 0:
        raise ExportError(f"must be a positive number, got {lanes}", file=file, field=f"{at}.lanes")
    return DaskConfig(scheduler=scheduler, lanes=lanes)


def _cache(raw, *, root: Path, file) -> CacheConfig:
    at = "tool.export.cache"
    _expect(raw, dict, file=file, field=at, what="a table")
    unknown = sorted(set(raw) - CACHE_KEYS)
    if unknown:
        raise ExportError(f"unknown key(s) {unknown}; known: {sorted(CACHE_KEYS)}", file=file, field=f"{at}.{unknown[0]}")
    local = raw.get("local")
    if local is not None:
        local = str(root / Path(_expect(local, str, file=file, field=f"{at}.local")).expanduser())
    remote = raw.get("remote")
    if remote is not None:
        _expect(remote, str, file=file, field=f"{at}.remote")
    read_only = _expect(raw.get("read_only", False), bool, file=file, field=f"{at}.read_only")
    return CacheConfig(local=local, remote=remote, read_only=read_only)


def _model(raw, i, *, sets, sets_file, file, recipes=None, root: Path | None = None) -> ModelConfig:
    at = f"tool.export.models[{i}]"
    _expect(raw, dict, file=file, field=at, what="a table")
    unknown = sorted(set(raw) - MODEL_KEYS)
    if unknown:
        raise ExportError(f"unknown key(s) {unknown}; known: {sorted(MODEL_KEYS)}", file=file, field=f"{at}.{unknown[0]}")
    if "name" not in raw:
        raise ExportError("every model needs a name", file=file, field=f"{at}.name")
    name = _expect(raw["name"], str, file=file, field=f"{at}.name")
    if not NAME.match(name):
        raise ExportError(f"{name!r} is not a plain name (letters, digits, '_' and '-'; it becomes a folder name)", file=file, field=f"{at}.name")
    arch = _expect(raw.get("architecture", name), str, file=file, field=f"{at}.architecture")
    if arch not in ARCHITECTURE_NAMES:
        raise ExportError(f"unknown architecture {arch!r}; known: {list(ARCHITECTURE_NAMES)}", file=file, field=f"{at}.architecture")
    arch_modes = ARCHITECTURE_MODES[arch]
    modes = _str_list(raw.get("modes", list(arch_modes)), file=file, field=f"{at}.modes", allowed=arch_modes)
    checkpoint = _expect(raw.get("checkpoint", "demo"), str, file=file, field=f"{at}.checkpoint")
    if not checkpoint:
        raise ExportError("must be 'demo' or a path", file=file, field=f"{at}.checkpoint")
    if checkpoint == "demo" and arch not in DEMO_ARCHITECTURES:
        raise ExportError(f"architecture {arch!r} has no demo checkpoint: give the path of a model folder "
                          "(config.json + model.safetensors)", file=file, field=f"{at}.checkpoint")
    set_name = _expect(raw.get("shape_set", "default"), str, file=file, field=f"{at}.shape_set")
    chosen = shape_sets_mod.pick(sets, set_name, file=file, field=f"{at}.shape_set")
    enumerated = {}
    for mode in modes:
        if mode not in chosen:
            raise ExportError(f"shape set {set_name!r} lists no T for mode {mode!r}", file=sets_file, field=f"{set_name}.{mode}")
        enumerated[mode] = tuple(chosen[mode])
    formats = _str_list(raw.get("formats", ["exported_program"]), file=file, field=f"{at}.formats", allowed=FORMATS)
    convert_from = _expect(raw.get("convert_from", formats[0]), str, file=file, field=f"{at}.convert_from")
    if convert_from not in formats:
        raise ExportError(f"{convert_from!r} is not one of this model's formats {list(formats)}", file=file, field=f"{at}.convert_from")
    dtype = _expect(raw.get("dtype", "fp32"), str, file=file, field=f"{at}.dtype")
    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"expected 'fp32' or 'fp16', got {dtype!r}", file=file, field=f"{at}.dtype")
    coreml = CoreMLOptions.from_dict(raw.get("coreml", {}), file=file, field=f"{at}.coreml")
    if coreml.kv_cache == "state" and coreml.compute_precision != "fp16" and "decode" in modes:
        raise ExportError("a stateful KV cache keeps fp16 state: use coreml.compute_precision = \"fp16\" (the "
                          "decode conversion would fail)", file=file, field=f"{at}.coreml.kv_cache")
    if coreml.compression != "none" and coreml.minimum_deployment_target not in STATEFUL_TARGETS:
        # found before any step runs: else every leaf converts and the model's bundle fails at the end
        raise ExportError(f"compressed packages merge into the model's bundle only when converted for "
                          f"{' or '.join(STATEFUL_TARGETS)}: set coreml.minimum_deployment_target to one of them (got "
                          f"{coreml.minimum_deployment_target!r})", file=file, field=f"{at}.coreml.compression")
    chosen_recipes = _model_recipes(raw, at, recipes or {}, coreml, file=file)
    device_limits = _expect(raw.get("device_limits", "warn"), str, file=file, field=f"{at}.device_limits")
    if device_limits not in DEVICE_LIMITS:
        raise ExportError(f"expected one of {list(DEVICE_LIMITS)}, got {device_limits!r}", file=file, field=f"{at}.device_limits")
    parts = _parts(raw, at, arch=arch, checkpoint=checkpoint, file=file, root=root)
    return ModelConfig(name=name, architecture=arch, checkpoint=checkpoint, shape_set=set_name, modes=modes,
                       enumerated_T=enumerated, formats=formats, convert_from=convert_from, dtype=dtype, coreml=coreml,
                       recipes=chosen_recipes, metadata=_metadata(raw.get("metadata", {}), f"{at}.metadata", file=file),
                       parts=parts, index=i, device_limits=device_limits)


SINGLE_FILE_CHECKPOINTS = (".pt", ".pth", ".bin", ".ckpt", ".pkl")  # torch.save files: no header to read parts from


def _parts(raw, at, *, arch: str, checkpoint: str, file, root: Path | None = None) -> PartsConfig | None:
    """``chunks``/``max_part_mb``/``embed_part``/``head_part``/``head_split``: the model's parts. What needs the
    checkpoint (its layer count, its tensors' sizes) is checked by export/parts.py before any step runs."""
    given = [k for k in PART_KEYS if k in raw]
    if not given:
        return None
    first = f"{at}.{given[0]}"
    if arch not in PART_ARCHITECTURES:
        raise ExportError(f"architecture {arch!r} is not a decoder LM that can be cut into parts (those are "
                          f"{list(PART_ARCHITECTURES)})", file=file, field=first)
    # a model folder may have dots in its name (Qwen2.5-0.5B, Llama-3.2-1B): a folder is one that is there, or,
    # not there yet, a name without a torch file's suffix
    path = Path(checkpoint) if root is None else root / checkpoint
    folder = path.is_dir() or (not path.exists() and path.suffix.lower() not in SINGLE_FILE_CHECKPOINTS)
    if checkpoint == "demo" or not (checkpoint.endswith(".safetensors") or folder):
        raise ExportError(f"a parted model needs a safetensors checkpoint (a .safetensors file or a model folder): its "
                          f"parts are keyed and loaded tensor by tensor from the header, got {checkpoint!r}",
                          file=file, field=first)
    chunks = raw.get("chunks")
    if chunks is not None and _expect(chunks, int, file=file, field=f"{at}.chunks", what="a whole number") < 1:
        raise ExportError(f"must be at least 1, got {chunks}", file=file, field=f"{at}.chunks")
    mb = raw.get("max_part_mb")
    if mb is not None:
        _expect(mb, (int, float), file=file, field=f"{at}.max_part_mb", what="a number of MB")
        if not mb > 0 or mb != mb or mb == float("inf"):
            raise ExportError(f"must be a positive number of MB, got {mb}", file=file, field=f"{at}.max_part_mb")
        if chunks is not None:
            raise ExportError("give chunks or max_part_mb, not both (max_part_mb derives the number of chunks)",
                              file=file, field=f"{at}.max_part_mb")
    embed = _expect(raw.get("embed_part", False), bool, file=file, field=f"{at}.embed_part", what="true or false")
    head = _expect(raw.get("head_part", False), bool, file=file, field=f"{at}.head_part", what="true or false")
    split = raw.get("head_split", "none")
    if split == "none":
        rows = None
    elif split == "auto":
        rows = ANE_MAX_DIM
    elif isinstance(split, int) and not isinstance(split, bool) and 1 <= split <= ANE_MAX_DIM:
        rows = split
    else:
        raise ExportError(f"expected \"auto\" (pieces of at most {ANE_MAX_DIM} vocabulary rows), \"none\", or the "
                          f"rows per piece (1..{ANE_MAX_DIM}), got {split!r}", file=file, field=f"{at}.head_split")
    return PartsConfig(chunks=chunks, max_part_mb=float(mb) if mb is not None else None, embed_part=embed,
                       head_part=head, head_split=rows)


def _model_recipes(raw, at, recipes: dict[str, Recipe], coreml: CoreMLOptions, *, file) -> tuple[Recipe, ...]:
    """The recipes a model picks (``recipes = ["lut4", ...]``), each checked against its deployment target."""
    if "recipes" not in raw:
        return ()
    names = _str_list(raw["recipes"], file=file, field=f"{at}.recipes", allowed=tuple(recipes))
    if coreml.compression != "none":
        raise ExportError(f"coreml.compression = {coreml.compression!r} compresses inside the conversion; recipes "
                          "compress the float package in their own step: drop coreml.compression (or set it to "
                          "\"none\") and name a recipe in [tool.export.recipes] instead", file=file, field=f"{at}.coreml.compression")
    for j, n in enumerate(names):
        recipes[n].check_target(coreml.minimum_deployment_target, file=file, field=f"{at}.recipes[{j}]")
    return tuple(recipes[n] for n in names)


def _metadata(raw, at, *, file) -> tuple[tuple[str, str], ...]:
    _expect(raw, dict, file=file, field=at, what="a table")
    unknown = sorted(set(raw) - set(METADATA_KEYS))
    if unknown:
        raise ExportError(f"unknown key(s) {unknown}; known: {list(METADATA_KEYS)}", file=file, field=f"{at}.{unknown[0]}")
    return tuple((k, _expect(raw[k], str, file=file, field=f"{at}.{k}", what="a string")) for k in METADATA_KEYS if k in raw)
