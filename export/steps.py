"""The heavy steps, as the worker runs them (torch and coremltools load here).

Each takes plain arguments (paths as strings) and writes its outputs
atomically; the planner digests them afterwards.
"""
from __future__ import annotations

import os
from pathlib import Path

_checkpoints: dict = {}  # (path, stat) -> (Loaded, model): a checkpoint is loaded once per worker
KEEP_PROGRAMS_BYTES = 2 << 30  # exported programs kept in memory for their conversion (export_pytorch.keep_program)


def _loaded(path: str):
    from .checkpoint import load

    from .checkpoint_files import input_files

    stats = [os.stat(f) for f in input_files(path)]  # a model folder: its config.json and model.safetensors
    key = (os.path.abspath(path), *((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats))
    if key not in _checkpoints:
        _checkpoints.clear()
        ck = load(path)
        _checkpoints[key] = (ck, ck.model())
    return _checkpoints[key]


def checkpoint(out: str, architecture: str) -> None:
    from .checkpoint import make_demo

    make_demo(out, architecture)


def export_pytorch(checkpoint: str, out_dir: str, model: str, mode: str, T: int, formats: list[str], dtype: str,
                   kv_cache: str = "explicit", architecture: str | None = None) -> None:
    from . import export_pytorch as xp
    from .errors import ExportError
    from .export_pytorch import export_entry

    xp.KEEP_PROGRAMS_BYTES = KEEP_PROGRAMS_BYTES

    ck, module = _loaded(checkpoint)
    if architecture is not None and ck.arch.name != architecture:
        raise ExportError(f"the checkpoint holds a {ck.arch.name!r} model; the config says model {model!r} is a "
                          f"{architecture!r}", file=checkpoint, field="architecture")
    extra = {"kv_cache": kv_cache} if kv_cache != "explicit" else {}
    export_entry(ck, module, Path(out_dir), model_name=model, mode=mode, T=T, formats=formats, dtype=dtype, **extra)


def write_package_manifest(package: Path) -> Path:
    """Write ``<package>.manifest.json`` (its tree digest and file digests), last, atomically.

    doit cannot take a folder as a dependency; this file stands for it downstream.
    """
    import json

    from . import atomic
    from .digest import file_digest, tree_digest, tree_files

    files = {rel: file_digest(package / rel) for rel in tree_files(package)}
    manifest = package.with_name(package.name + ".manifest.json")
    body = {"package": package.name, "digest": tree_digest(package), "files": files}
    atomic.write_text(manifest, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return manifest


def convert_coreml(exported: str, contract: str, out: str, options: dict) -> None:
    from . import export_pytorch as xp
    from .convert_coreml import convert
    from .digest import file_digest

    program = xp.take_program(file_digest(exported)) if exported.endswith(".pt2") and xp.kept_programs else None
    if program is not None:
        print(f"{exported}: the program this worker exported, still in memory (not loaded again)")
    convert(exported, out, contract, options, program=program)
    write_package_manifest(Path(out))


def bundle_coreml(packages: list[str], contracts: list[str], out: str, contract_out: str) -> None:
    from .bundle import bundle

    bundle([Path(p) for p in packages], [Path(c) for c in contracts], Path(out), Path(contract_out))
    write_package_manifest(Path(out))
