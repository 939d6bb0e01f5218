"""checkpoint: the deterministic demo checkpoint of an architecture."""
from __future__ import annotations


def run(out: str, architecture: str) -> None:
    from ...checkpoint import make_demo

    make_demo(out, architecture)
