"""The architecture's contracts (pyproject.toml, [tool.importlinter]; docs/architecture.md), checked by
import-linter's ``lint-imports`` on the package as it is and on copies broken on purpose."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scenario import REPO

LINT = Path(sys.executable).with_name("lint-imports")


def lint(project: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run([str(LINT), "--config", str(project / "pyproject.toml"), "--no-cache"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def copy(tmp_path) -> Path:
    shutil.copytree(REPO / "export", tmp_path / "export", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_contracts_hold():
    r = lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 4 kept, 0 broken." in r.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("planner/graph.py", "    import torch  # noqa", "The planner never imports torch"),
    ("planner/plan.py", "    from ..coreml import convert  # noqa", "The planner never imports torch"),
    ("runner/cluster.py", "    from ..planner import tasks  # noqa", "Layers"),
    ("coreml/spec.py", "    from ..cache import store  # noqa", "do not know each other"),
    ("digest.py", "    from . import atomic  # noqa", "No import cycle"),
])
def test_a_wrong_import_breaks_its_contract(copy, module, line, contract):
    f = copy / "export" / module
    f.write_text(f.read_text() + f"\n\ndef _wrong():\n{line}\n")
    if module == "digest.py":  # atomic already imports digest? make the cycle explicit both ways
        a = copy / "export" / "atomic.py"
        a.write_text(a.read_text() + "\n\ndef _back():\n    from . import digest  # noqa\n")
    r = lint(copy)
    assert r.returncode != 0, r.stdout
    broken = r.stdout[r.stdout.index("Broken contracts"):]
    assert contract in broken, r.stdout
