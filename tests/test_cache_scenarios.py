"""The cache in real builds: earlier configurations come back in the time of a copy,
checkouts share it, corrupt entries are rebuilt, and the nightly proves reproducibility."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from faults import STEPS as TINY_STEPS
from scenario import SHAPE_SETS, Project, write_student_checkpoint

S = [f"student.{m}.T{t}" for m in ("prefill", "decode") for t in (16, 32)]


def steps(step, names):
    return {f"{step}:{n}" for n in names}


pytestmark = pytest.mark.spread


@pytest.fixture(scope="module")
def built(scenario_built, tmp_path_factory) -> Project:
    return scenario_built.copy(tmp_path_factory.mktemp("cached") / "project")


@pytest.fixture
def project(built, tmp_path) -> Project:
    return built.copy(tmp_path / "project")


def _switch_checkpoint(p: Project, variant: str):
    write_student_checkpoint(p.root / "checkpoints" / "student.pt", seed={"A": 0, "B": 1}[variant])


def _switch_shape_set(p: Project, variant: str):
    sets = json.loads(json.dumps(SHAPE_SETS))
    if variant == "B":
        sets["tiny"]["prefill"] = [16, 48]
        sets["tiny"]["decode"] = [16, 48]
    p.set_shape_sets(sets)


def _switch_option(p: Project, variant: str):
    p.set_pyproject(precision={"A": "fp16", "B": "fp32"}[variant])


@pytest.mark.parametrize("switch", [_switch_checkpoint, _switch_shape_set, _switch_option],
                         ids=["checkpoint", "shape_set", "coreml_option"])
def test_A_B_A_restores_everything_and_converts_nothing(scenario_built, project, switch):
    switch(project, "B")
    project.doit()
    assert project.ran()  # B is new: something was built
    switch(project, "A")
    project.doit()
    assert project.ran() <= {"prune_artifacts"}  # B's own leaves are removed, nothing is built
    assert project.restored()  # A's artifacts came back from the cache
    assert not any(n.startswith("convert_coreml") for n in project.ran())
    assert project.artifact_digests() == scenario_built.artifact_digests()  # a clean build of A, no cache shared


def test_a_second_checkout_with_empty_artifacts_builds_nothing(built, tmp_path):
    other = Project.create(tmp_path / "checkout2")
    shared = {"MODEL_EXPORT_CACHE": str(built.root / ".cache")}
    other.doit(env=shared)
    assert other.ran() == set()
    assert other.restored() == built.ran()  # every step the first checkout built came from the cache
    assert other.artifact_digests() == built.artifact_digests()


def test_a_corrupt_blob_is_dropped_and_rebuilt(project):
    manifest = json.loads((project.root / "artifacts" / "student" / "coreml" / "prefill_T16.mlpackage.manifest.json").read_text())
    digest = manifest["files"]["Data/com.apple.CoreML/model.mlmodel"]  # this leaf's own (weight.bin is shared)
    blob = project.root / ".cache" / "cas" / digest[:2] / digest
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[0] ^= 0xFF
    blob.write_bytes(bytes(data))
    reference = project.artifact_digests()
    shutil.rmtree(project.root / "artifacts")
    r = project.doit()
    assert "dropped" in r.stderr
    assert "convert_coreml:student.prefill.T16" in project.ran()
    assert project.ran() <= {"convert_coreml:student.prefill.T16"} | {"bundle_coreml:student"}
    assert project.artifact_digests() == reference


def test_nightly_rebuilds_everything_and_proves_it_reproducible(tiny_built, tmp_path):
    # the tiny project (faults.create_tiny: 8 steps, each kind of cached step): a nightly builds every step again
    project = tiny_built.copy(tmp_path / "project")
    r = project.doit("nightly")
    report = json.loads((project.root / "artifacts" / "nightly.json").read_text())
    leaves = {n: t for n, t in report["tasks"].items() if "action_key" in t}  # the cached steps
    assert set(leaves) == TINY_STEPS and all(t["status"] == "built" for t in leaves.values())  # no cache hits
    assert all(t["reproducible"] is True for t in leaves.values())
    assert report["non_reproducible"] == []
    for t in leaves.values():
        assert t["seconds"] >= 0 and t["peak_mb"] > 0 and all(v > 0 for v in t["sizes"].values())
    assert "0 not reproducible" in r.stdout


def test_nightly_names_a_non_reproducible_step_and_file(project):
    # Make the cache claim an earlier build of one step produced other bytes.
    project.doit("nightly", "convert_coreml:student.decode.T32")
    key = json.loads((project.root / "artifacts" / "nightly.json").read_text())["tasks"]["convert_coreml:student.decode.T32"]["action_key"]
    entry = project.root / ".cache" / "ac" / key[:2] / key
    m = json.loads(entry.read_text())
    target = "artifacts/student/coreml/decode_T32.mlpackage.manifest.json"
    m["outputs"][target]["digest"] = "0" * 32
    entry.chmod(0o644)
    entry.write_text(json.dumps(m))
    r = project.doit("nightly", "convert_coreml:student.decode.T32", check=False)
    assert r.returncode == 1
    assert f"NOT REPRODUCIBLE: convert_coreml:student.decode.T32: {target}" in r.stdout
    report = json.loads((project.root / "artifacts" / "nightly.json").read_text())
    assert report["non_reproducible"] == ["convert_coreml:student.decode.T32"]


def test_shared_directory_store_serves_a_machine_with_an_empty_local_cache(tiny_built, tmp_path):
    remote = tmp_path / "share"
    a = tiny_built.copy(tmp_path / "a")  # the tiny project (8 steps): what is published is what is served
    a.doit("nightly", env={"MODEL_EXPORT_REMOTE_CACHE": str(remote)})  # publishes everything to the share
    b = tiny_built.fresh(tmp_path / "b")
    b.doit(env={"MODEL_EXPORT_REMOTE_CACHE": str(remote), "MODEL_EXPORT_CACHE": str(tmp_path / "b-local")})
    assert b.ran() == set()
    assert b.restored() == TINY_STEPS
    assert b.artifact_digests() == tiny_built.artifact_digests()


def test_cache_command_shows_entries_and_hit_rate(project):
    shutil.rmtree(project.root / "artifacts")
    project.doit()
    r = project.doit("cache")
    shown = json.loads(r.stdout)
    assert shown["entries"] > 0 and shown["bytes"] > 0
    assert shown["last_build"]["hit_rate"] == 1.0
    gc = project.doit("cache", "--gc")
    assert json.loads(gc.stdout)["deleted_entries"] == 0  # everything is in use
