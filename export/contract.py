"""Contracts: what an exported (or converted) artifact takes and gives.

Schema ``model-export/contract``, version ``SCHEMA_VERSION`` (see
``CONTRACT_SCHEMA`` below, and the README's "Contract" section). One contract
per (mode, T) sits beside the exported files as ``<mode>_T<n>.contract.json``;
an aggregate ``contract.json`` lists them all under ``functions``.

Fields of a per-(mode, T) contract:
- ``schema``, ``schema_version``: identify this format; a newer version is refused.
- ``model``, ``architecture``, ``mode``, ``T``, ``dtype``. A per-(mode, T) contract
  names no other T: adding a T to the shape set leaves every other contract's
  bytes (and so its build) alone. The aggregate lists ``enumerated_T`` per mode.
- ``inputs``, ``outputs``, ``states``: lists of ``{name, shape, dtype}``.
- ``kv_cache`` (optional): ``explicit`` (caches are inputs/outputs) or ``state``
  (caches are ``states``, buffers the program updates in place).
- ``exports``: format (``torchscript`` | ``exported_program``) -> ``{file, digest}``
  with the file name relative to the contract's folder and its xxh3-128 digest.
- ``checkpoint``: ``{digest}`` of the checkpoint the export came from.
- ``toolchain``: python, torch, coremltools, numpy, ... versions.
- ``part`` (a parted model's part only): ``{name, index, layers: [first, end], embed, head, logits}``:
  which part of the chain this is, the decoder layers it runs (its K/V tensors hold exactly these, in
  order), whether it takes ``input_ids`` (else ``hidden_in``) and gives logits (else ``hidden_out``),
  and the vocabulary rows of each logits piece (``[[name, first_row, end_row], ...]``; a split head
  gives ``logits_0`` .. ``logits_k``, concatenated by the app on the last axis).
  ``checkpoint.digest`` is then the part's own digest: the model config and the part's tensors.

The model's ``contract.json`` of a parted model (``chain_contract``) lists the parts in chain order:
each part's bundle, its layers, and what feeds what (``hidden_out`` of one part is ``hidden_in`` of the
next; the first takes ``input_ids`` and ``position_ids``, every chunk takes ``position_ids`` too).
"""
from __future__ import annotations

import json
from pathlib import Path

from . import atomic
from .errors import ExportError

SCHEMA = "model-export/contract"
SCHEMA_VERSION = 1
FORMATS = {"torchscript": ".pt", "exported_program": ".pt2"}  # export format -> file suffix
KV_CACHE_STYLES = ("explicit", "state")  # caches as inputs and outputs, or as Core ML states
DTYPES = ("int32", "float16", "float32")

