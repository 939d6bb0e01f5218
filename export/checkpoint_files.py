"""The files a checkpoint consists of, without importing torch (the task graph reads this).

A checkpoint is one file (``.pt``, ``.safetensors``) or a transformers model
folder holding ``config.json`` and ``model.safetensors``, or ``config.json``,
``model.safetensors.index.json`` and the shards it names (``save_pretrained``
with ``max_shard_size``): the build depends on those files, and a
checkpoint's digest covers exactly them.
"""
from __future__ import annotations

import json
from pathlib import Path

from .digest import file_digest
from .parts import checkpoint_files

FOLDER_FILES = ("config.json", "model.safetensors")


def input_files(path: Path | str) -> list[Path]:
    """The files whose bytes make up the checkpoint at ``path``."""
    return checkpoint_files(Path(path))


def digest(path: Path | str, file_digest=file_digest) -> str:
    """A file's digest; for a folder, a digest over its input files (names and digests)."""
    files = input_files(path)
    if len(files) == 1 and files[0] == Path(path):
        return file_digest(path)
    from .digest import bytes_digest

    return bytes_digest(json.dumps({f.name: file_digest(f) for f in files}, sort_keys=True).encode())
