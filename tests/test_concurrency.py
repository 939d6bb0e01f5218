"""Several builds at once: two and four ``doit`` on one project (one builds, the others
wait and say so), two projects sharing one cache, and cache gc during a build. No
corruption, no lost entry: every artifact ends with the bytes of a sequential build."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from faults import no_traceback, popen_doit, wait_for_path
from scenario import Project
from test_kill import check_cache

pytestmark = pytest.mark.xdist_group("concurrency")  # builds racing each other: one test at a time (conftest.py)


@pytest.fixture(scope="module")
def template(kill_built) -> Project:
    return kill_built.template


@pytest.fixture(scope="module")
def reference(kill_built) -> dict:
    return kill_built.artifact_digests()


def _wait_path(root: Path, rel: str, proc, timeout: float = 120) -> None:
    """Wait for ``rel`` to appear below ``root`` while the build ``proc`` runs (an event, not a poll)."""
    path = root / rel
    assert wait_for_path(proc, root, rel, timeout), \
        f"{path} never appeared (exit {proc.poll()}):\n{proc.communicate() if proc.poll() is not None else ''}"


@pytest.mark.parametrize("n", [2, 4])
def test_n_builds_of_one_project_one_builds_the_others_wait(template, reference, tmp_path, n):
    p = template.copy(tmp_path / "project")
    first = popen_doit(p)
    _wait_path(p.root, ".export/lock.owner", first)  # the first holds the lock
    others = [popen_doit(p) for _ in range(n - 1)]
    results = [(proc, *proc.communicate(timeout=900)) for proc in [first, *others]]
    for proc, out, err in results:
        assert proc.returncode == 0, f"{out[-2000:]}\n{err[-2000:]}"
        assert "Traceback" not in out + err
    for proc, out, err in results[1:]:
        assert "waiting for another doit" in err, err[-2000:]
    assert p.artifact_digests() == reference
    check_cache(p.root / ".cache")
    p.doit()
    assert p.ran() <= {"prune_artifacts"}


def test_two_projects_share_one_cache_at_once(template, reference, tmp_path):
    shared = {"MODEL_EXPORT_CACHE": str(tmp_path / "shared-cache")}
    a, b = template.copy(tmp_path / "a"), template.copy(tmp_path / "b")
    procs = [popen_doit(a, env=shared), popen_doit(b, env=shared)]
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{out[-2000:]}\n{err[-2000:]}"
        assert "Traceback" not in out + err
    assert a.artifact_digests() == reference
    assert b.artifact_digests() == reference
    check_cache(tmp_path / "shared-cache")
    c = template.copy(tmp_path / "c")  # a third checkout restores everything from what they published
    c.doit(env=shared)
    assert c.ran() <= {"prune_artifacts"} and c.restored()
    assert c.artifact_digests() == reference


def test_cache_gc_during_a_build_loses_no_entry(template, reference, tmp_path):
    cache = tmp_path / "cache"
    env = {"MODEL_EXPORT_CACHE": str(cache)}
    p = template.copy(tmp_path / "project")
    build = popen_doit(p, env=env)
    gcs = 0
    while build.poll() is None:  # gc with no grace period, over and over, while the build publishes
        r = subprocess.run([sys.executable, "-m", "export.cache", "gc", "--local", str(cache), "--grace", "0"],
                           cwd=p.root, env={**p.env(env), "PYTHONPATH": str(p.root)}, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        gcs += 1
    out, err = build.communicate()
    assert build.returncode == 0, f"{out[-2000:]}\n{err[-2000:]}"
    assert gcs >= 3
    assert p.artifact_digests() == reference
    check_cache(cache)
    # no lost entry: every step the build ran is in the cache, and a new checkout restores them all
    fresh = template.copy(tmp_path / "fresh")
    fresh.doit(env=env)
    assert fresh.ran() <= {"prune_artifacts"}
    assert fresh.restored() == p.ran() - {"prune_artifacts"}
    assert fresh.artifact_digests() == reference


def test_doit_cache_gc_during_a_build(template, reference, tmp_path):
    """``doit cache --gc`` from a second shell waits for the project's build (the project lock), then collects."""
    env = {"MODEL_EXPORT_CACHE": str(tmp_path / "cache")}
    p = template.copy(tmp_path / "project")
    build = popen_doit(p, env=env)
    _wait_path(p.root, ".export/lock.owner", build)
    gc = popen_doit(p, "cache", "--gc", env=env)
    for proc in (build, gc):
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{out[-2000:]}\n{err[-2000:]}"
        assert "Traceback" not in out + err
    assert p.artifact_digests() == reference
    check_cache(tmp_path / "cache")
    fresh = template.copy(tmp_path / "fresh")
    fresh.doit(env=env)
    assert fresh.ran() <= {"prune_artifacts"}
    assert fresh.artifact_digests() == reference
