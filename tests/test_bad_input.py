"""Bad input, case by case, on a copy of a built tiny project (docs/architecture.md: bad input):
one clear ``error:`` line naming the file and the field, a non-zero exit, no
traceback, and nothing lost: the artifacts and the cache are the same bytes
before and after. Cache entries that are damaged are dropped and rebuilt instead.

Each case is a row of ``CASES``: (id, how to break the project, expected file
substring, expected field substring). A breaker edits the project in place and
returns None (run ``doit``) or the argv of a module CLI to run in the project.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from faults import TINY_SETS, TINY_TOML, error_lines, no_traceback, snapshot
from scenario import STUDENT, Project, project_toml

MARKER = "PWNED-marker"  # a file the malicious pickle would create if it ever ran

# --- breakers ---------------------------------------------------------------


def toml(text: str):
    """Replace the pipeline config by ``text``."""
    def brk(p: Project):
        (p.root / "pyproject.toml").write_text(project_toml(text, name="faults"))
    return brk


def edit_toml(old: str, new: str):
    def brk(p: Project):
        f = p.root / "pyproject.toml"
        text = f.read_text()
        assert old in text, old
        f.write_text(text.replace(old, new, 1))
    return brk


def add_model_key(line: str):
    return edit_toml('shape_set = "tiny"\n', f'shape_set = "tiny"\n{line}\n')


def dev_build(brk):
    """Break the project with ``brk``, then run ``./dev build`` (a copy of the repository's script) in it."""
    def run(p: Project):
        brk(p)
        import shutil

        from scenario import REPO

        shutil.copy(REPO / "dev", p.root / "dev")
        return ["bash", "dev", "build"]
    return run


def sets_text(text: str):
    def brk(p: Project):
        (p.root / "shape_sets.json").write_text(text)
    return brk


def sets(data):
    return sets_text(json.dumps(data))


def tiny_T(ts):
    return sets({"tiny": {"prefill": ts, "decode": [16]}})


CK = "checkpoints/student.pt"


def ck_bytes(fn):
    def brk(p: Project):
        f = p.root / CK
        f.write_bytes(fn(f.read_bytes()))
    return brk


def ck_python(code: str, path: str = CK):
    """Write the checkpoint with a snippet of Python (torch imported, ``out`` the path, STUDENT the config)."""
    def brk(p: Project):
        full = (f"import torch, json, pickle, os\nout = {str(p.root / path)!r}\nSTUDENT = {STUDENT!r}\n"
                f"from export import checkpoint\n{code}")
        subprocess.run([sys.executable, "-c", full], check=True, cwd=p.root, env={**os.environ, "PYTHONPATH": str(p.root)})
    return brk


def payload_edit(code: str):
    """Load the real checkpoint's payload as ``obj``, run ``code`` on it, save it back."""
    return ck_python(f"obj = torch.load(out, weights_only=True)\n{code}\ntorch.save(obj, out)")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def evil_pickle(p: Project):
    (p.root / CK).write_bytes(pickle.dumps({"format": "model-export-checkpoint", "x": _Evil()}, protocol=2))


def evil_torch_zip(p: Project):
    """A real torch.save zip whose data.pkl builds an object that runs a command."""
    code = (f"class E:\n    def __reduce__(self):\n        return (os.system, ('touch {MARKER}',))\n"
            "torch.save({'format': 'model-export-checkpoint', 'version': 1, 'architecture': 'student', 'x': E()}, out)")
    ck_python(code)(p)


def safetensors_checkpoint(header_fn):
    """Point the model at a .safetensors checkpoint whose header is rewritten by ``header_fn``."""
    def brk(p: Project):
        st = "checkpoints/student.safetensors"
        ck_python("from export.models.registry import get\nfrom export.models.common import config_from_dict\n"
                  "arch = get('student'); cfg = config_from_dict(arch.config_cls, STUDENT)\n"
                  "checkpoint.save(out, 'student', cfg, arch.build(cfg).state_dict())", path=st)(p)
        f = p.root / st
        data = f.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        header_fn(header)
        text = json.dumps(header).encode()
        f.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
        edit_toml(f'checkpoint = "{CK}"', f'checkpoint = "{st}"')(p)
    return brk


def lie_offsets(h):
    name = next(k for k in h if k != "__metadata__")
    h[name]["data_offsets"] = [0, 10**9]


def lie_shape(h):
    name = next(k for k in h if k != "__metadata__")
    h[name]["shape"] = [7, 7, 7]


def safetensors_header_length_lies(p: Project):
    safetensors_checkpoint(lambda h: None)(p)
    f = p.root / "checkpoints/student.safetensors"
    f.write_bytes((10**12).to_bytes(8, "little") + f.read_bytes()[8:])


def module_cli(damage, *, fmt_in: str = "prefill_T16.pt2"):
    """Copy the built export and contract of prefill T=16 to bad/, damage them there, and run the
    converter's CLI on them (the exported files and contracts are inputs of the module CLIs)."""
    def brk(p: Project):
        src = p.root / "artifacts" / "student" / "exported"
        bad = p.root / "bad"
        bad.mkdir()
        for name in (fmt_in, "prefill_T16.contract.json"):
            (bad / name).write_bytes((src / name).read_bytes())
        damage(bad)
        # the build's programs keep their weights in the checkpoint (export/program_weights.py)
        weights = ["--weights", "checkpoints/student.pt"] if fmt_in.endswith(".pt2") else []
        return [sys.executable, "-m", "export.convert_coreml", "--backend", "pytorch", "--in", f"bad/{fmt_in}",
                "--out", "bad/out.mlpackage", "--contract", "bad/prefill_T16.contract.json", *weights]
    return brk


def contract_edit(fn):
    def damage(bad: Path):
        f = bad / "prefill_T16.contract.json"
        c = json.loads(f.read_text())
        fn(c)
        f.write_text(json.dumps(c))
    return damage


def flip_middle(path_in_bad: str):
    def damage(bad: Path):
        f = bad / path_in_bad
        data = bytearray(f.read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        f.write_bytes(bytes(data))
    return damage


def truncate(path_in_bad: str):
    def damage(bad: Path):
        f = bad / path_in_bad
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    return damage


def set_key(path, value):
    def fn(c):
        d = c
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return fn


M0 = "tool.export.models[0]"
PY = "pyproject.toml"
SETS = "shape_sets.json"
SINGLE = TINY_TOML

CASES = [
    # --- the config (pyproject.toml) ---
    # doit parses pyproject.toml before any code of ours runs (DoitMain.__init__ in doit 0.37), so a
    # TOML syntax error is caught by `./dev build`, the README's command, before it starts doit.
    ("config-not-toml", dev_build(edit_toml("[tool.export]", "[tool.export")), PY, "not valid TOML"),
    # an artifacts folder holding the project's own files, or outside the project (issue #20)
    ("config-artifacts-in-package", edit_toml('artifacts = "artifacts"', 'artifacts = "export"'), PY, "tool.export.artifacts"),
    ("config-artifacts-project-root", edit_toml('artifacts = "artifacts"', 'artifacts = "."'), PY, "tool.export.artifacts"),
    ("config-artifacts-absolute-outside", edit_toml('artifacts = "artifacts"', 'artifacts = "/tmp/model-export-artifacts"'), PY, "tool.export.artifacts"),
    ("config-artifacts-dotdot", edit_toml('artifacts = "artifacts"', 'artifacts = "../elsewhere"'), PY, "tool.export.artifacts"),
    ("config-artifacts-holds-checkpoints", edit_toml('artifacts = "artifacts"', 'artifacts = "checkpoints"'), PY, "checkpoint"),
    ("config-artifacts-state-folder", edit_toml('artifacts = "artifacts"', 'artifacts = ".export/out"'), PY, "tool.export.artifacts"),
    # combinations that cannot build, found before any step runs (issue #20)
    ("config-compression-below-ios18", add_model_key('coreml = { compression = "palettize" }'), PY, f"{M0}.coreml.compression"),
    ("config-linear-int8-macos14", add_model_key('coreml = { compression = "linear_int8", minimum_deployment_target = "macOS14" }'),
     PY, f"{M0}.coreml.compression"),
    ("config-state-kv-cache-fp32", add_model_key('coreml = { kv_cache = "state", minimum_deployment_target = "iOS18", compute_precision = "fp32" }'),
     PY, f"{M0}.coreml.kv_cache"),
    ("config-names-equal-but-for-case", toml(SINGLE + "\n" + SINGLE.split("\n\n", 1)[1].replace('name = "student"', 'name = "Student"')),
     PY, "tool.export.models[1].name"),
    ("sets-mode-no-architecture-has", sets({"tiny": {"prefill": [16], "decode": [16], "train": [16]}}), SETS, "tiny.train"),
    ("sets-mode-the-architecture-lacks", toml(SINGLE.replace('shape_set = "tiny"', 'shape_set = "tiny"\narchitecture = "judge"', 1)
                                              .replace('architecture = "student"\n', '', 1)), SETS, "tiny.decode"),
    # an unreachable scheduler blames where its address came from: the flag or the environment, not the file
    ("dask-flag-unreachable", lambda p: [sys.executable, "-m", "doit", "--dask", "tcp://127.0.0.1:9"], "doit --dask", "ADDRESS"),
    ("dask-env-unreachable", lambda p: ["env", "MODEL_EXPORT_DASK_SCHEDULER=tcp://127.0.0.1:9", sys.executable, "-m", "doit"],
     "$MODEL_EXPORT_DASK_SCHEDULER", "(environment)"),
    ("config-unknown-top-key", edit_toml('artifacts = "artifacts"', 'artifacts = "artifacts"\ncolour = "red"'), PY, "tool.export.colour"),
    ("config-unknown-model-key", add_model_key('colour = "red"'), PY, f"{M0}.colour"),
    ("config-artifacts-not-a-string", edit_toml('artifacts = "artifacts"', "artifacts = 3"), PY, "tool.export.artifacts"),
    ("config-modes-not-a-list", add_model_key('modes = "prefill"'), PY, f"{M0}.modes"),
    ("config-unknown-mode", add_model_key('modes = ["prefill", "train"]'), PY, f"{M0}.modes[1]"),
    ("config-empty-model-list", toml('[tool.export]\nmodels = []\n'), PY, "tool.export.models"),
    ("config-no-models", toml('[tool.export]\nartifacts = "artifacts"\n'), PY, "tool.export.models"),
    ("config-duplicate-model-name", toml(SINGLE + "\n" + SINGLE.split("\n\n", 1)[1]), PY, "tool.export.models[1].name"),
    ("config-name-with-slash", edit_toml('name = "student"', 'name = "a/b"'), PY, f"{M0}.name"),
    ("config-name-dotdot", edit_toml('name = "student"', 'name = ".."'), PY, f"{M0}.name"),
    ("config-name-not-a-string", edit_toml('name = "student"', "name = 7"), PY, f"{M0}.name"),
    ("config-unknown-architecture", edit_toml('architecture = "student"', 'architecture = "gpt9"'), PY, f"{M0}.architecture"),
    ("config-unknown-shape-set", edit_toml('shape_set = "tiny"', 'shape_set = "huge"'), PY, f"{M0}.shape_set"),
    ("config-bad-dtype", add_model_key('dtype = "int8"'), PY, f"{M0}.dtype"),
    ("config-bad-format", add_model_key('formats = ["onnx"]'), PY, f"{M0}.formats[0]"),
    ("config-unknown-coreml-option", add_model_key('coreml = { speed = "max" }'), PY, f"{M0}.coreml"),
    ("config-bad-coreml-value", add_model_key('coreml = { compute_precision = "fp8" }'), PY, f"{M0}.coreml.compute_precision"),
    ("config-negative-memory-budget", edit_toml('artifacts = "artifacts"', 'artifacts = "artifacts"\nmemory_budget_mb = -5'), PY, "memory_budget_mb"),
    ("config-cache-read-only-string", edit_toml('artifacts = "artifacts"', 'artifacts = "artifacts"\ncache = { read_only = "yes" }'), PY, "tool.export.cache.read_only"),
    # --- shape_sets.json ---
    ("sets-not-json", sets_text("{tiny: [16"), SETS, "shape_sets"),
    ("sets-empty-file", sets_text(""), SETS, "shape_sets"),
    ("sets-empty-object", sets({}), SETS, "shape_sets"),
    ("sets-a-list", sets([16, 32]), SETS, "shape_sets"),
    ("sets-T-zero", tiny_T([0]), SETS, "tiny.prefill[0]"),
    ("sets-T-negative", tiny_T([16, -32]), SETS, "tiny.prefill[1]"),
    ("sets-T-float", tiny_T([16.5]), SETS, "tiny.prefill[0]"),
    ("sets-T-string", tiny_T(["16"]), SETS, "tiny.prefill[0]"),
    ("sets-T-bool", tiny_T([True]), SETS, "tiny.prefill[0]"),
    ("sets-T-duplicate", tiny_T([16, 16]), SETS, "tiny.prefill[1]"),
    ("sets-T-huge", tiny_T([2**40]), SETS, "tiny.prefill[0]"),
    ("sets-T-empty-list", tiny_T([]), SETS, "tiny.prefill"),
    ("sets-mode-missing", sets({"tiny": {"prefill": [16]}}), SETS, "tiny.decode"),
    # checked against the checkpoint's max_positions (64) when the export step runs
    ("sets-T-above-max-positions", tiny_T([16, 128]), CK, "T"),
    # --- checkpoints ---
    ("ck-missing", lambda p: (p.root / CK).unlink(), CK, "checkpoint"),
    ("ck-zero-bytes", ck_bytes(lambda b: b""), CK, "file"),
    ("ck-truncated", ck_bytes(lambda b: b[: len(b) // 2]), CK, "file"),
    ("ck-random-bytes", ck_bytes(lambda b: os.urandom(4096)), CK, "file"),
    ("ck-not-our-format", ck_python("torch.save({'weights': torch.zeros(3)}, out)"), CK, "format"),
    ("ck-future-version", payload_edit("obj['version'] = 99"), CK, "version"),
    ("ck-unknown-architecture", payload_edit("obj['architecture'] = 'gpt9'"), CK, "architecture"),
    ("ck-wrong-architecture", ck_python("checkpoint.make_demo(out, 'judge', dict(vocab_size=64, d_model=32, n_layers=2, "
                                        "n_heads=4, ffn_hidden=64, max_positions=64))"), CK, "architecture"),
    ("ck-bad-config-value", payload_edit("obj['config']['n_heads'] = 'four'"), CK, "config"),
    ("ck-wrong-shape", payload_edit("k = sorted(obj['state_dict'])[0]; obj['state_dict'][k] = torch.zeros(3, 3)"), CK, "state_dict."),
    ("ck-missing-weight", payload_edit("obj['state_dict'].pop(sorted(obj['state_dict'])[-1])"), CK, "state_dict"),
    ("ck-pickle-runs-code", evil_pickle, CK, "pickle"),
    ("ck-torch-zip-runs-code", evil_torch_zip, CK, "pickle"),
    ("ck-safetensors-lying-offsets", safetensors_checkpoint(lie_offsets), "student.safetensors", "header"),
    ("ck-safetensors-lying-shape", safetensors_checkpoint(lie_shape), "student.safetensors", "header"),
    ("ck-safetensors-header-length-lies", lambda p: safetensors_header_length_lies(p), "student.safetensors", "header"),
    # --- exported files and contracts, as inputs of the converter's CLI ---
    ("export-corrupt-pt2", module_cli(flip_middle("prefill_T16.pt2")), "prefill_T16", ""),
    ("export-truncated-pt2", module_cli(truncate("prefill_T16.pt2")), "prefill_T16", ""),
    ("contract-not-json", module_cli(lambda bad: (bad / "prefill_T16.contract.json").write_text("{'T': 16")), "prefill_T16.contract.json", "contract"),
    ("contract-future-schema-version", module_cli(contract_edit(set_key(["schema_version"], 2))), "prefill_T16.contract.json", "schema_version"),
    ("contract-other-schema", module_cli(contract_edit(set_key(["schema"], "someone/else"))), "prefill_T16.contract.json", "schema"),
    ("contract-digest-mismatch", module_cli(contract_edit(set_key(["exports", "exported_program", "digest"], "0" * 32))),
     "prefill_T16.contract.json", "exports.exported_program.digest"),
    ("contract-bad-dtype", module_cli(contract_edit(set_key(["inputs", 0, "dtype"], "int4"))), "prefill_T16.contract.json", "inputs[0].dtype"),
    ("contract-shape-mismatch", module_cli(contract_edit(set_key(["inputs", 0, "shape"], [1, 17]))), "prefill_T16.contract.json", "inputs"),
    ("contract-missing-field", module_cli(contract_edit(lambda c: c.pop("outputs"))), "prefill_T16.contract.json", ""),
]


pytestmark = pytest.mark.spread


@pytest.fixture(scope="module")
def built(tiny_built) -> Project:
    """The run's shared built tiny project (read only: each case takes a copy)."""
    return tiny_built.project


def test_dev_names_line_and_column_of_a_toml_syntax_error(tmp_path):
    """One line, file:line:column, before any set-up (no .venv is made) or doit runs."""
    import shutil

    from scenario import REPO

    shutil.copy(REPO / "dev", tmp_path / "dev")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.export]\nartifacts = "a\n')
    r = subprocess.run(["bash", "dev", "build"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: pyproject.toml:5:") and r.stderr.count("\n") == 1, r.stderr
    assert "not valid TOML" in r.stderr and not (tmp_path / ".venv").exists()


def test_the_table_is_big_enough():
    assert len(CASES) >= 30
    assert len({_id(c) for c in CASES}) == len(CASES)


def _id(case) -> str:
    return (case.values[0] if hasattr(case, "values") else case)[0]


# Variations of cases kept in the quick run: they run with -m slow (their own CI step), to bound CI time.
SLOW = {"ck-missing-weight", "ck-future-version", "ck-not-our-format", "ck-safetensors-lying-shape",
        "ck-unknown-architecture", "contract-digest-mismatch", "contract-shape-mismatch", "contract-bad-dtype",
        "contract-missing-field", "cache-manifest-digest-lies", "cache-manifest-not-json",
        "cache-manifest-path-escape-in-package"}


def _params(cases):
    return [pytest.param(c, marks=pytest.mark.slow, id=_id(c)) if _id(c) in SLOW
            else pytest.param(*c.values, marks=c.marks, id=_id(c)) if hasattr(c, "values")
            else pytest.param(c, id=_id(c)) for c in cases]


@pytest.mark.parametrize("case", _params(CASES))
def test_bad_input(built, tmp_path, case):
    name, brk, file_part, field_part = case
    p = built.copy(tmp_path / "project")
    before = snapshot(p)
    argv = brk(p)
    if argv is None:
        r = p.doit(check=False)
    else:
        r = subprocess.run(argv, cwd=p.root, env={**p.env(), "PYTHONPATH": str(p.root)}, capture_output=True,
                           text=True, timeout=600)
    out = f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    assert r.returncode != 0, out
    no_traceback(r)
    errors = error_lines(r)
    assert errors, f"no line starts with 'error:'\n{out}"
    assert any(file_part in e and field_part in e for e in errors), \
        f"no error line names {file_part!r} and {field_part!r}:\n{out}"
    assert len(set(errors)) <= 2, f"more than one error reported:\n{out}"  # one step's error, echoed once by doit at most
    assert not list(p.root.rglob(MARKER)) and not Path(MARKER).exists(), "a checkpoint ran code on load"
    after = snapshot(p)
    assert after == before, "a bad input lost or changed artifacts or cache entries"


# --- damaged cache entries: dropped and rebuilt ----------------------------------


def _entry_of(p: Project, rel: str) -> Path:
    """The cache manifest (ac/) whose outputs include ``rel``."""
    for m in (p.root / ".cache" / "ac").rglob("*"):
        if m.is_file() and rel in json.loads(m.read_text())["outputs"]:
            return m
    raise AssertionError(f"no cache entry holds {rel}")


EXPORT = "artifacts/student/exported/prefill_T16.pt2"
CONTRACT = "artifacts/student/exported/prefill_T16.contract.json"


def _wrong_digest(p: Project) -> None:
    m = _entry_of(p, EXPORT)
    data = json.loads(m.read_text())
    blob_digest = data["outputs"][EXPORT]["digest"]
    blob = p.root / ".cache" / "cas" / blob_digest[:2] / blob_digest
    blob.chmod(0o644)
    raw = bytearray(blob.read_bytes())
    raw[100:164] = bytes(64)
    blob.write_bytes(bytes(raw))
    return "export_pytorch:student.prefill.T16"


def _manifest_digest_lies(p: Project) -> None:
    m = _entry_of(p, EXPORT)
    data = json.loads(m.read_text())
    data["outputs"][EXPORT]["digest"] = "f" * 32
    m.chmod(0o644)
    m.write_text(json.dumps(data))
    return "export_pytorch:student.prefill.T16"


def _path_escape(p: Project) -> None:
    m = _entry_of(p, EXPORT)
    data = json.loads(m.read_text())
    data["outputs"]["../../escaped.pt2"] = data["outputs"].pop(EXPORT)
    m.chmod(0o644)
    m.write_text(json.dumps(data))
    return "export_pytorch:student.prefill.T16"


def _path_escape_inside_dir(p: Project) -> None:
    rel = "artifacts/student/coreml/prefill_T16.mlpackage"
    m = _entry_of(p, rel)
    data = json.loads(m.read_text())
    files = data["outputs"][rel]["files"]
    k = next(iter(files))
    files["../../../../escaped"] = files.pop(k)
    m.chmod(0o644)
    m.write_text(json.dumps(data))
    # force the restore of that leaf
    import shutil

    shutil.rmtree(p.root / rel)
    return "convert_coreml:student.prefill.T16"


def _manifest_not_json(p: Project) -> None:
    m = _entry_of(p, EXPORT)
    m.chmod(0o644)
    m.write_text("{not json")
    return "export_pytorch:student.prefill.T16"


CACHE_CASES = [
    ("cache-blob-wrong-digest", _wrong_digest),
    ("cache-manifest-digest-lies", _manifest_digest_lies),
    ("cache-manifest-path-escape", _path_escape),
    ("cache-manifest-path-escape-in-package", _path_escape_inside_dir),
    ("cache-manifest-not-json", _manifest_not_json),
]


@pytest.mark.parametrize("case", _params(CACHE_CASES))
def test_damaged_cache_entry_is_dropped_and_rebuilt(built, tmp_path, case):
    name, brk = case
    p = built.copy(tmp_path / "project")
    task = brk(p)
    for rel in (EXPORT, CONTRACT):  # the export leaf has to come back: from the cache if it can
        (p.root / rel).unlink()
    r = p.doit(check=False)
    out = f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    assert r.returncode == 0, out
    no_traceback(r)
    assert "dropped" in r.stderr, f"the damaged entry was not reported:\n{out}"
    assert task in p.ran(), out
    assert not list(tmp_path.rglob("escaped*")), "a manifest wrote outside the artifacts folder"
    assert p.artifact_digests() == built.artifact_digests()
    # the rebuilt entry is good again: a second checkout restores it
    (p.root / EXPORT).unlink()
    (p.root / CONTRACT).unlink()
    p.doit()
    assert "export_pytorch:student.prefill.T16" in p.restored()
    assert p.artifact_digests() == built.artifact_digests()
