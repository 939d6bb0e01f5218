"""Code keys derived from the imports (export/codekey.py), one record per step (export/stepdefs.py).

Unit tests edit every module of a copy of the package and check which step keys move; a
dynamic test runs each real step in a fresh process and checks that every package module it
loaded is in its key; scenario tests edit code in real project copies and build with the
``doit`` console script and ``python -m doit``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.codekey import CodeKeys, closure
from export.models.names import ARCHITECTURE_NAMES
from export.stepdefs import STEPS
from scenario import REPO, Project

ARCH_STEPS = [s.name for s in STEPS.values() if s.runs_model_code]
PAIRS = [(s, a) for s in STEPS for a in (ARCHITECTURE_NAMES if s in ARCH_STEPS else (None,))]


def package_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(REPO / "export", dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def keys(root: Path, index=None) -> dict:
    k = CodeKeys(root=root, index=index)
    return {pair: k.digest(*pair) for pair in PAIRS}


def test_each_module_keys_exactly_the_steps_whose_closure_holds_it(tmp_path):
    root = package_copy(tmp_path)
    from export.codekey import _Index

    index = _Index(None)  # remembers each file by its stat: an edited file is read again, the rest are not
    files = {pair: set(CodeKeys(root=root, index=index).files(*pair)) for pair in PAIRS}
    before = keys(root, index)
    modules = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    in_no_key = []
    for rel in modules:
        f = root / rel
        original = f.read_text()
        f.write_text(original + "\n# an edit\n")
        try:
            after = keys(root, index)
        finally:
            f.write_text(original)
        moved = {pair for pair in PAIRS if after[pair] != before[pair]}
        assert moved == {pair for pair in PAIRS if rel in files[pair]}, rel
        if not moved:
            in_no_key.append(rel)
    # The planner's code keys no step (it runs none); what writes a step's outputs keys it (the manifest
    # writer did not, before keys were derived).
    assert not [rel for pair in PAIRS for rel in files[pair] if rel.startswith("planner/")]
    assert {"planner/tasks.py", "planner/reporter.py", "settings.py"} <= set(in_no_key)
    assert "runner/outputs.py" in files[("convert_coreml", None)] and "runner/outputs.py" in files[("bundle_coreml", None)]
    assert {"coreml/spec.py", "toolchain.py"} <= files[("bundle_coreml", None)]
    assert "export_pytorch.py" in files[("export_onnx", "student")]
    # A model's own code keys its own leaves only.
    assert "models/judge.py" not in files[("export_pytorch", "student")]
    assert "models/student.py" in files[("export_pytorch", "student")]


def test_an_added_import_brings_its_module_into_the_key(tmp_path):
    root = package_copy(tmp_path)
    assert "settings.py" not in CodeKeys(root=root).files("bundle_coreml")
    step = root / "runner" / "steps" / "bundle_coreml.py"
    step.write_text(step.read_text().replace("    from ...coreml.bundle import bundle\n",
                                             "    from ...coreml.bundle import bundle\n    from ... import settings  # noqa\n"))
    assert "settings.py" in CodeKeys(root=root).files("bundle_coreml")
    before = CodeKeys(root=root).digest("bundle_coreml")
    (root / "settings.py").write_text((root / "settings.py").read_text() + "\n# an edit\n")
    assert CodeKeys(root=root).digest("bundle_coreml") != before


def test_keys_follow_the_file_stat_cache(tmp_path):
    """A no-op parses nothing: the second CodeKeys reads every module from the stat cache."""
    from export.digest import StatCache

    root = package_copy(tmp_path)
    for f in root.rglob("*.py"):  # old enough to be trusted by the stat cache
        os.utime(f, (f.stat().st_mtime - 60, f.stat().st_mtime - 60))
    stat = StatCache(tmp_path / "stat.sqlite")
    first = CodeKeys(stat, root=root).digest("convert_coreml")
    import export.codekey as ck

    parsed = []
    real = ck.imports_of
    ck.imports_of = lambda *a: parsed.append(a[0]) or real(*a)
    try:
        assert CodeKeys(StatCache(tmp_path / "stat.sqlite"), root=root).digest("convert_coreml") == first
    finally:
        ck.imports_of = real
    assert parsed == []


# One fresh process imports the libraries the steps use (torch, coremltools and what coremltools imports) and
# none of the package; each step then runs in a child forked from it, so that the package modules in the child's
# sys.modules are exactly those its step loaded, without paying the libraries' import (seconds) once per step.
RUN_AND_LIST = r"""
import importlib, json, os, sys
import torch, coremltools
assert not [n for n in sys.modules if n == "export" or n.startswith("export.")], "the zygote loaded the package"
loaded = []
for mod, kwargs in json.loads(sys.argv[1]):
    out = os.path.join(os.getcwd(), ".modules-run.json")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: a process of its own, the package not yet imported
        code = 1
        try:
            importlib.import_module(mod).run(**kwargs)
            with open(out, "w") as f:
                json.dump(sorted(n for n in sys.modules if n == "export" or n.startswith("export.")), f)
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{mod} failed ({os.waitstatus_to_exitcode(status)})")
    with open(out) as f:
        loaded.append(json.load(f))
    os.remove(out)
