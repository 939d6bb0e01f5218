"""ExportedPrograms whose weights stay in their checkpoint: one copy of the weights on disk.

Every (mode, T) program of a model holds the same weights; saved whole, each ``.pt2`` is a full
copy of them (16 GB for the 8 leaves of a 0.5B model in fp32). The build instead saves each
program with every weight that *is* a checkpoint tensor (bit for bit, after the export's dtype
cast) left out: the archive holds, in its place, a zero broadcast to the weight's shape (all
strides 0: one element per dtype in the archive's weights, the shape in its weights config, and
``torch.export.load`` allocates nothing the weight's size), and export/weight_refs.py's ``REFS_FILE`` lists, per
weight, the checkpoint tensor, its dtype and shape, and the digest of its bytes. Loading puts the
checkpoint's tensors back, each checked against its digest; a weight that is not a checkpoint
tensor (a buffer the model computes) stays in the archive.

The digests are in the ``.pt2``'s bytes, so the steps that read the program (convert, verify,
compress) are keyed by the weights they read: an artifact is never stale, and a checkpoint that
no longer holds those tensors is an error naming the tensor, never a silent mix.

The seed's CLI (``python -m export.export_pytorch``) still writes self-contained files.
"""
from __future__ import annotations

import copy
import io
import json
from collections import defaultdict
from pathlib import Path

import torch
import xxhash

from .errors import ExportError
from .weight_refs import REFS_FILE, VERSION

MAX_CANDIDATES = 4  # checkpoint tensors of the right shape hashed per weight, best name match first


def tensor_digest(t: torch.Tensor) -> str:
    """xxh3-128 of a tensor's bytes (C order)."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return xxhash.xxh3_128_hexdigest(b"")
    return xxhash.xxh3_128_hexdigest(t.reshape(-1).view(torch.uint8).numpy())


class TensorSource:
    """The tensors of a checkpoint by name, read one at a time: a ``.safetensors`` file or a model folder
    (memory-mapped; a sharded folder through its ``model.safetensors.index.json``), or a ``.pt``
    checkpoint (``torch.load(weights_only=True, mmap=True)``)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._st: dict[str, object] = {}    # safetensors file -> open handle
        self._where: dict[str, Path] = {}   # tensor name -> safetensors file
        self._pt: dict | None = None
        try:
            if self.path.is_dir():
                index = self.path / "model.safetensors.index.json"
                if index.is_file():
                    for name, shard in json.loads(index.read_text())["weight_map"].items():
                        self._where[name] = self.path / shard
                else:
                    self._index(self.path / "model.safetensors")
            elif self.path.suffix == ".safetensors":
                self._index(self.path)
            else:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                state = obj.get("state_dict") if isinstance(obj, dict) else None
                if not isinstance(state, dict):
                    raise ValueError("no state_dict")
                self._pt = state
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - torch and safetensors raise many types for a bad file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ExportError(f"cannot read the weights the program refers to: {first}", file=self.path,
                              field="weights") from None

    def _handle(self, file: Path):
        if file not in self._st:
            from safetensors import safe_open

            self._st[file] = safe_open(str(file), framework="pt")
        return self._st[file]

    def _index(self, file: Path) -> None:
        for name in self._handle(file).keys():
            self._where[name] = file

    def names(self) -> list[str]:
        return sorted(self._pt) if self._pt is not None else sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pt is not None:
            return tuple(self._pt[name].shape)
        return tuple(self._handle(self._where[name]).get_slice(name).get_shape())

    def has(self, name: str) -> bool:
        return name in (self._pt if self._pt is not None else self._where)

    def get(self, name: str, rows: tuple[int, int] | list[int] | None = None) -> torch.Tensor:
        """The tensor ``name``, or only its rows [a, b) (a piece of a split head: only those rows are read)."""
        try:
            if self._pt is not None:
                t = self._pt[name]
                return t[rows[0]:rows[1]] if rows else t
            if rows:
                return self._handle(self._where[name]).get_slice(name)[rows[0]:rows[1]]
            return self._handle(self._where[name]).get_tensor(name)
        except KeyError:
            raise ExportError(f"the checkpoint has no tensor {name!r}, which the program refers to", file=self.path,
                              field=f"state_dict.{name}") from None


def _common_suffix(a: str, b: str) -> int:
    """How many trailing dotted components two names share."""
    n = 0
    for x, y in zip(reversed(a.split(".")), reversed(b.split("."))):
        if x != y:
            break
        n += 1
    return n


def _plain(t) -> bool:
    return isinstance(t, torch.Tensor) and type(t.data) is torch.Tensor and t.layout == torch.strided and t.numel() > 0


def _hint(fqn: str, hints: dict) -> tuple[str, tuple[int, int] | None] | None:
    """The hint of a program weight: the hint keyed by its name with the fewest leading components dropped
    (a part's program names ``model.<key>`` the weight its module names ``<key>``)."""
    pieces = fqn.split(".")
    for i in range(len(pieces)):
        hit = hints.get(".".join(pieces[i:]))
        if hit is not None:
            return hit
    return None


