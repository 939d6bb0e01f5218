"""Checkpoints: one file holds the architecture name, its config and the weights,
or a transformers model folder.

Three formats, all loaded without executing code:
- ``.pt``: a ``torch.save`` of ``{"format", "version", "architecture", "config",
  "state_dict"}``, read with ``torch.load(weights_only=True)``;
- ``.safetensors``: the weights, with ``architecture`` and ``config`` (JSON) in the
  header's ``__metadata__``; a ``config.json`` beside the file holding
  ``{"architecture": ..., "config": {...}}`` is read when the header has none;
- a folder as transformers writes it (``save_pretrained``): ``config.json`` (a
  transformers config) + ``model.safetensors``; architecture ``hf-causal-lm``.
  Read offline (``local_files_only``), safetensors only, ``trust_remote_code=False``.

Demo checkpoints are made from a fixed seed: the same bytes every time.
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from . import atomic
from .checkpoint_files import FOLDER_FILES, input_files
from .parts import INDEX_FILE
from .errors import ExportError, cli_errors
from .models.registry import get
from .models.common import config_from_dict

FORMAT = "model-export-checkpoint"
VERSION = 1

DEMO_CONFIGS = {
    "student": dict(vocab_size=1024, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=256, max_positions=4096),
    "judge": dict(vocab_size=1024, d_model=96, n_layers=2, n_heads=4, ffn_hidden=192, max_positions=4096),
}
DEMO_SEED = 20261126
FOLDER_ARCHITECTURE = "hf-causal-lm"  # what a model folder holds


class Loaded:
    """A checkpoint read and checked: its architecture entry, config and weights."""

    def __init__(self, path: Path, arch, config, state_dict):
        self.path, self.arch, self.config, self.state_dict = path, arch, config, state_dict

    def model(self) -> torch.nn.Module:
        """The model with these weights, in eval mode."""
        with torch.device("meta"):
            model = self.arch.build(self.config)
        model = model.to_empty(device="cpu")
        expected = model.state_dict()
        missing = sorted(set(expected) - set(self.state_dict))
        unexpected = sorted(set(self.state_dict) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {_few(missing)}")
            if unexpected:
                parts.append(f"unexpected {_few(unexpected)}")
            raise ExportError("weights do not match the architecture: " + "; ".join(parts), file=self.path, field="state_dict")
        for name, t in self.state_dict.items():
            if tuple(t.shape) != tuple(expected[name].shape):
                raise ExportError(
                    f"shape {tuple(t.shape)} does not match the config's {tuple(expected[name].shape)}",
                    file=self.path, field=f"state_dict.{name}",
                )
        model.load_state_dict(self.state_dict, strict=True, assign=True)
        return model.float().eval()


class FolderLoaded(Loaded):
    """A transformers model folder: ``config`` is its transformers config; ``state_dict``
    is read from ``model.safetensors`` on first use; ``model()`` loads through transformers."""

    def __init__(self, path: Path, arch, config):
        self.path, self.arch, self.config, self._state = path, arch, config, None

    @property
    def state_dict(self) -> dict:
        if self._state is None:
            self._state = {}
            for f in input_files(self.path):  # model.safetensors, or every shard of the index
                if f.suffix == ".safetensors":
                    self._state.update(_read_safetensors_state(f))
        return self._state

    def model(self) -> torch.nn.Module:
        try:
            return self.arch.load_model(self.path)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - transformers raises many types for bad weights
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ExportError(f"transformers could not load the weights: {type(e).__name__}: {first}",
                              file=self.path / "model.safetensors", field="state_dict") from None


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _read_pt(path: Path) -> dict:
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all, on one line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        if not _looks_like_pickle(path):  # random bytes also fail the weights-only unpickler: say corrupt
            raise ExportError("not a readable checkpoint (corrupt: neither a torch.save archive nor a pickle)",
                              file=path, field="file") from None
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "unsupported object")
        raise ExportError(
            f"refused: the file asks to run code or build objects on load, which is never done ({reason[:160]})",
            file=path, field="pickle",
        ) from None
    except Exception as e:  # noqa: BLE001 - any other parse failure (RuntimeError, EOFError, KeyError, ...) is corruption
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"not a readable checkpoint (corrupt or truncated): {type(e).__name__}: {first[:160]}", file=path, field="file") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ExportError(f"not a model-export checkpoint (expected a dict with format={FORMAT!r})", file=path, field="format")
    if obj.get("version") != VERSION:
        raise ExportError(f"unsupported checkpoint version {obj.get('version')!r}; this tool reads {VERSION}", file=path, field="version")
    return obj


def _looks_like_pickle(path: Path) -> bool:
    """A torch.save zip archive, or a raw pickle stream (protocol 2+ starts with PROTO, 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"not a readable safetensors file (corrupt, truncated or a lying header): {str(e)[:160]}", file=path, field="header") from None
    if "architecture" in meta:
        try:
            config = json.loads(meta.get("config", "{}"))
        except json.JSONDecodeError as e:
            raise ExportError(f"not JSON: {e}", file=path, field="__metadata__.config") from None
        return {"architecture": meta["architecture"], "config": config, "state_dict": state}
    side = path.with_name("config.json")
    if not side.exists():
        raise ExportError("no architecture in the header metadata and no config.json beside the file", file=path, field="__metadata__.architecture")
    try:
        sidecar = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"not JSON: {e}", file=side, field="config.json") from None
    if not isinstance(sidecar, dict):
        raise ExportError("expected an object with architecture and config", file=side, field="config.json")
    return {"architecture": sidecar.get("architecture"), "config": sidecar.get("config", {}), "state_dict": state}


