"""The architecture registry. ``get(name)`` returns an ``Architecture``. Imports torch."""
from __future__ import annotations

from ..errors import ExportError
from . import hf_causal_lm, judge, student
from .names import ARCHITECTURE_NAMES, ARCHITECTURE_TOOLS
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
    "hf-causal-lm": Architecture(
        name="hf-causal-lm", config_cls=None, build=hf_causal_lm.build, modes=hf_causal_lm.MODES,
        io=hf_causal_lm.io, wrap=hf_causal_lm.wrap, example_inputs=hf_causal_lm.example_inputs,
        max_positions=hf_causal_lm.max_positions, load_model=hf_causal_lm.load_model,
        load_config=hf_causal_lm.load_config, tools=ARCHITECTURE_TOOLS["hf-causal-lm"],
    ),
}
assert set(REGISTRY) == set(ARCHITECTURE_NAMES)


def get(name: str, *, file: object = None, field: str = "architecture") -> Architecture:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ExportError(f"unknown architecture {name!r}; known: {sorted(REGISTRY)}", file=file, field=field) from None


