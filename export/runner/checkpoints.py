"""The checkpoint a worker process loaded last, kept for its next steps (as long as the worker lives)."""
from __future__ import annotations

import os

_checkpoints: dict = {}  # (path, stats) -> (Loaded, model): a checkpoint is loaded once per worker


def load(path: str):
    """(Loaded, model) of ``path``, loaded again only when one of its files changed."""
    from ..checkpoint import load
    from ..checkpoint_files import input_files

    stats = [os.stat(f) for f in input_files(path)]  # a model folder: its config.json and model.safetensors
    key = (os.path.abspath(path), *((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats))
    if key not in _checkpoints:
        _checkpoints.clear()
        ck = load(path)
        _checkpoints[key] = (ck, ck.model())
    return _checkpoints[key]
