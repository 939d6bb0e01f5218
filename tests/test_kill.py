"""Killing a real build at many moments (docs/architecture.md: outputs appear atomically): SIGKILL of doit's whole
process group (planner and worker) during export, conversion, bundle, cache publish and
manifest writing; then ``doit`` again. After every trial the build completes, every
artifact has the bytes of a clean build, and the cache holds no entry whose blobs are
not what it says. Ctrl-C (SIGINT) ends a build with a clean message, no traceback.

A few trials run without the slow ones (``-m "not slow"``); CI runs the full set.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults import (KILL_STEPS, STEPS, error_lines, kill_group, no_traceback, popen_doit, wait_for_delay,
                    wait_for_path)
from scenario import Project

# Each trial is its own work unit (conftest.py): the two xdist workers may run two trials at once. A trial
# needs no machine of its own: it builds in its own copy with its own cache and kills only its own process
# group, and run_trial times its delays from the build it kills when that build is slower than the
# reference (a busier machine), so a kill never comes after the end. One group of ~40 trials was the
# suite's longest unit, about half of CI on one worker.
pytestmark = pytest.mark.spread


@pytest.fixture(scope="module")
def template(kill_built) -> Project:
    """The unbuilt project (KILL_TOML): trials take copies."""
    return kill_built.template


@pytest.fixture(scope="module")
def reference(kill_built) -> dict:
    """A clean build: its artifact digests and how long it took (the delays are fractions of it)."""
    return {"digests": kill_built.artifact_digests(), "seconds": kill_built.seconds, "project": kill_built.project}


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
    # coremltools has begun writing the merged package in the bundle's scratch folder
    "bundle-merging": "artifacts/student/.student.mlpackage.*.merge/*/*",
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
        return wait_for_delay(proc, float(trial[len("delay-"):]) * cold)
    return wait_for_path(proc, root, FILE_TRIGGERS[trial], timeout=3 * cold + 60)


def check_cache(root: Path) -> None:
    """Every entry in ac/ parses and names blobs present with their digest and size."""
    from export.cache.store import _blobs, _parse
    from export.digest import file_digest

    for m in (root / "ac").rglob("*"):
        if not m.is_file():
            continue
        entry = _parse(m.read_bytes(), m.name, None)
        for digest, size in _blobs(entry).items():
            blob = root / "cas" / digest[:2] / digest
            assert blob.is_file() and blob.stat().st_size == size and file_digest(blob) == digest, \
                f"cache entry {m.name} names a bad blob {digest}"


def run_trial(template: Project, reference: dict, tmp_path: Path, trial: str, args: tuple[str, ...] = ()) -> None:
    """Kill ``doit *args`` at the moment ``trial``, then ``doit`` again: a clean build's bytes."""
    cold = reference["seconds"]
    for attempt in range(3):
        p = template.copy(tmp_path / f"project{attempt}")
        started = time.monotonic()
        proc = popen_doit(p, *args)
        hit = _wait_for(proc, p.root, trial, cold)
        kill_group(proc)
        out, err = proc.communicate(timeout=60)
        if hit and proc.returncode == -signal.SIGKILL:
            break
        # The build ended before the moment, or as the kill was sent: a delay as long as this build
        # (the reference was timed on a busier machine). Try again, the delays as fractions of this build.
        cold = min(cold, time.monotonic() - started)
    assert hit, f"the build ended before the moment {trial!r} came (exit {proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}"
    assert proc.returncode == -signal.SIGKILL, f"the build ended before the kill (exit {proc.returncode})"
    # What the killed build left: nothing it wrote counts as up to date unless its bytes are right.
    check_cache(p.root / ".cache")
    r = p.doit(check=False)
    assert r.returncode == 0, f"the build after the kill failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    no_traceback(r)
    assert p.artifact_digests() == reference["digests"]
    leftovers = list((p.root / "artifacts").glob("*/**/.*"))  # temporaries of the killed build: pruned
    assert not leftovers, f"the killed build's temporaries are still there: {leftovers}"
    check_cache(p.root / ".cache")
    # and it is really done: a third run builds nothing
    p.doit(*args)
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


