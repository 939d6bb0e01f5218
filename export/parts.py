"""A parted model's parts, planned from its checkpoint's safetensors headers. Imports no torch.

A model with ``chunks``, ``max_part_mb``, ``embed_part``, ``head_part`` or ``head_split`` in its config
(export/config.py, ``PartsConfig``) is built as parts: ``embed`` (when ``embed_part``), ``chunk0`` ..
``chunk{N-1}`` (contiguous decoder layers), ``head`` (the final norm and the LM head, when ``head_part``).
Without a part of its own the embeddings go to ``chunk0`` and the head to the last chunk.

Everything here reads only the header of each safetensors file (8 bytes of length, then JSON: each
tensor's dtype, shape and byte range), and ``config.json`` of a model folder:

- ``index(path)``: the checkpoint's tensors (which file, which bytes) and its dimensions, for a
  ``.safetensors`` file (architecture and config in its metadata, or a config.json beside it), a
  transformers folder with ``model.safetensors``, or a sharded one (``model.safetensors.index.json``
  mapping each tensor to its shard, as ``save_pretrained(max_shard_size=...)`` writes it);
- ``plan(model, info)``: the parts, each with its layers and tensors (``max_part_mb`` derives the
  number of chunks: see ``_chunks_for``);
- ``tensor_digests(info, ...)``: an xxh3-128 digest per tensor (its dtype, shape and bytes), kept per
  file digest under the state folder, so that a file is read once per change;
- ``part_digest``: what a part's key covers of the checkpoint: the model config and its own tensors.
  A part does not depend on the bytes of the other parts' tensors, nor on how they are sharded.
"""
from __future__ import annotations

import json
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from .digest import bytes_digest, file_digest
from .errors import ExportError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HEADER_MAX = 100 << 20  # safetensors' own limit on the header's size
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # made fp32 when loaded
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
# transformers model types whose decoder layers chain as export/models/hf_causal_lm.py's parts run them
# (embeddings unscaled, one rotary embedding shared by every layer, a final norm then the head)
PART_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class Layout:
    embed: tuple[str, ...]  # name prefixes of the embeddings' tensors
    layer: str              # pattern of a decoder layer's tensors (group 1: the layer's index)
    head: tuple[str, ...]   # the final norm and the LM head
    head_weight: str        # the LM head's weight (absent when tied to the embeddings)
    embed_weight: str


LAYOUTS = {
    "student": Layout(("embed.",), r"^blocks\.(\d+)\.", ("norm.", "lm_head."), "lm_head.weight", "embed.weight"),
    "hf-causal-lm": Layout(("model.embed_tokens.",), r"^model\.layers\.(\d+)\.", ("model.norm.", "lm_head."),
                           "lm_head.weight", "model.embed_tokens.weight"),
}


@dataclass(frozen=True)
class TensorRef:
    name: str
    file: str                 # the file holding it
    dtype: str                # safetensors dtype (F32, F16, BF16, ...)
    shape: tuple[int, ...]
    start: int                # byte range in ``file`` (absolute)
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelInfo:
    path: Path                          # the checkpoint (a file or a folder)
    architecture: str
    n_layers: int
    hidden: int
    vocab: int
    model_type: str | None              # transformers' model_type (hf-causal-lm)
    config_digest: str                  # the model config's bytes (every part's key holds it)
    tensors: dict[str, TensorRef]
    files: tuple[Path, ...]             # the files the checkpoint consists of
    tied: bool = False                  # the head reuses the embeddings' weight

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.architecture]


@dataclass(frozen=True)
class Part:
    name: str                    # embed | chunk<i> | head
    index: int                   # its place in the chain
    first: int                   # decoder layers [first, end)
    end: int
    embed: bool                  # holds the embeddings (takes input_ids)
    head: bool                   # holds the final norm and the head (gives logits)
    head_split: int | None       # logits in pieces of at most this many rows
    tensors: tuple[str, ...]     # the checkpoint tensors it loads (and its key covers)
    weight_bytes: int            # its weights' size in its package (at the conversion's precision)
    checkpoint_bytes: int        # its tensors' size in the checkpoint (what loading it reads)

    @property
    def layers(self) -> int:
        return self.end - self.first

    def to_json(self) -> dict:
        """What the export step needs and the part's key holds (besides its tensors' digests)."""
        return {"name": self.name, "index": self.index, "first": self.first, "end": self.end, "embed": self.embed,
                "head": self.head, "head_split": self.head_split, "tensors": list(self.tensors)}

    def pieces(self, vocab: int) -> list[tuple[int, int]]:
        """The logits' pieces as vocabulary row ranges (one piece when not split)."""
        rows = self.head_split or vocab
        return [(a, min(a + rows, vocab)) for a in range(0, vocab, rows)]


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, where the data starts) of a safetensors file; a header that lies (offsets
    out of the file, overlapping, a size that disagrees with dtype x shape) is refused naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > HEADER_MAX:
                raise ValueError(f"a header of {n} bytes")
            text = f.read(n)
            if len(text) < n:
                raise ValueError("truncated header")
            size = os.fstat(f.fileno()).st_size
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"not a readable safetensors file: {e}", file=path, field="header") from None
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries = {}
    for name, e in header.items():
        try:
            dtype, shape, (a, b) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            width = DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"tensor {name!r} has no valid dtype, shape and data_offsets", file=path,
                              field=f"header.{name}") from None
        numel = 1
        for d in shape:
            numel *= d
        if not (0 <= a <= b and start + b <= size and b - a == numel * width):
            raise ExportError(f"tensor {name!r}: its byte range {a}..{b} does not hold {dtype} {list(shape)} within the "
                              f"file's {size - start} data bytes", file=path, field=f"header.{name}")
        entries[name] = (dtype, shape, start + a, start + b)
    return entries, meta, start


