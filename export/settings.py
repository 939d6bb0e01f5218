"""Every ``MODEL_EXPORT_*`` environment variable, read here and nowhere else.

Each setting that the environment can give says where a value came from, so an
error can name it (the flag, the environment or the file). The config file's
own values live in export/config.py; what the environment overrides is listed
here with its default.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE = "MODEL_EXPORT_CACHE"                      # the local cache folder
REMOTE_CACHE = "MODEL_EXPORT_REMOTE_CACHE"        # the shared store (fsspec URL); empty: none
CACHE_READ_ONLY = "MODEL_EXPORT_CACHE_READ_ONLY"  # 1: never publish to the shared store
DASK_SCHEDULER = "MODEL_EXPORT_DASK_SCHEDULER"    # a Dask scheduler address; empty: none
MEMORY_BUDGET_MB = "MODEL_EXPORT_MEMORY_BUDGET_MB"  # the memory budget of parallel steps
LOCK_WAIT = "MODEL_EXPORT_LOCK_WAIT"              # 0: a second build stops instead of waiting
NIGHTLY = "MODEL_EXPORT_NIGHTLY"                  # 1: set by `doit nightly` for its lanes: no cache hits
DASK_FROM_FLAG = "MODEL_EXPORT_DASK_FROM_FLAG"    # 1: set by `doit --dask` for its lanes: the address came from the flag

ALL = (CACHE, REMOTE_CACHE, CACHE_READ_ONLY, DASK_SCHEDULER, MEMORY_BUDGET_MB, LOCK_WAIT, NIGHTLY)

DEFAULT_CACHE = Path("~/.cache/model-export")


def local_cache(configured: str | Path | None = None) -> Path:
    """The local cache folder: the config's, else ``$MODEL_EXPORT_CACHE``, else ``~/.cache/model-export``."""
    return Path(configured or os.environ.get(CACHE) or DEFAULT_CACHE).expanduser()


def remote_cache(configured: str | None) -> str | None:
    """``$MODEL_EXPORT_REMOTE_CACHE`` (empty: none) over the config's shared store."""
    if REMOTE_CACHE in os.environ:
        return os.environ[REMOTE_CACHE] or None
    return configured or None


def cache_read_only(configured: bool) -> bool:
    return configured or os.environ.get(CACHE_READ_ONLY, "") not in ("", "0")


def dask_scheduler(configured: str | None) -> str | None:
    """``$MODEL_EXPORT_DASK_SCHEDULER`` (empty: none) over the config's scheduler."""
    if DASK_SCHEDULER in os.environ:
        return os.environ[DASK_SCHEDULER].strip() or None
    return configured or None


def set_dask_scheduler(address: str, *, from_flag: bool = False) -> None:
    """``doit --dask ADDRESS``: the doit lanes (forked processes) read it from the environment."""
    os.environ[DASK_SCHEDULER] = address
    if from_flag:
        os.environ[DASK_FROM_FLAG] = "1"


def dask_scheduler_origin(pyproject) -> tuple[str, str]:
    """Where the scheduler address came from, as (file, field) for an error line: the flag, the
    environment or the config file."""
    if os.environ.get(DASK_FROM_FLAG) == "1":
        return "doit --dask", "ADDRESS"
    if DASK_SCHEDULER in os.environ:
        return f"${DASK_SCHEDULER}", "(environment)"
    return str(pyproject), "tool.export.dask.scheduler"


def memory_budget_mb(configured: int | None) -> int | None:
    value = os.environ.get(MEMORY_BUDGET_MB)
    return int(value) if value else configured


def lock_wait() -> bool:
    return os.environ.get(LOCK_WAIT, "1") != "0"


def nightly() -> bool:
    return os.environ.get(NIGHTLY) == "1"


def set_nightly() -> None:
    os.environ[NIGHTLY] = "1"


def environment() -> dict[str, str]:
    """Every setting the environment gives now: what the fast no-op's stamp holds (export/planner/noop.py)."""
    return {k: os.environ[k] for k in ALL if k in os.environ}
