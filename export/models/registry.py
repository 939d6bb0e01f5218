"""The architecture registry. ``get(name)`` returns an ``Architecture``. Imports torch."""
from __future__ import annotations

from ..errors import ExportError
from . import judge, student
from .names import ARCHITECTURE_NAMES
from .spec import Architecture, ModeSpec, TensorSpec

REGISTRY: dict[str, Architecture] = {
    "student": Architecture(
        name="student", config_cls=student.StudentConfig, build=student.Student, modes=student.MODES,
        io=student.io, wrap=student.wrap, example_inputs=student.example_inputs,
        max_positions=lambda c: c.max_positions,
    ),
    "judge": Architecture(
        name="judge", config_cls=judge.JudgeConfig, build=judge.Judge, modes=judge.MODES,
        io=judge.io, wrap=judge.wrap, example_inputs=judge.example_inputs,
        max_positions=lambda c: c.max_positions,
    ),
}
assert set(REGISTRY) == set(ARCHITECTURE_NAMES)


def get(name: str, *, file: object = None, field: str = "architecture") -> Architecture:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ExportError(f"unknown architecture {name!r}; known: {sorted(REGISTRY)}", file=file, field=field) from None


