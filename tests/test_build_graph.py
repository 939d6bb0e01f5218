"""Scenario tests of the doit graph: each edits a real project and asserts the
exact set of tasks that ran. Builds are real: real exports, real conversions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults import STEPS as TINY_STEPS
from faults import wait_for_path
from scenario import SHAPE_SETS, Project, write_student_checkpoint

pytestmark = pytest.mark.spread


def leaves(model: str, modes, Ts) -> list[str]:
    return [f"{model}.{m}.T{t}" for m in modes for t in Ts]


S = leaves("student", ("prefill", "decode"), (16, 32))
J = leaves("judge", ("prefill",), (16, 32))


def steps(step: str, names) -> set[str]:
    return {f"{step}:{n}" for n in names}


BUNDLES = {"bundle_coreml:student", "bundle_coreml:judge"}
VERIFY_BUNDLES = {"verify_coreml:student", "verify_coreml:judge"}
EVERYTHING = ({"checkpoint:judge"} | steps("export_pytorch", S + J) | steps("convert_coreml", S + J) | BUNDLES
              | steps("verify_coreml", S + J) | VERIFY_BUNDLES)
# Tests whose behaviour needs a build, not the two models or the two T, take the tiny project (faults.create_tiny:
# one student at T16, both modes; 8 steps instead of the scenario's 23) and the run's shared tiny_built.
TINY_CONVERTS = {s for s in TINY_STEPS if s.startswith("convert_coreml:")}


@pytest.fixture(scope="module")
def built(scenario_built, tmp_path_factory) -> Project:
    """A project after one cold build (scenario 1's first half): a copy of the run's shared one."""
    return scenario_built.copy(tmp_path_factory.mktemp("built") / "project")


@pytest.fixture
def project(built, tmp_path) -> Project:
    return built.copy(tmp_path / "project")


def test_cold_build_builds_everything_then_nothing_without_torch(built, tmp_path):
    assert built.ran() == EVERYTHING
    r = built.doit(python_args=("-X", "importtime"))
    assert built.ran() == set()
    assert set(built.last_build().values()) == {"up-to-date"}
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "coremltools" not in imported
    assert "doit" in imported  # the import log was really read


def test_adding_a_T_builds_only_its_leaves_and_removing_it_builds_none(project):
    sets = json.loads(json.dumps(SHAPE_SETS))
    sets["tiny"]["prefill"].append(64)
    sets["tiny"]["decode"].append(64)
    project.set_shape_sets(sets)
    project.doit()
    new = leaves("student", ("prefill", "decode"), (64,))
    assert project.ran() == (steps("export_pytorch", new) | steps("convert_coreml", new) | steps("verify_coreml", new)
                             | {"bundle_coreml:student", "verify_coreml:student"})
    project.set_shape_sets(SHAPE_SETS)
    project.doit()
    assert project.ran() == {"prune_artifacts"}  # the T=64 artifacts are removed: nothing stale is left
    # the earlier bundle and its verdict come back from the cache
    assert project.restored() == {"bundle_coreml:student", "verify_coreml:student"}
    assert not list((project.root / "artifacts" / "student").rglob("*_T64*"))


def test_touching_the_checkpoint_builds_nothing(project):
    ck = project.root / "checkpoints" / "student.pt"
    later = time.time() + 5
    os.utime(ck, (later, later))
    project.doit()
    assert project.ran() == set()


def test_new_weights_rebuild_that_model_only(project):
    write_student_checkpoint(project.root / "checkpoints" / "student.pt", seed=1)
    project.doit()
    assert project.ran() == (steps("export_pytorch", S) | steps("convert_coreml", S) | steps("verify_coreml", S)
                             | {"bundle_coreml:student", "verify_coreml:student"})


def test_a_coreml_option_reconverts_without_reexporting(project):
    project.set_pyproject(precision="fp32")
    project.doit()
    assert project.ran() == (steps("convert_coreml", S) | steps("verify_coreml", S)
                             | {"bundle_coreml:student", "verify_coreml:student"})


def test_export_code_change_with_equal_bytes_stops_at_the_exports(project):
    code = project.root / "export" / "export_pytorch.py"
    code.write_text(code.read_text() + "\n# a comment changes the code digest, not the exported bytes\n")
    project.doit()
    assert project.ran() == steps("export_pytorch", S + J)


def test_targeted_build_runs_one_T_and_its_prerequisites(built, tmp_path):
    p = Project.create(tmp_path / "cold")
    p.doit("convert_coreml:T32")
    t32 = [n for n in S + J if n.endswith(".T32")]
    assert p.ran() == {"checkpoint:judge"} | steps("export_pytorch", t32) | steps("convert_coreml", t32)


@pytest.mark.parametrize("damage", ["delete", "edit"])
def test_damaged_package_rebuilds_that_leaf_only(built, project, damage):
    pkg = project.root / "artifacts" / "student" / "coreml" / "decode_T16.mlpackage"
    victim = max((f for f in pkg.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    if damage == "delete":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    project.doit()
    # The damaged leaf, and nothing else, is redone: restored from the cache (the entry is intact).
    assert project.ran() | project.restored() == {"convert_coreml:student.decode.T16"}
    assert project.artifact_digests() == built.artifact_digests()


def test_new_coremltools_version_reconverts_and_reexports_nothing(tiny_built, tmp_path):
    from importlib import metadata

    project = tiny_built.copy(tmp_path / "project")

    fake = tmp_path / "fake-metadata"
    info = fake / f"coremltools-{metadata.version('coremltools')}.post1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: coremltools\nVersion: {metadata.version('coremltools')}.post1\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    project.doit(env=env)
    assert project.ran() == {s for s in TINY_STEPS if not s.startswith("export_pytorch:")}
    assert project.artifact_digests().keys() == tiny_built.artifact_digests().keys()


def test_two_builds_started_together_end_correct(tiny_built, tmp_path):
    p = tiny_built.fresh(tmp_path / "race")
    procs = [subprocess.Popen([sys.executable, "-m", "doit"], cwd=p.root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=p.env()) for _ in range(2)]
    outs = [proc.communicate(timeout=900) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert any("waiting for another doit" in err for _, err in outs)
    p.doit()
    assert p.ran() == set()
    assert p.artifact_digests() == tiny_built.artifact_digests()


def test_parallel_build_gives_the_same_artifacts(built, tmp_path):
    p = Project.create(tmp_path / "parallel")
    p.doit("-n", "2")
    assert p.ran() == EVERYTHING
    assert p.artifact_digests() == built.artifact_digests()


def test_a_killed_worker_fails_its_step_only(tiny_built, tmp_path):
    """SIGKILL the worker (as the OOM killer would) in the middle of a step: that task fails with
    its log, doit goes on with the rest (--continue), and the next build completes correctly."""
    import psutil

    p = tiny_built.fresh(tmp_path / "crash")
    proc = subprocess.Popen([sys.executable, "-m", "doit", "--continue"], cwd=p.root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=p.env())
    victim = None
    if wait_for_path(proc, p.root, ".export/logs/convert_coreml*", timeout=600):  # a conversion has begun
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)]
        if workers:
            victim = workers[0]
            victim.kill()
    out, err = proc.communicate(timeout=900)
    assert victim is not None, "no worker was seen converting"
    assert proc.returncode != 0
    assert "the worker died during the step" in out + err
    assert "Traceback" not in err
    failed = {n for n, s in p.last_build().items() if s == "failed"}
    assert len(failed) == 1 and failed <= TINY_CONVERTS
    assert {n for n, s in p.last_build().items() if s == "built"}  # the rest of the build went on
    p.doit()
    assert failed <= p.ran()
    assert p.artifact_digests() == tiny_built.artifact_digests()


def test_a_small_memory_budget_runs_the_leaves_one_at_a_time(tiny_built, tmp_path):
    """With a budget smaller than any step needs, doit -n 2 still builds everything, one step at a time."""
    p = tiny_built.fresh(tmp_path / "budget")
    r = p.doit("-n", "2", env={"MODEL_EXPORT_MEMORY_BUDGET_MB": "1"})
    assert p.ran() == TINY_STEPS
    records = json.loads((p.root / "artifacts" / "last_build.json").read_text())["tasks"]
    spans = sorted((rec["started"], rec["ended"]) for rec in records.values() if "started" in rec)
    assert len(spans) == len(TINY_STEPS)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, "two steps held memory at once"
    assert "waiting for memory" in r.stderr
    assert p.artifact_digests() == tiny_built.artifact_digests()


def test_every_package_is_verified_and_a_failure_stops_its_bundle(built, project):
    """verify_coreml runs every leaf package in the reference interpreter against its ExportedProgram, and each
    bundle function against its leaf; the verdicts reach last_build.json and the report. A leaf that fails its
    verification fails with one line naming the output and its error, and its bundle does not run."""
    art = project.root / "artifacts"
    for name in S + J:  # the cold build's verdicts
        model, mode, T = name.split(".")
        verdict = json.loads((art / model / "coreml" / f"{mode}_{T}.verify.json").read_text())
        assert verdict["ok"] and ("logits" in verdict["outputs"] or "score" in verdict["outputs"])
        assert all(o["ok"] for o in verdict["outputs"].values())
    bundle_verdict = json.loads((art / "student" / "student.verify.json").read_text())
    assert set(bundle_verdict["functions"]) == {f"{m}_T{t}" for m in ("prefill", "decode") for t in (16, 32)}

    # break the interpreter's silu (the student uses it, the judge does not): the student's leaves fail
    code = project.root / "export" / "coreml" / "interpreter.py"
    src = code.read_text()
    assert "    return x / (1.0 + np.exp(-x))\n" in src
    code.write_text(src.replace("    return x / (1.0 + np.exp(-x))\n", "    return 2 * x / (1.0 + np.exp(-x))\n", 1))
    r = project.doit("--continue", check=False)
    assert r.returncode != 0
    status = project.last_build()
    assert {n for n, s in status.items() if s == "failed"} == steps("verify_coreml", S)
    assert status["bundle_coreml:student"] == "not-run" and status["verify_coreml:student"] == "not-run"
    assert steps("verify_coreml", J) <= project.ran()
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "decode_T16.mlpackage: verify:" in ln]
    assert lines and "logits: max abs error" in lines[0] and "relative" in lines[0], r.stdout + r.stderr
    # the judge's leaves ran again (the verify code changed) and passed: their verdicts are in the record and report
    record = json.loads((art / "last_build.json").read_text())["tasks"]
    assert all(record[f"verify_coreml:{n}"]["verdict"]["ok"] for n in J)
    report = {r["task"]: r for r in json.loads((art / "report.json").read_text())["tasks"]}
    assert report["verify_coreml:judge.prefill.T16"]["verdict"]["outputs"]["score"]["ok"]
