"""The content-addressed artifact cache: cas/ + ac/, local and fsspec remote, gc (export/cache/store.py)."""
from .store import Cache, main, parse_size  # noqa: F401