def references(state: dict, source: TensorSource, hints: dict | None = None) -> dict[str, dict]:
    """For each weight of ``state`` (a program's state_dict) equal bit for bit to a checkpoint tensor cast
    to its dtype: ``{fqn: {tensor, dtype, shape, nbytes, digest}}`` (and ``rows`` [a, b) when the weight is
    those rows of the tensor). ``hints``: ``{module key: (checkpoint tensor, rows or None)}`` of the module
    the program was exported from (a part's ``sources()``), tried first. Other candidates are the checkpoint's
    tensors of the same shape, the best match of their names first, at most MAX_CANDIDATES hashed per weight."""
    by_shape: dict[tuple, list[str]] = defaultdict(list)
    for name in source.names():
        by_shape[source.shape(name)].append(name)
    digests: dict[tuple, str] = {}  # (checkpoint name, dtype, rows) -> digest
    refs = {}
    for fqn, t in state.items():
        if not _plain(t):
            continue
        want = tensor_digest(t)
        hint = _hint(fqn, hints) if hints else None
        tried = [(hint[0], tuple(hint[1]) if hint[1] else None)] if hint and source.has(hint[0]) else []
        candidates = sorted(by_shape.get(tuple(t.shape), ()), key=lambda n: (-_common_suffix(fqn, n), n))
        tried += [(name, None) for name in candidates[:MAX_CANDIDATES] if (name, None) not in tried]
        for name, rows in tried:
            key = (name, t.dtype, rows)
            if key not in digests:
                piece = source.get(name, rows)
                digests[key] = tensor_digest(piece.to(t.dtype)) if tuple(piece.shape) == tuple(t.shape) else ""
            if digests[key] == want:
                refs[fqn] = {"tensor": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                             "nbytes": t.numel() * t.element_size(), "digest": want,
                             **({"rows": list(rows)} if rows else {})}
                break
    return refs


def save(ep, weights: Path | str | None, hints: dict | None = None) -> tuple[bytes, int]:
    """``ep`` saved as PT2 archive bytes: self-contained when ``weights`` is None, else with every weight
    that is a tensor of the checkpoint at ``weights`` (or rows of one) left out and referred to. Returns
    (bytes, the bytes of the weights left out). ``ep`` itself is not changed. ``hints``: see ``references``."""
    buf = io.BytesIO()
    refs = references(ep.state_dict, TensorSource(weights), hints) if weights is not None else {}
    if not refs:
        torch.export.save(ep, buf)
        return buf.getvalue(), 0
    zeros: dict[torch.dtype, torch.Tensor] = {}

    def placeholder(t):
        # a zero broadcast to the weight's shape (all strides 0): the archive stores one element per dtype,
        # and loading it allocates nothing the size of the weight
        z = zeros.setdefault(t.dtype, torch.zeros(1, dtype=t.dtype))
        f = z.reshape([1] * t.dim()).expand(t.shape) if t.dim() else z.reshape(())
        return torch.nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else f

    light = copy.copy(ep)
    light._state_dict = {k: placeholder(v) if k in refs else v for k, v in ep.state_dict.items()}
    body = {"version": VERSION, "tensors": refs}
    torch.export.save(light, buf, extra_files={REFS_FILE: json.dumps(body, indent=1, sort_keys=True)})
    external = sum({_ref_key(r): r["nbytes"] for r in refs.values()}.values())
    return buf.getvalue(), external


def _ref_key(r: dict) -> tuple:
    """One tensor read from the checkpoint: its name, the dtype it takes and its rows (None: all)."""
    return r["tensor"], r["dtype"], tuple(r["rows"]) if r.get("rows") else None


def load(path: Path | str, weights: Path | str | None = None):
    """``torch.export.load(path)``, with the weights the archive refers to read from the checkpoint at
    ``weights`` (each checked against its digest). An archive that refers to weights needs ``weights``."""
    path = Path(path)
    extra = {REFS_FILE: ""}
    ep = torch.export.load(str(path), extra_files=extra)
    if not extra[REFS_FILE]:
        return ep
    try:
        body = json.loads(extra[REFS_FILE])
        refs = body["tensors"]
        if body.get("version") != VERSION or not isinstance(refs, dict):
            raise ValueError(f"version {body.get('version')!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"unreadable list of the weights it refers to ({e})", file=path, field=REFS_FILE) from None
    if weights is None:
        raise ExportError(f"the program keeps its {len(refs)} weight tensors in the model's checkpoint: pass the "
                          "checkpoint it was exported from (--weights)", file=path, field="weights")
    source = TensorSource(weights)
    loaded: dict[tuple, torch.Tensor] = {}
    state = ep.state_dict
    for fqn, r in sorted(refs.items()):
        key = _ref_key(r)
        if key not in loaded:
            t = source.get(r["tensor"], r.get("rows")).to(getattr(torch, r["dtype"])).contiguous()
            if list(t.shape) != list(r["shape"]) or tensor_digest(t) != r["digest"]:
                raise ExportError(f"tensor {r['tensor']!r} is not the one {path.name} was exported with (its digest "
                                  f"or shape differs): re-export from this checkpoint", file=weights,
                                  field=f"state_dict.{r['tensor']}")
            loaded[key] = t
        if fqn not in state:
            raise ExportError(f"refers to a weight {fqn!r} the program does not have", file=path, field=REFS_FILE)
        old = state[fqn]
        new = loaded[key]
        state[fqn] = torch.nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else new
    return ep
