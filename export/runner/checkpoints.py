"""The checkpoint a worker process loaded last, kept for its next steps (as long as the worker lives)."""
from __future__ import annotations

import gc
import json
import os

_checkpoints: dict = {}  # (path, stats) -> (Loaded, model): a checkpoint is loaded once per worker


def load(path: str):
    """(Loaded, model) of ``path``, loaded again only when one of its files changed."""
    from ..checkpoint import load
    from ..checkpoint_files import input_files

    stats = [os.stat(f) for f in input_files(path)]  # a model folder: its config.json and model.safetensors
    key = (os.path.abspath(path), *((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats))
    if key not in _checkpoints:
        forget()
        ck = load(path)
        _checkpoints[key] = (ck, ck.model())
    return _checkpoints[key]


_parts: dict = {}  # (path, stats, part) -> (architecture, config, module): the part loaded last, for its next leaves


def load_part(path: str, part: dict):
    """(architecture, config, module) of one part of ``path`` (export/checkpoint.py ``load_part``): only the
    part's tensors are read. The worker keeps the last part it loaded (the next leaves are often its other
    (mode, T)) and drops it, and any whole checkpoint it kept, before loading another."""
    from ..checkpoint import load_part
    from ..checkpoint_files import input_files

    stats = [os.stat(f) for f in input_files(path)]
    key = (os.path.abspath(path), *((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats),
           json.dumps(part, sort_keys=True))
    if key not in _parts:
        forget()
        _parts[key] = load_part(path, part)
    return _parts[key]


def forget() -> None:
    """Drop what the worker holds of the checkpoint or part it loaded last before it loads another: the module,
    and the programs it exported from it and kept for their conversion (export/runner/programs.py), which hold
    its weights. An 8B model's part export peaked at 4.8-6.5 GB where the part alone takes 3.1 GB: the last
    part's program was still kept (bench/results/scale-llama-3.1-8b-*.json)."""
    from .programs import PROGRAMS

    if _parts or _checkpoints or PROGRAMS:
        _parts.clear()
        _checkpoints.clear()
        PROGRAMS.clear()
        gc.collect()  # an ExportedProgram's graph modules refer to each other: without it, the weights wait for gc