def _refs(path: Path) -> dict[str, TensorRef]:
    entries, _, _ = read_header(path)
    return {name: TensorRef(name, str(path), d, s, a, b) for name, (d, s, a, b) in entries.items()}


def checkpoint_files(path: Path) -> list[Path]:
    """The files a checkpoint consists of: a file; a folder's config.json and model.safetensors, or its
    config.json, model.safetensors.index.json and every shard the index names."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    index = path / INDEX_FILE
    if index.is_file() and not (path / SINGLE_FILE).exists():
        return [path / "config.json", index, *(path / s for s in _shards(index))]
    return [path / "config.json", path / SINGLE_FILE]


def held_bytes(path: Path | str, tensors=None) -> int | None:
    """The bytes the tensors named ``tensors`` (all, if None) of the safetensors checkpoint at ``path`` take once
    an export has loaded them: a module is always made in fp32 (export/checkpoint.py ``load_part``, ``load``), so
    a bf16 or fp16 checkpoint's floats count 4 bytes per value, twice their size in the file. None for a
    checkpoint that is not safetensors (a pickle's tensors are not known without torch)."""
    path = Path(path)
    try:
        files = checkpoint_files(path)
        shards = [f for f in files if f.name != "config.json" and f.name != INDEX_FILE]
        entries = {}
        for f in shards:
            entries.update(read_header(f)[0])
    except (ExportError, OSError):
        return None
    wanted = entries.keys() if tensors is None else tensors
    total = 0
    for name in wanted:
        if name not in entries:
            return None
        dtype, shape, a, b = entries[name]
        numel = 1
        for d in shape:
            numel *= d
        total += numel * 4 if dtype in FLOAT_DTYPES else b - a
    return total


def files_for(path: Path | str, tensors) -> list[Path]:
    """The files of the checkpoint at ``path`` a reader of ``tensors`` alone needs: of a sharded folder, its
    config.json, its index and the shards that hold them (a program of a part refers to its own tensors only);
    of any other checkpoint, and when the index does not name one of them, every file."""
    path = Path(path)
    files = checkpoint_files(path)
    index = path / INDEX_FILE
    if not path.is_dir() or not index.is_file() or (path / SINGLE_FILE).exists():
        return files
    wmap = _weight_map(index)
    if any(t not in wmap for t in tensors):
        return files
    return [path / "config.json", index, *(path / s for s in sorted({wmap[t] for t in tensors}))]


def _weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
        wmap = data["weight_map"]
        if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ExportError("not a safetensors index (expected {\"weight_map\": {tensor: shard file}})", file=index,
                          field="weight_map") from None
    for name, shard in wmap.items():
        if "/" in shard or "\\" in shard or shard.startswith(".") or not shard.endswith(".safetensors"):
            raise ExportError(f"tensor {name!r}: shard {shard!r} is not a .safetensors file beside the index",
                              file=index, field=f"weight_map.{name}")
    return wmap


def _shards(index: Path) -> list[str]:
    return sorted(set(_weight_map(index).values()))


def index(path: Path | str) -> ModelInfo:
    """The tensors and dimensions of the checkpoint at ``path`` (headers only)."""
    path = Path(path)
    if path.is_dir():
        return _folder(path)
    entries, meta, _ = read_header(path)
    tensors = {name: TensorRef(name, str(path), d, s, a, b) for name, (d, s, a, b) in entries.items()}
    if "architecture" in meta:
        arch, where = meta["architecture"], path
        try:
            config = json.loads(meta.get("config", "{}"))
        except ValueError:
            raise ExportError("not JSON", file=path, field="__metadata__.config") from None
    else:
        side = path.with_name("config.json")
        try:
            sidecar = json.loads(side.read_text())
            arch, config = sidecar["architecture"], sidecar.get("config", {})
        except (OSError, ValueError, KeyError, TypeError):
            raise ExportError("no architecture in the header metadata and no config.json beside the file", file=path,
                              field="__metadata__.architecture") from None
        where = side
    if arch != "student" or not isinstance(config, dict):
        raise ExportError(f"a parted single-file checkpoint must be a student, got {arch!r}", file=where,
                          field="architecture")
    for need in ("n_layers", "d_model", "vocab_size"):
        if not isinstance(config.get(need), int):
            raise ExportError(f"the config has no integer {need}", file=where, field=f"config.{need}")
    c = config
    digest = bytes_digest(json.dumps({"architecture": arch, "config": config}, sort_keys=True).encode())
    return ModelInfo(path, arch, int(c["n_layers"]), int(c["d_model"]), int(c["vocab_size"]), None, digest, tensors,
                     (path,), tied=False)


def _folder(path: Path) -> ModelInfo:
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text())
        if not isinstance(config, dict):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        raise ExportError("not a readable transformers config", file=cfg_file, field="config.json") from None
    files = checkpoint_files(path)
    tensors: dict[str, TensorRef] = {}
    if files[1].name == INDEX_FILE:
        wmap = _weight_map(files[1])
        for shard in sorted(set(wmap.values())):
            for name, ref in _refs(path / shard).items():
                if wmap.get(name) == shard:
                    tensors[name] = ref
        missing = sorted(set(wmap) - set(tensors))
        if missing:
            raise ExportError(f"the index maps {missing[0]!r} to {wmap[missing[0]]!r}, which does not hold it",
                              file=files[1], field=f"weight_map.{missing[0]}")
    else:
        tensors = _refs(files[1])
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    dims = {}
    for need in ("num_hidden_layers", "hidden_size", "vocab_size"):
        v = text.get(need)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ExportError(f"the config has no positive integer {need}", file=cfg_file, field=need)
        dims[need] = v
    layout = LAYOUTS["hf-causal-lm"]
    return ModelInfo(path, "hf-causal-lm", dims["num_hidden_layers"], dims["hidden_size"], dims["vocab_size"],
                     config.get("model_type"), file_digest(cfg_file), tensors, tuple(files),
                     tied=layout.head_weight not in tensors)