print(json.dumps(loaded))
"""


def _modules_run(runs: list[tuple[str, dict]], cwd: Path) -> list[set[str]]:
    """The package modules each of ``runs`` (step, kwargs), run one after the other, loaded."""
    r = subprocess.run([sys.executable, "-c", RUN_AND_LIST, json.dumps([(STEPS[s].module, kw) for s, kw in runs])],
                       cwd=cwd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    return [set(m) for m in json.loads(r.stdout.strip().splitlines()[-1])]


def _as_files(modules: set[str]) -> set[str]:
    out = set()
    for m in modules:
        parts = m.split(".")[1:]
        f = Path(*parts).with_suffix(".py") if parts else Path("__init__.py")
        out.add((f if (REPO / "export" / f).exists() else Path(*parts) / "__init__.py").as_posix())
    return out


def test_every_module_a_real_step_loads_is_in_its_key(tmp_path):
    """Run each step for real, in a fresh process: every package module it loaded is in its closure."""
    ck, out, pkg = tmp_path / "student.pt", tmp_path / "exported", tmp_path / "prefill_T16.mlpackage"
    ran = {
        ("checkpoint", "student"): ("checkpoint", {"out": str(ck), "architecture": "student"}),
        ("export_pytorch", "student"): ("export_pytorch", {
            "checkpoint": str(ck), "out_dir": str(out), "model": "student", "mode": "prefill", "T": 16,
            "formats": ["exported_program"], "dtype": "fp32", "architecture": "student"}),
        ("convert_coreml", None): ("convert_coreml", {
            "exported": str(out / "prefill_T16.pt2"), "contract": str(out / "prefill_T16.contract.json"),
            "out": str(pkg), "options": {"compute_precision": "fp32"}, "weights": str(ck)}),
        ("compress_coreml", None): ("compress_coreml", {
            "package": str(pkg),
            "contract": str(out / "prefill_T16.contract.json"), "out": str(tmp_path / "prefill_T16.int8.mlpackage"),
            "quality": str(tmp_path / "prefill_T16.int8.quality.json"),
            "recipe": {"name": "int8", "parts": {p: {"kind": "quantize", "dtype": "int8", "granularity": "per_channel"}
                                                 for p in ("default", "embeddings", "attention", "ffn", "lm_head")}}}),
        ("verify_coreml", None): ("verify_coreml", {
            "package": str(pkg), "exported": str(out / "prefill_T16.pt2"),
            "contract": str(out / "prefill_T16.contract.json"), "out": str(tmp_path / "prefill_T16.verify.json"),
            "weights": str(ck)}),
        ("bundle_coreml", None): ("bundle_coreml", {
            "packages": [str(pkg)], "contracts": [str(out / "prefill_T16.contract.json")],
            "out": str(tmp_path / "student.mlpackage"), "contract_out": str(tmp_path / "contract.json")}),
    }
    keys = CodeKeys()
    runs = _modules_run(list(ran.values()), tmp_path)
    assert len(runs) == len(ran)
    for ((step, arch), _), modules in zip(ran.items(), runs):
        loaded = _as_files(modules)
        assert f"runner/steps/{step}.py" in loaded  # the step's own module: what it loaded was recorded
        missing = loaded - set(keys.files(step, arch))
        assert not missing, f"{step} ran modules its key does not cover: {sorted(missing)}"


def test_closure_of_a_module_that_is_not_there_is_empty():
    assert closure("export.no_such_module") == {}


# --- through doit ----------------------------------------------------------------------------------

DOIT_SCRIPT = Path(sys.executable).with_name("doit")


def doit_script(p: Project, *args, pythonpath: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    """The ``doit`` console script, as ``./dev build`` runs it (the project first on PYTHONPATH)."""
    env = p.env({"PYTHONPATH": str(p.root)} if pythonpath else {})
    if not pythonpath:
        env.pop("PYTHONPATH", None)
    r = subprocess.run([str(DOIT_SCRIPT), *args], cwd=p.root, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def edit_the_manifest_writer(root: Path) -> None:
    outputs = root / "export" / "runner" / "outputs.py"
    outputs.write_text(outputs.read_text().replace('body = {"package": package.name,',
                                                   'body = {"written_by": "an edited writer", "package": package.name,'))


@pytest.fixture(scope="module")
def edited_cold(tiny_built, tmp_path_factory) -> dict[str, str]:
    """The artifact digests of a cold build (no artifacts, no state, an empty cache) of the run's tiny project
    (faults.create_tiny: one student at T16, both modes) with the edited manifest writer: what both runners'
    incremental builds below must give."""
    cold = tiny_built.fresh(tmp_path_factory.mktemp("codekeys-cold") / "project")
    edit_the_manifest_writer(cold.root)
    cold.doit()
    return cold.artifact_digests()


@pytest.mark.parametrize("runner", ["python -m doit", "doit"])
def test_editing_the_manifest_writer_rebuilds_its_steps_and_matches_a_cold_build(tiny_built, edited_cold, tmp_path,
                                                                                  runner):
    """The finding of the keys issue: a change to how manifests are written must rebuild them."""
    p = tiny_built.copy(tmp_path / "project")
    build = (lambda: p.doit()) if runner == "python -m doit" else (lambda: doit_script(p))
    edit_the_manifest_writer(p.root)
    build()
    converts = {"convert_coreml:student.prefill.T16", "convert_coreml:student.decode.T16"}
    verifies = {"verify_coreml:" + c.split(":")[1] for c in converts} | {"verify_coreml:student"}
    assert p.ran() == converts | {"bundle_coreml:student"} | verifies
    manifest = p.root / "artifacts" / "student" / "coreml" / "prefill_T16.mlpackage.manifest.json"
    assert json.loads(manifest.read_text())["written_by"] == "an edited writer"
    assert p.artifact_digests() == edited_cold
    build()
    assert p.ran() == set() and p.restored() == set()


@pytest.mark.parametrize("runner", ["python -m doit", "doit"])
def test_editing_a_model_module_reexports_that_architecture_only(scenario_built, tmp_path, runner):
    p = scenario_built.copy(tmp_path / "project")  # a student and the judge, built
    judge = p.root / "export" / "models" / "judge.py"
    judge.write_text(judge.read_text() + "\n# a comment: new code key, same bytes\n")
    (lambda: p.doit())() if runner == "python -m doit" else doit_script(p)
    # Same bytes: early cutoff stops at the export.
    assert p.ran() == {"checkpoint:judge", "export_pytorch:judge.prefill.T16", "export_pytorch:judge.prefill.T32"}


def test_the_console_script_refuses_another_checkouts_code(tiny_built, tmp_path):
    """doit (the console script) imports ``export`` from where the venv was installed; in another
    checkout that is not the code beside dodo.py, and the build stops before anything runs."""
    p = tiny_built.copy(tmp_path / "project")
    r = doit_script(p, pythonpath=False, check=False)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr
    assert str(p.root / "export") in lines[0] and str(REPO / "export") in lines[0] and "python -m doit" in lines[0]
    assert "Traceback" not in r.stderr


def test_dev_build_in_a_second_checkout_builds_with_its_own_code(tmp_path):
    """A second checkout sharing the virtual environment: ``./dev build`` plans with the export/ beside its
    dodo.py (the console script alone would refuse: see above)."""
    venv = Path(sys.executable).parents[1]
    if not (venv / "pyvenv.cfg").exists():
        pytest.skip("the tests do not run in a virtual environment")
    second = tmp_path / "second"
    second.mkdir()
    for name in ("dodo.py", "dev", "pyproject.toml", "requirements.lock", "shape_sets.json"):
        shutil.copy2(REPO / name, second / name)
    shutil.copytree(REPO / "export", second / "export", ignore=shutil.ignore_patterns("__pycache__"))
    (second / ".venv").symlink_to(venv)
    if (REPO / ".venv").resolve() != venv.resolve():  # ./dev would set up a venv of its own
        pytest.skip("the tests do not run in the repository's .venv")
    import hashlib

    stamp = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + (REPO / "requirements.lock").read_bytes()).hexdigest()
    installed = venv / ".installed"
    if not installed.exists() or installed.read_text().strip() != stamp:  # ./dev would reinstall the shared venv
        pytest.skip("the .venv is not set up from this tree's pyproject.toml and requirements.lock (./dev setup)")
    step = second / "export" / "runner" / "steps" / "bundle_coreml.py"
    step.write_text(step.read_text() + "\n# this checkout's own code\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(["./dev", "build", "plan", "--json"], cwd=second, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    keys = CodeKeys(root=second / "export")
    assert keys.digest("bundle_coreml") != CodeKeys().digest("bundle_coreml")
    # `plan` is one of the project's commands: the console script imports it from the installed package.
    r = subprocess.run([str(venv / "bin" / "doit"), "plan"], cwd=second, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and str(second / "export") in r.stderr, r.stdout + r.stderr
