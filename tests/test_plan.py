"""``doit plan`` and ``doit why`` against real builds: for every scenario of the graph suite
(test_build_graph.py), plan before the build, then build, and compare the plan's verdict of every
task with the status the build recorded in last_build.json. Each scenario also pins the verdicts
themselves and the reasons' text (the field, file or tool that changed)."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from filelock import FileLock

from scenario import SHAPE_SETS, Project, write_student_checkpoint

S = [f"student.{m}.T{t}" for m in ("prefill", "decode") for t in (16, 32)]
J = [f"judge.prefill.T{t}" for t in (16, 32)]
BUNDLES = {"bundle_coreml:student", "bundle_coreml:judge"}
VERIFY_BUNDLES = {"verify_coreml:student", "verify_coreml:judge"}

# What the build may record for each verdict: a plan that says "build" and then restores is wrong.
AGREES = {
    "up-to-date": {"up-to-date"},
    "restore": {"restored"},
    "build": {"built"},
    "run": {"built", "restored"},
    "may-run": {"built", "restored", "up-to-date"},
}


def steps(step: str, names) -> set[str]:
    return {f"{step}:{n}" for n in names}


def plan(p: Project, *args: str, env: dict | None = None) -> dict[str, dict]:
    r = p.doit("plan", "--json", *args, env=env)
    return {t["task"]: t for t in json.loads(r.stdout)["tasks"]}


def verdicts(planned: dict[str, dict], verdict: str) -> set[str]:
    return {n for n, t in planned.items() if t["verdict"] == verdict}


def reasons(planned: dict[str, dict], task: str) -> str:
    return "\n".join(r["text"] for r in planned[task]["reasons"])


def plan_then_build(p: Project, *args: str, env: dict | None = None) -> dict[str, dict]:
    """Plan, build, and check that the build did what the plan said, task by task."""
    planned = plan(p, *args, env=env)
    p.doit(*args, env=env)
    done = p.last_build()
    assert set(planned) == set(done), "plan and build disagree on which tasks take part"
    wrong = {n: (t["verdict"], done[n]) for n, t in planned.items() if done[n] not in AGREES[t["verdict"]]}
    assert not wrong, f"plan -> build: {wrong}"
    return planned


pytestmark = pytest.mark.spread


@pytest.fixture(scope="module")
def built(scenario_built, tmp_path_factory):
    """A project after one cold build, and the plan made before it (the run's shared cold build,
    checked here as plan_then_build checks: the build did what the plan said, task by task)."""
    cold = {t["task"]: t for t in scenario_built.plan["tasks"]}
    p = scenario_built.copy(tmp_path_factory.mktemp("planned") / "project")
    done = p.last_build()
    assert set(cold) == set(done), "plan and build disagree on which tasks take part"
    wrong = {n: (t["verdict"], done[n]) for n, t in cold.items() if done[n] not in AGREES[t["verdict"]]}
    assert not wrong, f"plan -> build: {wrong}"
    return p, cold


@pytest.fixture
def project(built, tmp_path) -> Project:
    return built[0].copy(tmp_path / "project")


def test_cold_build_plan_then_no_op(built):
    p, cold = built
    assert verdicts(cold, "build") == {"checkpoint:judge"} | steps("export_pytorch", S)  # inputs on disk, cache empty
    # the rest waits on bytes not made yet: "will run (after ...)"
    assert verdicts(cold, "run") == (steps("export_pytorch", J) | steps("convert_coreml", S + J) | BUNDLES
                                     | steps("verify_coreml", S + J) | VERIFY_BUNDLES)
    assert cold["export_pytorch:judge.prefill.T16"]["after"] == ["checkpoint:judge"]
    assert "never built here" in reasons(cold, "export_pytorch:student.prefill.T16")
    again = plan(p)
    assert {t["verdict"] for n, t in again.items()} == {"up-to-date"}
    r = p.doit("plan", python_args=("-X", "importtime"))
    assert r.stdout.strip().splitlines()[-1] == f"plan: {len(again)} up-to-date"
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "doit" in imported and "torch" not in imported and "coremltools" not in imported


def test_adding_then_removing_a_T(project):
    sets = json.loads(json.dumps(SHAPE_SETS))
    for mode in ("prefill", "decode"):
        sets["tiny"][mode].append(64)
    project.set_shape_sets(sets)
    added = plan_then_build(project)
    new = [f"student.{m}.T64" for m in ("prefill", "decode")]
    assert verdicts(added, "build") == steps("export_pytorch", new)
    assert verdicts(added, "run") == (steps("convert_coreml", new) | {"bundle_coreml:student"} | steps("verify_coreml", new)
                                      | {"verify_coreml:student"})
    said = reasons(added, "bundle_coreml:student")
    assert ('config config.functions: ["prefill_T16", "prefill_T32", "decode_T16", "decode_T32"] -> '
            '["prefill_T16", "prefill_T32", "prefill_T64", "decode_T16", "decode_T32", "decode_T64"]') in said
    project.set_shape_sets(SHAPE_SETS)
    removed = plan_then_build(project)
    # the cache holds the earlier bundle and its verdict
    assert verdicts(removed, "restore") == {"bundle_coreml:student", "verify_coreml:student"}
    assert "config config.functions" in reasons(removed, "bundle_coreml:student")
    assert "the cache holds action" in reasons(removed, "bundle_coreml:student")


def test_touching_the_checkpoint_plans_nothing(project):
    ck = project.root / "checkpoints" / "student.pt"
    later = time.time() + 5
    os.utime(ck, (later, later))
    planned = plan_then_build(project)
    assert {t["verdict"] for t in planned.values()} == {"up-to-date"}


def test_new_weights_name_the_checkpoint_and_early_cutoff_is_may_run(project):
    write_student_checkpoint(project.root / "checkpoints" / "student.pt", seed=1)
    planned = plan_then_build(project)
    assert verdicts(planned, "build") == steps("export_pytorch", S)
    assert verdicts(planned, "may-run") == (steps("convert_coreml", S) | {"bundle_coreml:student"}
                                            | steps("verify_coreml", S) | {"verify_coreml:student"})
    text = reasons(planned, "export_pytorch:student.decode.T32")
    assert "input checkpoints/student.pt: " in text and " -> " in text
    assert planned["convert_coreml:student.decode.T32"]["after"] == ["export_pytorch:student.decode.T32"]
    assert project.ran() == (steps("export_pytorch", S) | steps("convert_coreml", S) | {"bundle_coreml:student"}
                             | steps("verify_coreml", S) | {"verify_coreml:student"})


def test_a_coreml_option_names_the_field(project):
    project.set_pyproject(precision="fp32")
    planned = plan_then_build(project)
    assert verdicts(planned, "build") == steps("convert_coreml", S)
    assert verdicts(planned, "may-run") == {"bundle_coreml:student", "verify_coreml:student"} | steps("verify_coreml", S)
    assert 'config config.options.compute_precision: "fp16" -> "fp32"' in reasons(planned, "convert_coreml:student.prefill.T16")


def test_export_code_change_names_the_file_and_early_cutoff_holds(project):
    code = project.root / "export" / "export_pytorch.py"
    code.write_text(code.read_text() + "\n# a comment changes the code digest, not the exported bytes\n")
    planned = plan_then_build(project)
    assert verdicts(planned, "build") == steps("export_pytorch", S + J)
    assert verdicts(planned, "may-run") == (steps("convert_coreml", S + J) | BUNDLES | steps("verify_coreml", S + J)
                                            | VERIFY_BUNDLES)
    assert "code of step export_pytorch changed: export/export_pytorch.py" in reasons(planned, "export_pytorch:judge.prefill.T16")
    assert project.ran() == steps("export_pytorch", S + J)  # and the may-runs stayed up to date


def test_fresh_checkout_with_a_warm_cache_plans_restores_through_the_graph(project):
    """No artifacts, no dependency file, the cache full: every input digest downstream of a restore
    is known from the cache entry, so the plan says restore all the way down (targeted at T32)."""
    shutil.rmtree(project.root / "artifacts")
    shutil.rmtree(project.root / ".export")
    planned = plan_then_build(project, "convert_coreml:T32")
    t32 = [n for n in S + J if n.endswith(".T32")]
    assert set(planned) == {"checkpoint:judge"} | steps("export_pytorch", t32) | steps("convert_coreml", t32)
    assert verdicts(planned, "restore") == set(planned)


def test_targeted_cold_build_plans_one_T(project):
    for d in ("artifacts", ".export", ".cache"):
        shutil.rmtree(project.root / d)
    planned = plan_then_build(project, "convert_coreml:T32")
    t32 = [n for n in S + J if n.endswith(".T32")]
    assert set(planned) == {"checkpoint:judge"} | steps("export_pytorch", t32) | steps("convert_coreml", t32)
    assert verdicts(planned, "build") == {"checkpoint:judge"} | steps("export_pytorch", [n for n in t32 if n.startswith("student")])


@pytest.mark.parametrize("damage", ["delete", "edit"])
def test_damaged_package_plans_one_restore(project, damage):
    pkg = project.root / "artifacts" / "student" / "coreml" / "decode_T16.mlpackage"
    victim = max((f for f in pkg.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    if damage == "delete":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    planned = plan_then_build(project)
    assert {n for n, t in planned.items() if t["verdict"] != "up-to-date"} == {"convert_coreml:student.decode.T16"}
    assert planned["convert_coreml:student.decode.T16"]["verdict"] == "restore"
    said = reasons(planned, "convert_coreml:student.decode.T16")
    assert "output artifacts/student/coreml/decode_T16.mlpackage was modified" in said  # a file in it went or changed
    assert planned["bundle_coreml:student"]["verdict"] == "up-to-date"  # the restored bytes are the recorded ones


def test_new_coremltools_version_names_the_tool(tiny_built, tmp_path):
    from importlib import metadata

    from faults import STEPS as TINY_STEPS

    project = tiny_built.copy(tmp_path / "project")  # the tiny project (8 steps): one student at T16, both modes
    tiny = lambda step: {s for s in TINY_STEPS if s.startswith(step + ":")}  # noqa: E731

    v = metadata.version("coremltools")
    fake = tmp_path / "fake-metadata"
    info = fake / f"coremltools-{v}.post1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: coremltools\nVersion: {v}.post1\n")
    env = {"PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    planned = plan_then_build(project, env=env)
    assert verdicts(planned, "build") == tiny("convert_coreml")
    # their own key changed too, and their inputs come later
    assert verdicts(planned, "run") == tiny("bundle_coreml") | tiny("verify_coreml")
    assert f"tool version coremltools: {v} -> {v}.post1" in reasons(planned, "bundle_coreml:student")


def test_plan_writes_nothing_and_takes_no_lock(project):
    project.set_pyproject(precision="fp32")
    shutil.rmtree(project.root / "artifacts" / "student" / "coreml" / "prefill_T16.mlpackage")

    def state():
        out = {}
        for top in (".export", ".cache", "artifacts"):
            for f in sorted((project.root / top).rglob("*")):
                if f.name.endswith("-shm"):  # SQLite's shared-memory index of a WAL file: every reader touches it
                    continue
                st = f.lstat()
                out[str(f)] = (st.st_size, st.st_mtime_ns, f.read_bytes() if f.is_file() and st.st_size < 1 << 20 else None)
        return out

    before = state()
    with FileLock(str(project.root / ".export" / "lock")):  # a build holds the lock: plan does not wait
        r = project.doit("plan", env={"MODEL_EXPORT_LOCK_WAIT": "0"})
        w = project.doit("why", "convert_coreml:student.prefill.T16", env={"MODEL_EXPORT_LOCK_WAIT": "0"})
    assert r.stdout.strip().splitlines()[-1] == "plan: 14 up-to-date, 4 build, 6 may-run"
    assert state() == before
    assert "convert_coreml:student.prefill.T16: will build (not in the cache)" in w.stdout
    assert "output artifacts/student/coreml/prefill_T16.mlpackage is missing" in w.stdout


def test_why_follows_the_change_upstream(project):
    project.set_pyproject(precision="fp32")
    r = project.doit("why", "bundle_coreml:student")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("bundle_coreml:student: may run after convert_coreml:student.")
    assert "    convert_coreml:student.decode.T16: will build (not in the cache)" in lines
    assert '        - config config.options.compute_precision: "fp16" -> "fp32"' in lines
    r = project.doit("why", "export_pytorch:student.decode.T16")
    assert r.stdout.startswith("export_pytorch:student.decode.T16: up to date")
