"""The projects built once per run (conftest.py) are what the tests copying them assume: a copy
is a built project that doit finds up to date, with its own cache; the unbuilt template builds
to the same bytes' names; and the shared folder itself is never written by a copy's build."""
from __future__ import annotations

import pytest

from faults import KILL_STEPS, STEPS

pytestmark = pytest.mark.spread

KINDS = {"scenario_built": 23,  # 15 steps, and 8 verify_coreml (6 leaves, 2 bundles)
         "tiny_built": len(STEPS), "kill_built": len(KILL_STEPS)}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_copy_is_up_to_date_and_its_own(kind, request, tmp_path):
    built = request.getfixturevalue(kind)
    before = {p: p.stat().st_mtime_ns for p in built.project.root.rglob("*")}
    steps = {n for n, s in built.project.last_build().items() if s == "built"}
    assert len(steps) == KINDS[kind], built.project.last_build()  # the shared build ran every step
    p = built.copy(tmp_path / "project")
    assert p.env()["MODEL_EXPORT_CACHE"] == str(p.root / ".cache")  # the copy's own cache, not the shared one
    p.doit()
    assert p.ran() == set() and p.restored() == set(), p.last_build()
    assert set(p.last_build().values()) == {"up-to-date"}
    assert p.artifact_digests() == built.artifact_digests()
    assert {q: q.stat().st_mtime_ns for q in built.project.root.rglob("*")} == before  # the shared one untouched
    fresh = built.fresh(tmp_path / "fresh")
    assert not (fresh.root / "artifacts").exists() and not (fresh.root / ".cache").exists()
    assert (fresh.root / "checkpoints" / "student.pt").read_bytes() == \
        (built.project.root / "checkpoints" / "student.pt").read_bytes()