def _read_safetensors_state(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"not a readable safetensors file (corrupt, truncated or a lying header): {str(e)[:160]}", file=path, field="header") from None


def _load_folder(path: Path) -> FolderLoaded:
    """A transformers model folder: config.json + model.safetensors, or + model.safetensors.index.json and its
    shards (no pickles, no remote code)."""
    has_index = (path / INDEX_FILE).is_file()
    for name in ("config.json",) if has_index else FOLDER_FILES:
        if not (path / name).is_file():
            raise ExportError(f"a model folder needs {' and '.join(FOLDER_FILES)} (or {INDEX_FILE} and its shards); "
                              f"{name} is missing", file=path / name, field="checkpoint")
    from safetensors import SafetensorError, safe_open

    for f in input_files(path):
        if f.suffix != ".safetensors":
            continue
        if not f.is_file():
            raise ExportError("the index names this shard, which is missing", file=f, field="checkpoint")
        try:  # the header only: a lying or truncated file is refused before transformers sees it
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise ExportError(f"not a readable safetensors file (corrupt, truncated or a lying header): {str(e)[:160]}",
                              file=f, field="header") from None
    arch = get(FOLDER_ARCHITECTURE, file=path, field="architecture")
    return FolderLoaded(path, arch, arch.load_config(path))


def part_sources(module, info) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """Each weight of a part's module: the checkpoint tensor it is (export/parts.py ``ModelInfo``: a tied
    head is the embeddings' weight) and its rows, for a piece of a split head (None: the whole tensor)."""
    lay, out = info.layout, {}
    for key, (name, rows) in module.sources().items():
        if name not in info.tensors and name == lay.head_weight and info.tied:
            name = lay.embed_weight  # tied: the head is the embeddings' weight
        out[key] = (name, rows)
    return out


def load_part(path: Path | str, part: dict):
    """(architecture, config, module) of one part of a parted model (export/parts.py): the part's modules are
    made on the meta device and take the part's tensors, read one by one from the memory-mapped safetensors
    files (a split head's pieces as row slices); no other part's weights are read or made."""
    from safetensors import SafetensorError, safe_open

    from . import parts as parts_mod
    from .models.decoder_lm import PartSpec

    path = Path(path)
    info = parts_mod.index(path)
    arch = get(info.architecture, file=path, field="architecture")
    if path.is_dir():
        config = arch.load_config(path)
    else:
        _, meta, _ = parts_mod.read_header(path)
        raw = json.loads(meta["config"]) if "config" in meta else json.loads(path.with_name("config.json").read_text())["config"]
        config = config_from_dict(arch.config_cls, raw, file=path, field="config")
    spec = PartSpec.from_json(part)
    with torch.device("meta"):
        module = arch.build_part(config, spec)
    by_file: dict[str, list] = {}
    for key, (name, rows) in part_sources(module, info).items():
        ref = info.tensors.get(name)
        if ref is None:
            raise ExportError(f"part {spec.name} needs tensor {name!r}, which the checkpoint lacks", file=path,
                              field=f"tensors.{name}")
        by_file.setdefault(ref.file, []).append((key, name, rows))
    state = {}
    try:
        for file, wanted in sorted(by_file.items()):
            with safe_open(file, framework="pt") as f:
                for key, name, rows in wanted:
                    state[key] = f.get_slice(name)[rows[0]:rows[1]] if rows else f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"not a readable safetensors file: {str(e)[:160]}", file=path, field="header") from None
    expected = module.state_dict()
    for key, t in state.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ExportError(f"shape {tuple(t.shape)} does not match the config's {tuple(expected[key].shape)}",
                              file=path, field=f"state_dict.{key}")
    module.load_state_dict(state, strict=True, assign=True)
    module.finish()
    return arch, config, module.float().eval()