# --- parallel builds (doit -n 2) --------------------------------------------------------
# Both modes: two exports and two conversions that can run at once, then the bundle.

PARALLEL_QUICK = ["conversion-writing"]
# "export-writing": a 250 kB temporary that lives about a millisecond (a poll missed it; inotify does not)
PARALLEL_SLOW = ["export-log", "export-writing", "delay-0.37", "cache-first-entry", "package-manifest-writing",
                 "bundle-writing"]


@pytest.fixture(scope="module")
def template_n2(tiny_built) -> Project:
    return tiny_built.template


@pytest.fixture(scope="module")
def reference_n2(tiny_built) -> dict:
    """A clean ``doit -n 2`` build (the run's shared tiny project), checked to have really run two steps at once."""
    assert tiny_built.args == ["-n", "2"]
    p, seconds = tiny_built.project, tiny_built.seconds
    assert p.ran() == STEPS, p.last_build()
    record = json.loads((p.root / "artifacts" / "last_build.json").read_text())["tasks"]
    exports = [record[f"export_pytorch:student.{mode}.T16"] for mode in ("prefill", "decode")]
    assert max(e["started"] for e in exports) < min(e["ended"] for e in exports), \
        f"doit -n 2 ran the two exports one after the other: {exports}"
    return {"digests": p.artifact_digests(), "seconds": seconds, "project": p}


@pytest.mark.parametrize("trial", PARALLEL_QUICK)
def test_killed_parallel_build_recovers(template_n2, reference_n2, tmp_path, trial):
    run_trial(template_n2, reference_n2, tmp_path, trial, args=("-n", "2"))


@pytest.mark.slow
@pytest.mark.parametrize("trial", PARALLEL_SLOW)
def test_killed_parallel_build_recovers_slow(template_n2, reference_n2, tmp_path, trial):
    run_trial(template_n2, reference_n2, tmp_path, trial, args=("-n", "2"))


# --- doit's dependency file (.export/doit.sqlite) ---------------------------------------
# The cache is the source of truth and the dependency file an optimization (docs/architecture.md): a
# damaged one is said once, by name, set aside, and every step comes back from the cache.

DEP = ".export/doit.sqlite"


def _truncate_half(f: Path) -> None:  # a write cut short
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _truncate_in_header(f: Path) -> None:  # cut inside the 100-byte header
    f.write_bytes(f.read_bytes()[:60])


def _header_overwritten(f: Path) -> None:  # the first page rewritten with other bytes
    data = bytearray(f.read_bytes())
    data[:512] = bytes(range(256)) * 2
    f.write_bytes(bytes(data))


