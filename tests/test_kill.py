"""Killing a real build at many moments (DESIGN.md invariant 1): SIGKILL of doit's whole
process group (planner and worker) during export, conversion, bundle, cache publish and
manifest writing; then ``doit`` again. After every trial the build completes, every
artifact has the bytes of a clean build, and the cache holds no entry whose blobs are
not what it says. Ctrl-C (SIGINT) ends a build with a clean message, no traceback.

A few trials run by default; the full set (``-m slow``) runs in its own CI step.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from faults import TINY_TOML, create_tiny, kill_group, no_traceback, popen_doit
from scenario import Project, project_toml

# prefill only: three steps (export, convert, bundle), so that a trial stays short
KILL_TOML = TINY_TOML.replace('shape_set = "tiny"', 'shape_set = "tiny"\nmodes = ["prefill"]')


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Project:
    p = create_tiny(tmp_path_factory.mktemp("kill") / "template")
    (p.root / "pyproject.toml").write_text(project_toml(KILL_TOML, name="kill"))
    return p


@pytest.fixture(scope="module")
def reference(template, tmp_path_factory) -> dict:
    """A clean build: its artifact digests and how long it took (the delays are fractions of it)."""
    p = template.copy(tmp_path_factory.mktemp("kill-ref") / "project")
    started = time.monotonic()
    p.doit()
    return {"digests": p.artifact_digests(), "seconds": time.monotonic() - started}


# Kill when a path matching this glob first appears (relative to the project).
FILE_TRIGGERS = {
    "export-log": ".export/logs/export_pytorch__student.prefill.T16.log",
    "export-writing": "artifacts/student/exported/.prefill_T16.*",
    "conversion-log": ".export/logs/convert_coreml__student.prefill.T16.log",
    "conversion-writing": "artifacts/student/coreml/.prefill_T16.mlpackage.*",
    # the package is renamed into place, then its manifest (the downstream dependency) is digested and written
    "package-manifest-writing": "artifacts/student/coreml/prefill_T16.mlpackage",
    "cache-first-blob": ".cache/cas/*/*",
    "cache-first-entry": ".cache/ac/*/*",
    "bundle-log": ".export/logs/bundle_coreml__student.log",
    "bundle-writing": "artifacts/student/.student.mlpackage.*",
}
# Delays stop well short of the whole cold build: a build on a less loaded machine than the
# reference one finishes sooner, and a kill after the end proves nothing (the late moments are
# covered by the file triggers: cache publish, bundle).
FRACTIONS = [0.02, 0.07, 0.12, 0.17, 0.22, 0.27, 0.32, 0.37, 0.42, 0.47, 0.52, 0.57, 0.62, 0.67, 0.72]
QUICK = ["delay-0.27", "delay-0.57", "conversion-writing", "cache-first-entry", "bundle-writing", "delay-0.72"]
ALL = [f"delay-{f}" for f in FRACTIONS] + list(FILE_TRIGGERS)


def _wait_for(proc, root: Path, trial: str, cold: float) -> bool:
    """Wait for the trial's moment; True if it came while the build still ran."""
    if trial.startswith("delay-"):
        deadline = time.monotonic() + float(trial[len("delay-"):]) * cold
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            time.sleep(0.01)
        return proc.poll() is None
    pattern = FILE_TRIGGERS[trial]
    deadline = time.monotonic() + 3 * cold + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if next(root.glob(pattern), None) is not None:
            return True
        time.sleep(0.002)
    return False


def check_cache(root: Path) -> None:
    """Every entry in ac/ parses and names blobs present with their digest and size."""
    from export.cache import _blobs, _parse
    from export.digest import file_digest

    for m in (root / "ac").rglob("*"):
        if not m.is_file():
            continue
        entry = _parse(m.read_bytes(), m.name, None)
        for digest, size in _blobs(entry).items():
            blob = root / "cas" / digest[:2] / digest
            assert blob.is_file() and blob.stat().st_size == size and file_digest(blob) == digest, \
                f"cache entry {m.name} names a bad blob {digest}"


def run_trial(template: Project, reference: dict, tmp_path: Path, trial: str) -> None:
    p = template.copy(tmp_path / "project")
    proc = popen_doit(p)
    hit = _wait_for(proc, p.root, trial, reference["seconds"])
    kill_group(proc)
    out, err = proc.communicate(timeout=60)
    assert hit, f"the build ended before the moment {trial!r} came (exit {proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    # What the killed build left: nothing it wrote counts as up to date unless its bytes are right.
    check_cache(p.root / ".cache")
    r = p.doit(check=False)
    assert r.returncode == 0, f"the build after the kill failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    no_traceback(r)
    assert p.artifact_digests() == reference["digests"]
    check_cache(p.root / ".cache")
    # and it is really done: a third run builds nothing
    p.doit()
    assert p.ran() <= {"prune_artifacts"}


@pytest.mark.parametrize("trial", QUICK)
def test_killed_build_recovers(template, reference, tmp_path, trial):
    run_trial(template, reference, tmp_path, trial)


@pytest.mark.slow
@pytest.mark.parametrize("trial", [t for t in ALL if t not in QUICK])
def test_killed_build_recovers_slow(template, reference, tmp_path, trial):
    run_trial(template, reference, tmp_path, trial)


def test_sigint_stops_the_build_cleanly(template, reference, tmp_path):
    """Ctrl-C on a terminal sends SIGINT to the foreground group: doit and its worker."""
    p = template.copy(tmp_path / "project")
    proc = popen_doit(p)
    assert _wait_for(proc, p.root, "conversion-log", reference["seconds"])
    kill_group(proc, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in out + err, f"Ctrl-C printed a traceback:\n{out[-3000:]}\n{err[-3000:]}"
    assert "interrupted" in (out + err).lower(), f"no clear message on Ctrl-C:\n{out[-2000:]}\n{err[-2000:]}"
    r = p.doit(check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert p.artifact_digests() == reference["digests"]