def _kind(info: ModelInfo, name: str):
    """("embed" | "head" | "shared" | layer index) of a tensor."""
    lay = info.layout
    m = re.match(lay.layer, name)
    if m:
        return int(m.group(1))
    if name.startswith(lay.embed):
        return "embed"
    if name.startswith(lay.head):
        return "head"
    return "shared"  # a tensor of no known place: every part's key covers it


def _precision_bytes(precision: str) -> int:
    return 2 if precision == "fp16" else 4


def plan(m, info: ModelInfo, *, file, precision: str | None = None) -> list[Part]:
    """The parts of model ``m`` (a config.ModelConfig with ``parts``), in chain order; errors name ``file``
    (pyproject.toml) and the model's field."""
    pc = m.parts
    at = f"tool.export.models[{m.index}]"
    key = next((k for k in ("chunks", "max_part_mb", "embed_part", "head_part", "head_split")
                if getattr(pc, k) not in (None, False)), "chunks")
    if info.architecture != m.architecture:
        raise ExportError(f"the checkpoint holds a {info.architecture!r} model; the config says {m.architecture!r}",
                          file=file, field=f"{at}.architecture")
    if info.architecture == "hf-causal-lm" and info.model_type not in PART_MODEL_TYPES:
        raise ExportError(f"model_type {info.model_type!r} cannot be cut into parts yet (those that can: "
                          f"{list(PART_MODEL_TYPES)})", file=file, field=f"{at}.{key}")
    width = _precision_bytes(precision or m.coreml.compute_precision)
    kinds: dict[object, list[TensorRef]] = {}
    for name, ref in info.tensors.items():
        kinds.setdefault(_kind(info, name), []).append(ref)
    L = info.n_layers
    missing = [i for i in range(L) if i not in kinds]
    if missing:
        raise ExportError(f"the checkpoint has no tensors of decoder layer {missing[0]} (of {L})", file=info.path,
                          field="tensors")
    lay = info.layout
    head_refs = list(kinds.get("head", []))
    if info.tied:  # the head's weight is the embeddings'
        if lay.embed_weight not in info.tensors:
            raise ExportError(f"neither {lay.head_weight} nor {lay.embed_weight}", file=info.path, field="tensors")
        head_refs.append(info.tensors[lay.embed_weight])
    shared = kinds.get("shared", [])

    def size(refs, attr="w"):
        return sum(r.numel * width if attr == "w" else r.end - r.start for r in refs)

    if pc.chunks is not None:
        n = pc.chunks
        if n > L:
            raise ExportError(f"{n} chunks for a model of {L} decoder layers: at most {L}", file=file,
                              field=f"{at}.chunks")
    elif pc.max_part_mb is not None:
        n = _chunks_for(pc, L, kinds, head_refs, size, file=file, field=f"{at}.max_part_mb")
    else:
        n = 1
    bounds, a = [], 0
    for i in range(n):  # as equal as can be, the larger chunks first
        b = a + L // n + (1 if i < L % n else 0)
        bounds.append((a, b))
        a = b
    spans = []
    if pc.embed_part:
        spans.append(("embed", 0, 0, True, False))
    for i, (a, b) in enumerate(bounds):
        spans.append((f"chunk{i}", a, b, i == 0 and not pc.embed_part, i == n - 1 and not pc.head_part))
    if pc.head_part:
        spans.append(("head", L, L, False, True))
    parts = []
    for idx, (name, a, b, emb, head) in enumerate(spans):
        refs = [r for i in range(a, b) for r in kinds[i]]
        if emb:
            refs += kinds.get("embed", [])
        if head:
            refs += [r for r in head_refs if r not in refs]
        refs += shared
        names = tuple(sorted({r.name for r in refs}))
        uniq = {r.name: r for r in refs}.values()
        parts.append(Part(name, idx, a, b, emb, head, pc.head_split if head else None, names, size(uniq),
                          size(uniq, "c")))
    return parts