_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "dtype"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1, "maxItems": 5},
        "dtype": {"enum": list(DTYPES)},
    },
}
_DIGEST = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
_T = {"type": "integer", "minimum": 1}
_ENTRY_PROPS = {
    "mode": {"type": "string"},
    "T": _T,
    "dtype": {"enum": ["float16", "float32"]},
    "inputs": {"type": "array", "items": _TENSOR, "minItems": 1},
    "outputs": {"type": "array", "items": _TENSOR, "minItems": 1},
    "states": {"type": "array", "items": _TENSOR},
    "kv_cache": {"enum": list(KV_CACHE_STYLES)},
    "exports": {
        "type": "object",
        "propertyNames": {"enum": list(FORMATS)},
        "additionalProperties": {
            "type": "object", "required": ["file", "digest"], "additionalProperties": False,
            "properties": {"file": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+$"}, "digest": _DIGEST},
        },
    },
}
_PART = {
    "type": "object",
    "required": ["name", "index", "layers", "embed", "head", "logits", "vocab_size"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^(embed|head|chunk[0-9]+)$"},
        "index": {"type": "integer", "minimum": 0},
        "layers": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2, "maxItems": 2},
        "embed": {"type": "boolean"},
        "head": {"type": "boolean"},
        "logits": {"type": "array", "items": {"type": "array", "minItems": 3, "maxItems": 3}},
        "vocab_size": {"type": "integer", "minimum": 1},
    },
}
_ENTRY_PROPS["part"] = _PART
CONTRACT_SCHEMA = {
    "type": "object",
    "required": ["schema", "schema_version", "model", "architecture", "mode", "T", "dtype",
                 "inputs", "outputs", "states", "exports", "checkpoint", "toolchain"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA},
        "schema_version": {"const": SCHEMA_VERSION},
        "model": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"},
        "architecture": {"type": "string"},
        "checkpoint": {"type": "object", "required": ["digest"], "properties": {"digest": _DIGEST}},
        "toolchain": {"type": "object", "additionalProperties": {"type": "string"}},
        **_ENTRY_PROPS,
    },
}
# What a model's aggregate contract (one part's, or an unparted model's) and its chain contract share.
_MODEL_HEAD = {
    "schema": {"const": SCHEMA},
    "schema_version": {"const": SCHEMA_VERSION},
    "model": {"type": "string"},
    "architecture": {"type": "string"},
    "enumerated_T": {"type": "object", "additionalProperties": {"type": "array", "items": _T}},
}
_SHIPPED_FILES = {"type": "object", "additionalProperties": {  # files shipped beside the bundle (a tokenizer)
    "type": "object", "required": ["file", "digest"], "additionalProperties": False,
    "properties": {"file": {"type": "string"}, "digest": {"type": "string"}}}}
AGGREGATE_SCHEMA = {
    "type": "object",
    "required": ["schema", "schema_version", "model", "architecture", "enumerated_T", "functions"],
    "properties": {
        **_MODEL_HEAD,
        "functions": {"type": "object", "additionalProperties": CONTRACT_SCHEMA},
        "part": _PART,
        "files": _SHIPPED_FILES,
    },
}


CHAIN_SCHEMA = {
    "type": "object",
    "required": ["schema", "schema_version", "model", "architecture", "enumerated_T", "chain"],
    "additionalProperties": False,
    "properties": {
        **_MODEL_HEAD,
        "chain": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["part", "bundle", "contract", "layers", "modes", "feeds", "kv_layers"],
            "additionalProperties": False,
            "properties": {
                "part": {"type": "string"}, "bundle": {"type": "string"}, "contract": {"type": "string"},
                "layers": {"type": "array", "items": {"type": "integer"}},
                "modes": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["inputs", "outputs", "states"],
                    "additionalProperties": {"type": "array", "items": {"type": "string"}}}},
                "feeds": {"type": ["string", "null"]},
                "kv_layers": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}},
                "logits": {"type": "array"},
            }}},
        "files": _SHIPPED_FILES,
    },
}


KV_NAMES = ("k_cache", "v_cache", "k_new", "v_new")  # a chunk's K/V tensors: its layers [first, end) only


def part_entry(part: dict, vocab: int) -> dict:
    """A contract's ``part`` from export/parts.py's ``Part.to_json()``."""
    rows = part.get("head_split") or vocab
    pieces = [(a, min(a + rows, vocab)) for a in range(0, vocab, rows)] if part["head"] else []
    names = ["logits"] if len(pieces) == 1 and not part.get("head_split") else [f"logits_{i}" for i in range(len(pieces))]
    return {"name": part["name"], "index": part["index"], "layers": [part["first"], part["end"]],
            "embed": part["embed"], "head": part["head"], "logits": [[n, a, b] for n, (a, b) in zip(names, pieces)],
            "vocab_size": vocab}