def _last_page_zeroed(f: Path) -> None:  # the file was extended but its last page never reached the disk
    import sqlite3

    conn = sqlite3.connect(f)  # no free pages at the end: the last pages hold rows (a freed one would be harmless)
    conn.execute("VACUUM")
    conn.close()
    data = bytearray(f.read_bytes())
    size = int.from_bytes(data[16:18], "big")  # the header's page size (1 means 65536)
    size = 65536 if size == 1 else size
    # the last b-tree page (the file may end in an overflow page, the tail of a long value, which quick_check
    # need not read: a CI run saw that damage go unnoticed); its type byte is 2, 5, 10 or 13
    last = next(n for n in range(len(data) // size - 1, 0, -1) if data[n * size] in (2, 5, 10, 13))
    data[last * size:(last + 1) * size] = bytes(size)
    f.write_bytes(bytes(data))


DAMAGE = {"truncated-half": _truncate_half, "truncated-in-header": _truncate_in_header,
          "header-overwritten": _header_overwritten, "last-page-zeroed": _last_page_zeroed}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_dep_file_is_said_and_recovered_from_the_cache(reference, tmp_path, how):
    p = reference["project"].copy(tmp_path / "project")
    dep = p.root / DEP
    DAMAGE[how](dep)
    damaged = dep.read_bytes()
    # a read-only command changes nothing and says what is wrong in one line
    r = p.doit("list", check=False)
    assert r.returncode == 2, _out(r)
    no_traceback(r)
    errors = error_lines(r)
    assert len(errors) == 1 and errors[0].startswith(f"error: {DEP}: doit's dependency file is damaged ("), _out(r)
    assert dep.read_bytes() == damaged
    # a build says it once, sets the file aside and restores every step from the cache: nothing is built
    r = p.doit(check=False)
    assert r.returncode == 0, _out(r)
    no_traceback(r)
    said = [ln for ln in r.stderr.splitlines() if DEP in ln]
    assert len(said) == 1 and said[0].startswith(f"warning: {DEP}: doit's dependency file is damaged"), _out(r)
    assert f"moved aside to {DEP}.damaged" in said[0]
    assert (p.root / f"{DEP}.damaged").read_bytes() == damaged
    assert p.restored() == KILL_STEPS, p.last_build()
    assert p.ran() <= {"prune_artifacts"}
    assert p.artifact_digests() == reference["digests"]
    # the new dependency file is sound: the next build is a no-op that says nothing about it
    r = p.doit()
    assert DEP not in r.stderr
    assert p.with_status("up-to-date") >= KILL_STEPS, p.last_build()


def test_dep_file_killed_mid_transaction_rolls_back(reference, tmp_path):
    """A process killed inside a write transaction of the dependency file (its pages already
    spilled into the file, a hot journal beside it): the next doit rolls the journal back and
    finds every task up to date, as it was before the write began."""
    p = reference["project"].copy(tmp_path / "project")
    dep = p.root / DEP
    before = dep.read_bytes()
    writer = (
        "import os, signal, sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level='DEFERRED')\n"
        "conn.execute('PRAGMA cache_size=2')\n"  # tiny page cache: dirty pages go to the file before commit
        "conn.execute('BEGIN')\n"
        "for (task,) in conn.execute('select task_id from doit').fetchall():\n"
        "    conn.execute('insert or replace into doit values (?, ?)', (task, '{\"x\": \"' + 'y' * 20000 + '\"}'))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", writer, str(dep)], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    journal = p.root / f"{DEP}-journal"
    assert journal.exists() and journal.stat().st_size > 0, "no hot journal: the kill did not land inside the write"
    assert dep.read_bytes() != before, "nothing reached the file before the kill: not a write cut short"
    r = p.doit(check=False)
    assert r.returncode == 0, _out(r)
    no_traceback(r)
    assert DEP not in r.stderr, _out(r)  # nothing to say: sqlite rolled its journal back
    assert p.with_status("up-to-date") >= KILL_STEPS, p.last_build()
    assert not journal.exists()
    assert p.artifact_digests() == reference["digests"]


def test_kill_at_the_end_of_a_build_while_doit_writes_its_dep_file(template, reference, tmp_path):
    """doit writes its dependency file once, after the last task ends and before the summary: SIGKILL right
    when the last step's line appears (the bundle's check; prune_artifacts after it is up to date, which a
    build no longer prints)."""
    p = template.copy(tmp_path / "project")
    proc = popen_doit(p)
    lines = []

    def last(line: str) -> bool:
        return line.split()[1:3] == ["built", "verify_coreml:student"]

    for line in proc.stdout:
        lines.append(line)
        if last(line):
            kill_group(proc)
            break
    out, err = proc.communicate(timeout=60)
    assert any(last(ln) for ln in lines), "".join(lines) + out + err
    assert proc.returncode == -signal.SIGKILL, "the build exited before the kill:\n" + "".join(lines) + out + err
    assert not (p.root / "artifacts" / "last_build.json").exists(), "the kill came after the run's record"
    r = p.doit(check=False)
    assert r.returncode == 0, _out(r)
    no_traceback(r)
    assert DEP not in r.stderr, _out(r)  # the dependency file is never damaged by a kill
    assert p.ran() <= {"prune_artifacts"}, p.last_build()  # every step up to date or restored: none built again
    assert p.artifact_digests() == reference["digests"]
    p.doit()
    assert p.with_status("up-to-date") >= KILL_STEPS, p.last_build()


def _out(r) -> str:
    return f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