def _chunks_for(pc, L, kinds, head_refs, size, *, file, field) -> int:
    """``max_part_mb``: the fewest chunks (layers split as evenly as can be) for which every part's weights, at
    the package's precision, fit in ``max_part_mb`` MB; the embeddings and the head count in the first and the
    last chunk unless they are parts of their own."""
    limit = pc.max_part_mb * 2**20
    embed, head = size(kinds.get("embed", [])), size(head_refs)
    for own, what in ((pc.embed_part, ("the embeddings", embed)), (pc.head_part, ("the head", head))):
        if own and what[1] > limit:
            raise ExportError(f"{what[0]} alone take {what[1] / 2**20:.1f} MB, more than max_part_mb", file=file,
                              field=field)
    per_layer = [size(kinds[i]) for i in range(L)]
    for n in range(1, L + 1):
        a, ok = 0, True
        for i in range(n):
            b = a + L // n + (1 if i < L % n else 0)
            s = sum(per_layer[a:b]) + (embed if i == 0 and not pc.embed_part else 0) \
                + (head if i == n - 1 and not pc.head_part else 0)
            ok = ok and s <= limit
            a = b
        if ok:
            return n
    raise ExportError(f"no split fits: one decoder layer and the embeddings or head beside it take more than "
                      f"{pc.max_part_mb:g} MB (set embed_part / head_part, or a larger max_part_mb)", file=file,
                      field=field)


# --- digests -----------------------------------------------------------------


def _digest_file(path: str, refs: list[TensorRef]) -> dict[str, str]:
    out = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            for r in refs:
                h = xxhash.xxh3_128()
                h.update(json.dumps([r.dtype, list(r.shape)]).encode())
                for a in range(r.start, r.end, 1 << 24):
                    h.update(view[a:min(r.end, a + (1 << 24))])
                out[r.name] = h.hexdigest()
        finally:
            if size:
                view.close()
    return out


def tensor_digests(info: ModelInfo, state: Path | None = None, digest=file_digest) -> dict[str, str]:
    """A digest per tensor (dtype, shape, bytes), computed once per file content: kept in
    ``<state>/tensor-digests/<file digest>.json`` (``digest``: the build's file digest by stat)."""
    by_file: dict[str, list[TensorRef]] = {}
    for r in info.tensors.values():
        by_file.setdefault(r.file, []).append(r)
    out = {}
    for path, refs in sorted(by_file.items()):
        kept = None
        if state is not None:
            kept = Path(state) / "tensor-digests" / f"{digest(path)}.json"
            try:
                got = json.loads(kept.read_text())
                if all(r.name in got for r in refs):
                    out.update({r.name: got[r.name] for r in refs})
                    continue
            except (OSError, ValueError):
                pass
        got = _digest_file(path, refs)
        out.update(got)
        if kept is not None:
            try:
                kept.parent.mkdir(parents=True, exist_ok=True)
                tmp = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(got, sort_keys=True))
                os.replace(tmp, kept)
            except OSError:
                pass  # a read-only state folder: computed again next time
    return out


def part_digest(info: ModelInfo, part: Part, digests: dict[str, str]) -> str:
    """What the part's bytes depend on in the checkpoint: the model config and its own tensors (by content,
    whatever file or shard holds them)."""
    return bytes_digest(json.dumps({"config": info.config_digest, "part": part.to_json(),
                                    "tensors": {n: digests[n] for n in part.tensors}}, sort_keys=True).encode())
