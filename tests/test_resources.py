"""Resource faults in real builds: the disk fills up while an artifact or a cache entry
is written, the artifacts folder cannot be written, the cache cannot be written.
A build that cannot write its artifacts fails with one error line and no traceback;
one that cannot write its cache builds without it and says so. Afterwards a build
with room again gives a clean build's bytes: nothing half-written counts.

Disk-full cases mount a small tmpfs (root only); they are skipped where mount is not allowed.
"""
from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from faults import create_tiny, error_lines, no_traceback
from scenario import Project, project_toml
from test_kill import KILL_TOML, check_cache


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Project:
    p = create_tiny(tmp_path_factory.mktemp("res") / "template")
    (p.root / "pyproject.toml").write_text(project_toml(KILL_TOML, name="res"))
    return p


@pytest.fixture(scope="module")
def reference(template, tmp_path_factory) -> dict:
    p = template.copy(tmp_path_factory.mktemp("res-ref") / "project")
    p.doit()
    return p.artifact_digests()


@contextmanager
def tmpfs(where: Path, size: str, *, ro: bool = False):
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _out(r) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"


def test_disk_full_while_writing_artifacts(template, reference, tmp_path):
    p = template.copy(tmp_path / "project")
    with tmpfs(p.root / "artifacts", "320k"):  # the export (~250 kB) fits, the Core ML package does not
        r = p.doit(check=False)
        assert r.returncode != 0, _out(r)
        no_traceback(r)
        errors = error_lines(r)
        assert errors and any("No space left on device" in e for e in errors), _out(r)
        subprocess.run(["mount", "-o", "remount,size=20m", str(p.root / "artifacts")], check=True)
        r = p.doit(check=False)  # room again: the build completes, with a clean build's bytes
        assert r.returncode == 0, _out(r)
        assert p.artifact_digests() == reference
        assert not [f for f in (p.root / "artifacts").rglob(".*") if f.name.endswith(".tmp")], "temporaries left"
    check_cache(p.root / ".cache")


def test_disk_full_while_writing_the_cache(template, reference, tmp_path):
    p = template.copy(tmp_path / "project")
    cache = tmp_path / "cache"
    with tmpfs(cache, "200k"):  # the first entries fit, then the blobs of the export do not
        r = p.doit(env={"MODEL_EXPORT_CACHE": str(cache)}, check=False)
        assert r.returncode == 0, _out(r)
        no_traceback(r)
        assert "without caching" in r.stderr, _out(r)
        assert p.artifact_digests() == reference
        check_cache(cache)  # no half-written entry
        assert not list((cache / "tmp").iterdir()), "the failed publish left temporaries"


def test_read_only_artifacts_folder(template, tmp_path):
    p = template.copy(tmp_path / "project")
    with tmpfs(p.root / "artifacts", "1m", ro=True):
        r = p.doit(check=False)
        assert r.returncode != 0, _out(r)
        no_traceback(r)
        errors = error_lines(r)
        assert errors and any("artifacts" in e for e in errors), _out(r)


def test_unwritable_cache_builds_without_caching(template, reference, tmp_path):
    p = template.copy(tmp_path / "project")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache's parent folder should be")
    r = p.doit(env={"MODEL_EXPORT_CACHE": str(blocker / "cache")}, check=False)
    assert r.returncode == 0, _out(r)
    no_traceback(r)
    assert "cache not writable" in r.stderr and "building without caching" in r.stderr, _out(r)
    assert r.stderr.count("cache not writable") == 1, "the warning is said once, not once per step"
    assert p.artifact_digests() == reference
    assert p.ran() >= {"export_pytorch:student.prefill.T16", "bundle_coreml:student"}