def chain_contract(model: str, architecture: str, parts: list[tuple[dict, str, str]]) -> dict:
    """The model's contract.json of a parted model: ``parts`` = (the part's aggregate contract, its bundle's and
    its contract's file names relative to the model folder), in chain order."""
    chain = []
    for i, (agg, bundle, cfile) in enumerate(parts):
        p = agg["part"]
        nxt = parts[i + 1][0]["part"]["name"] if i + 1 < len(parts) else None
        modes = {}
        for f in agg["functions"].values():  # names per mode (shapes per T are in the part's contract)
            modes.setdefault(f["mode"], {k: [t["name"] for t in f[k]] for k in ("inputs", "outputs", "states")})
        kv = sorted({n for m in modes.values() for k in m.values() for n in k if n in KV_NAMES})
        chain.append({"part": p["name"], "bundle": bundle, "contract": cfile, "layers": p["layers"], "modes": modes,
                      "feeds": nxt, "kv_layers": {n: p["layers"] for n in kv}, "logits": p["logits"]})
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "model": model, "architecture": architecture,
            "enumerated_T": parts[0][0]["enumerated_T"], "chain": chain}


def entry_name(mode: str, T: int) -> str:
    """The stem of every file of one (mode, T): ``prefill_T2048``; also its bundle function name."""
    return f"{mode}_T{T}"


def _field(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def validate(data: object, *, file: object, aggregate: bool = False, chain: bool = False) -> dict:
    """Check ``data`` against the schema; raise ExportError naming the file and the field."""
    if isinstance(data, dict):
        if data.get("schema") not in (None, SCHEMA):
            raise ExportError(f"not a contract (schema {data.get('schema')!r}, expected {SCHEMA!r})", file=file, field="schema")
        v = data.get("schema_version")
        if isinstance(v, int) and not isinstance(v, bool) and v > SCHEMA_VERSION:
            raise ExportError(f"schema version {v} is newer than this tool reads ({SCHEMA_VERSION}); upgrade model-export", file=file, field="schema_version")
    schema = CHAIN_SCHEMA if chain else AGGREGATE_SCHEMA if aggregate else CONTRACT_SCHEMA
    import jsonschema  # here, not at the top: the task graph imports this module and never validates

    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(data))
    if err is not None:
        raise ExportError(err.message[:300], file=file, field=_field(err.absolute_path))
    if not aggregate and not chain:
        _check_entry(data, file)
    return data


def _check_entry(c: dict, file) -> None:
    for kind in ("inputs", "outputs", "states"):
        names = [t["name"] for t in c[kind]]
        if len(set(names)) != len(names):
            raise ExportError(f"duplicate names {names}", file=file, field=kind)
    if bool(c["states"]) != (c.get("kv_cache", "explicit") == "state"):
        raise ExportError(f"kv_cache {c.get('kv_cache', 'explicit')!r} does not agree with states {[t['name'] for t in c['states']]}", file=file, field="kv_cache")


def read(path: Path | str, *, aggregate: bool = False) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ExportError("no such contract file", file=path, field="contract") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"cannot read: {e}", file=path, field="contract") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f"not JSON ({e.msg} at line {e.lineno})", file=path, field="contract") from None
    return validate(data, file=path, aggregate=aggregate)


def dumps(data: dict) -> str:
    """Canonical JSON: sorted keys, fixed indentation, trailing newline (byte-stable)."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write(path: Path | str, data: dict, *, aggregate: bool = False, chain: bool = False) -> None:
    validate(data, file=path, aggregate=aggregate, chain=chain)
    atomic.write_text(path, dumps(data))


def aggregate(contracts: list[dict]) -> dict:
    """The aggregate contract of one model: every (mode, T) entry under ``functions``."""
    if not contracts:
        raise ExportError("no per-(mode, T) contracts to aggregate", field="functions")
    first = contracts[0]
    modes: dict[str, list[int]] = {}
    for c in contracts:
        modes.setdefault(c["mode"], []).append(c["T"])
    agg = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "model": first["model"], "architecture": first["architecture"],
        "enumerated_T": {m: sorted(ts) for m, ts in modes.items()},
        "functions": {entry_name(c["mode"], c["T"]): c for c in contracts},
    }
    if "part" in first:  # one part's bundle: every function is that part
        if any(c.get("part") != first["part"] for c in contracts):
            raise ExportError("the contracts are of different parts", field="functions")
        agg["part"] = first["part"]
    return agg