def load(path: Path | str) -> Loaded:
    """Read and check a checkpoint (a file, or a transformers model folder). Never executes code from it."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise ExportError("no such checkpoint file", file=path, field="checkpoint")
    if path.stat().st_size == 0:
        raise ExportError("empty file (zero bytes)", file=path, field="file")
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pt(path)
    arch = get(obj.get("architecture"), file=path, field="architecture")
    if arch.config_cls is None:
        raise ExportError(f"architecture {arch.name!r} loads from a model folder ({' + '.join(FOLDER_FILES)}), not a single file",
                          file=path, field="architecture")
    config = config_from_dict(arch.config_cls, obj.get("config"), file=path, field="config")
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError("expected a mapping of names to tensors", file=path, field="state_dict")
    return Loaded(path, arch, config, state)


def to_bytes(architecture: str, config, state_dict: dict) -> bytes:
    buf = io.BytesIO()
    payload = {
        "format": FORMAT, "version": VERSION, "architecture": architecture,
        "config": asdict(config), "state_dict": {k: v.detach().contiguous() for k, v in state_dict.items()},
    }
    torch.save(payload, buf)
    return buf.getvalue()


def save(path: Path | str, architecture: str, config, state_dict: dict) -> None:
    """Write a checkpoint atomically, as ``.pt`` or ``.safetensors`` by its suffix."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        meta = {"architecture": architecture, "config": json.dumps(asdict(config), sort_keys=True)}
        data = save({k: v.detach().contiguous() for k, v in state_dict.items()}, metadata=meta)
        atomic.write_bytes(path, _canonical_safetensors(data))
    else:
        atomic.write_bytes(path, to_bytes(architecture, config, state_dict))


def _canonical_safetensors(data: bytes) -> bytes:
    """Byte-stable safetensors: the writer emits ``__metadata__`` in hash-map order, which
    varies between calls. Re-emit the JSON header with sorted metadata keys (tensor entries
    keep their order and offsets; the data section is untouched)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned, as the writer does
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def demo_model(architecture: str, overrides: dict | None = None):
    """(config, model) of the deterministic demo ``architecture``."""
    arch = get(architecture)
    config = config_from_dict(arch.config_cls, {**DEMO_CONFIGS[architecture], **(overrides or {})}, field="demo config")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = arch.build(config)
    return config, model


def make_demo(path: Path | str, architecture: str, overrides: dict | None = None) -> Path:
    """Write the demo checkpoint of ``architecture`` (same bytes every time)."""
    config, model = demo_model(architecture, overrides)
    save(path, architecture, config, model.state_dict())
    return Path(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m export.checkpoint", description="Make a deterministic demo checkpoint, or describe one.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="write a demo checkpoint")
    d.add_argument("architecture", choices=sorted(DEMO_CONFIGS))
    d.add_argument("--out", required=True, type=Path, help=".pt or .safetensors")
    s = sub.add_parser("show", help="print a checkpoint's architecture and config")
    s.add_argument("checkpoint", type=Path)
    args = p.parse_args(argv)
    with cli_errors():
        if args.cmd == "demo":
            make_demo(args.out, args.architecture)
            print(args.out)
        else:
            ck = load(args.checkpoint)
            ck.model()
            n = sum(t.numel() for t in ck.state_dict.values())
            config = ck.config.to_diff_dict() if hasattr(ck.config, "to_diff_dict") else asdict(ck.config)
            print(json.dumps({"architecture": ck.arch.name, "config": config, "parameters": n}, indent=2, default=str))


if __name__ == "__main__":
    main()
