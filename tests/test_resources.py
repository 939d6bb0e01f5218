"""Resource faults in real builds: the disk fills up while an artifact or a cache entry
is written, the artifacts folder cannot be written, the cache cannot be written.
A build that cannot write its artifacts fails with one error line and no traceback;
one that cannot write its cache builds without it and says so. Afterwards a build
with room again gives a clean build's bytes: nothing half-written counts.

Disk-full cases mount a small tmpfs (root only); they are skipped where mount is not allowed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from faults import KILL_STEPS, error_lines, file_digests, no_traceback
from scenario import Project
from test_kill import check_cache

pytestmark = pytest.mark.xdist_group("disk")  # a full disk (tmpfs): one trial at a time (conftest.py)


@pytest.fixture(scope="module")
def template(kill_built) -> Project:
    return kill_built.template


@pytest.fixture(scope="module")
def built(kill_built) -> Project:
    """A clean build, its cache (.cache) holding every step (the run's shared one: read it, copy it)."""
    return kill_built.project


@pytest.fixture(scope="module")
def reference(built) -> dict:
    return built.artifact_digests()


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


def _fill(where: Path, leave: int) -> Path:
    """Fill the file system of ``where`` until only ``leave`` bytes are free; the filler's path."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    assert free > leave, f"only {free} bytes free in {where}"
    filler = where / "filler"  # top level of artifacts/: not an artifact (artifact_digests reads artifacts/<model>/)
    with open(filler, "wb") as f:
        f.write(bytes(free - leave))
    return filler


def _leftovers(art: Path) -> list[Path]:
    """Temporaries of atomic writes, restores and merges (dot-names) anywhere under artifacts/<model>/."""
    return [f for f in art.glob("*/**/.*")]


def test_disk_full_during_the_bundle(template, reference, tmp_path):
    """The exports and packages fit; then the disk fills up and the bundle (about 90 kB, written twice:
    merged, then copied into place) finds 40 kB."""
    p = template.copy(tmp_path / "project")
    art = p.root / "artifacts"
    with tmpfs(art, "20m"):
        p.doit("convert_coreml", "verify_coreml:student.prefill.T16")  # all but the bundle (and its check)
        assert p.ran() == KILL_STEPS - {"bundle_coreml:student", "verify_coreml:student"}, p.last_build()
        cache_before = file_digests(p.root / ".cache", skip=("tmp/", "lock"))
        filler = _fill(art, 40 * 1024)
        r = p.doit(check=False)
        assert r.returncode != 0, _out(r)
        no_traceback(r)
        errors = set(error_lines(r))  # doit echoes a step's error once
        bundle = art / "student" / "student.mlpackage"
        assert len(errors) == 1, _out(r)
        error = errors.pop()
        assert error.startswith(f"error: {bundle}: output folder: No space left on device (writing {art / 'student'}/"), _out(r)
        assert p.last_build()["bundle_coreml:student"] == "failed"
        # nothing partial: no bundle, manifest or contract, no temporary, no cache entry for the bundle
        model = art / "student"
        assert not (model / "student.mlpackage").exists()
        assert not (model / "student.mlpackage.manifest.json").exists()
        assert not (model / "contract.json").exists()
        assert not _leftovers(art), _leftovers(art)
        assert file_digests(p.root / ".cache", skip=("tmp/", "lock")) == cache_before
        check_cache(p.root / ".cache")
        filler.unlink()  # room again: only the bundle runs, and it has a clean build's bytes
        r = p.doit(check=False)
        assert r.returncode == 0, _out(r)
        assert p.ran() == {"bundle_coreml:student", "verify_coreml:student"}, p.last_build()
        assert p.artifact_digests() == reference
        assert not _leftovers(art), _leftovers(art)
    check_cache(p.root / ".cache")


def test_disk_full_during_a_cache_restore(built, reference, tmp_path):
    """A fresh checkout sharing a full cache restores into a disk with 150 kB free: the export
    (about 250 kB, copied: the cache is on another file system) does not fit. The restore gives
    up with a warning, the step then fails to write it too; the cache keeps every entry (a full
    disk is not a corrupt entry), and once there is room everything comes back from the cache."""
    cache = tmp_path / "cache"
    shutil.copytree(built.root / ".cache", cache)
    env = {"MODEL_EXPORT_CACHE": str(cache)}
    cache_before = file_digests(cache, skip=("tmp/", "lock"))
    p = built.copy(tmp_path / "project")
    shutil.rmtree(p.root / ".cache")
    shutil.rmtree(p.root / ".export")  # a fresh checkout: no dependency file, no artifacts
    shutil.rmtree(p.root / "artifacts")
    art = p.root / "artifacts"
    with tmpfs(art, "20m"):
        filler = _fill(art, 150 * 1024)
        r = p.doit(env=env, check=False)
        assert r.returncode != 0, _out(r)
        no_traceback(r)
        warned = [ln for ln in r.stderr.splitlines() if "not restored" in ln]
        assert len(warned) == 1 and "No space left on device" in warned[0], _out(r)
        errors = error_lines(r)
        assert errors and all("export_pytorch:student.prefill.T16" in e or "prefill_T16" in e for e in errors), _out(r)
        assert any("No space left on device" in e for e in errors), _out(r)
        assert p.last_build()["export_pytorch:student.prefill.T16"] == "failed"
        exported = art / "student" / "exported"
        assert not exported.exists() or not list(exported.iterdir()), list(exported.iterdir())
        assert not _leftovers(art), _leftovers(art)
        assert file_digests(cache, skip=("tmp/", "lock")) == cache_before, "the full disk cost cache entries"
        assert not list((cache / "tmp").iterdir())
        filler.unlink()
        r = p.doit(env=env, check=False)
        assert r.returncode == 0, _out(r)
        no_traceback(r)
        assert p.restored() == KILL_STEPS, p.last_build()
        assert p.ran() <= {"prune_artifacts"}
        assert p.artifact_digests() == reference
        assert not _leftovers(art), _leftovers(art)
