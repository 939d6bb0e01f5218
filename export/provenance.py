"""Where a node of an exported graph comes from: its module and its source line.

``portable_source`` keeps the innermost frame of a node's ``stack_trace`` with
its path relative to its import root (``transformers/masking_utils.py``,
``export/models/student.py``): the same bytes in any checkout or virtualenv.
``node_origin`` describes an ExportedProgram node or a TorchScript node in one
line, for error messages.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def portable_source(stack_trace: str | None) -> str | None:
    frames = _FRAME.findall(stack_trace or "")
    if not frames:
        return None
    path, line, func, code = frames[-1]
    return f'File "{_relative(path)}", line {line}, in {func}\n    {code.strip()}'


# This package's own import root first: an editable install puts no entry for it on sys.path.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def _relative(path: str) -> str:
    resolved = str(Path(path).resolve())
    roots = sorted((str(Path(p).resolve()) for p in sys.path if p), key=len, reverse=True)
    for root in [_PACKAGE_ROOT, *roots] if resolved.startswith(_PACKAGE_ROOT + "/export/") else roots:
        if resolved.startswith(root + "/"):
            return resolved[len(root) + 1:]
    return Path(path).name


def _short(source: str | None) -> str | None:
    frames = _FRAME.findall(source or "")
    if not frames:
        return None
    path, line, func, code = frames[-1]
    return f"{_relative(path)}:{line} in {func}: {code.strip()}"


def node_origin(node) -> str:
    """``module.path (Class), file:line in function: code`` for an fx node (ExportedProgram)
    or a TorchScript node; whatever part the node's metadata lacks is left out."""
    parts = []
    if hasattr(node, "meta"):  # torch.fx.Node
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, cls = list(stack.values())[-1]
            cls = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
            parts.append(f"{_module_path(path) or '(top)'} ({cls.rsplit('.', 1)[-1]})")
        src = _short(node.meta.get("stack_trace"))
    else:  # torch._C.Node
        scope = node.scopeName()
        if scope:
            parts.append(scope.split("/")[-1].replace("__module.", "") or "(top)")
        src = None
        rng = node.sourceRange()
        if rng:
            m = re.search(r"([^\s:]+\.py)\((\d+)\)", rng)
            src = f"{_relative(m.group(1))}:{m.group(2)}" if m else rng.strip().splitlines()[0][:160]
    if src:
        parts.append(src)
    return ", ".join(parts) or "origin unknown"


def _module_path(path: str) -> str:
    """``L['self'].lm.model.layers[0]`` / ``lm.model.layers.0`` -> ``lm.model.layers.0``."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return re.sub(r"\._modules\['([^']+)'\]", r".\1", path).strip(".")
