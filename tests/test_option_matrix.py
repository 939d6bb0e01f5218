"""Every option the validator accepts builds, through the real doit, bundle included (issue #20).

One project, one build: each model carries a different set of non-default options, so that every
option value below is built end to end (export, conversion, bundle) by some model, with one T each:

| model | architecture | options |
|---|---|---|
| state  | student | kv_cache state, iOS18, dtype fp16, palettize (4 bits), compute_units cpu_only |
| ts     | student | convert_from torchscript, macOS13, compute_units cpu_and_gpu, compute_precision fp32 |
| int8   | student | linear_int8, macOS15, compute_units cpu_and_ne |
| mac14  | judge   | macOS14 (a demo checkpoint) |
| ios16  | judge   | iOS16, compute_units all, two T: its bundle merges two functions |

Each package's spec carries the options it was converted with (user metadata) and its
specification version; the bundle's too. A bundle is a multifunction package: coremltools gives it
iOS18's specification version whatever the target, while the leaves keep theirs (iOS16: 7); the
iOS16 bundle's functions run in the reference interpreter like its leaves (verify_coreml)."""
from __future__ import annotations

import json

import pytest

from faults import create_tiny
from scenario import project_toml

MODELS = {
    "state": ('architecture = "student"\ncheckpoint = "checkpoints/student.pt"\ndtype = "fp16"\n'
              'coreml = { kv_cache = "state", minimum_deployment_target = "iOS18", compression = "palettize", '
              'compute_units = "cpu_only" }'),
    "ts": ('architecture = "student"\ncheckpoint = "checkpoints/student.pt"\nformats = ["torchscript"]\n'
           'convert_from = "torchscript"\n'
           'coreml = { minimum_deployment_target = "macOS13", compute_units = "cpu_and_gpu", compute_precision = "fp32" }'),
    "int8": ('architecture = "student"\ncheckpoint = "checkpoints/student.pt"\n'
             'coreml = { compression = "linear_int8", minimum_deployment_target = "macOS15", compute_units = "cpu_and_ne" }'),
    "mac14": 'architecture = "judge"\ncheckpoint = "demo"\ncoreml = { minimum_deployment_target = "macOS14" }',
    "ios16": 'architecture = "judge"\ncheckpoint = "demo"\ncoreml = { minimum_deployment_target = "iOS16", compute_units = "all" }',
}
# Core ML specification version of each deployment target (coremltools' ct.target values)
SPEC_VERSION = {"iOS16": 7, "macOS13": 7, "iOS17": 8, "macOS14": 8, "iOS18": 9, "macOS15": 9}


def _toml() -> str:
    text = '[tool.export]\nartifacts = "artifacts"\nshape_sets = "shape_sets.json"\n'
    for name, body in MODELS.items():
        shape_set = "ios16" if name == "ios16" else "judge" if "judge" in body else "one"
        text += f'\n[[tool.export.models]]\nname = "{name}"\nshape_set = "{shape_set}"\n{body}\n'
    return text


@pytest.mark.slow
def test_every_accepted_option_builds_end_to_end(tmp_path):

    p = create_tiny(tmp_path / "project")
    p.set_shape_sets({"one": {"prefill": [16], "decode": [16]}, "judge": {"prefill": [16]},
                      "ios16": {"prefill": [16, 32]}})
    (p.root / "pyproject.toml").write_text(project_toml(_toml(), name="matrix"))
    p.doit("-n", "2")
    statuses = p.last_build()
    assert {s for n, s in statuses.items() if n != "prune_artifacts"} == {"built"}, statuses
    assert {n for n in statuses if n.startswith("bundle_coreml:")} == {f"bundle_coreml:{m}" for m in MODELS}

    import coremltools as ct

    art = p.root / "artifacts"
    for name, body in MODELS.items():
        leaves = ["prefill_T16"] if "judge" in body else ["prefill_T16", "decode_T16"]
        leaves += ["prefill_T32"] if name == "ios16" else []
        for pkg in [art / name / "coreml" / f"{leaf}.mlpackage" for leaf in leaves] + [art / name / f"{name}.mlpackage"]:
            spec = ct.utils.load_spec(str(pkg))
            meta = dict(spec.description.metadata.userDefined)
            options = json.loads(meta["model_export.options"]) if "model_export.options" in meta else None
            assert options is not None, (pkg, sorted(meta))
            want_units = {"state": "cpu_only", "ts": "cpu_and_gpu", "int8": "cpu_and_ne"}.get(name, "all")
            assert options["compute_units"] == want_units, (pkg, options)
            target = options["minimum_deployment_target"]
            assert spec.specificationVersion >= SPEC_VERSION[target], (pkg, spec.specificationVersion, target)
            if pkg.parent.name == "coreml":  # a leaf: its own target's version
                assert spec.specificationVersion == SPEC_VERSION[target], (pkg, spec.specificationVersion, target)
            else:  # a bundle: multifunction, iOS18's version; one function per leaf
                assert spec.specificationVersion == SPEC_VERSION["iOS18"], (pkg, spec.specificationVersion)
                assert sorted(spec.mlProgram.functions) == sorted(leaves), (pkg, list(spec.mlProgram.functions))
        contract = json.loads((art / name / "contract.json").read_text())
        assert sorted(contract["functions"]) == sorted(leaves)
        if name != "ts":  # (a TorchScript-only model has no ExportedProgram to verify against)
            verdict = json.loads((art / name / f"{name}.verify.json").read_text())  # each function against its leaf
            assert sorted(verdict["functions"]) == sorted(leaves) and all(v["ok"] for v in verdict["functions"].values())
        if name == "state":
            assert contract["functions"]["decode_T16"]["states"], "the stateful decode keeps its cache in states"
            assert contract["functions"]["decode_T16"]["dtype"] == "float16"
        if name == "ts":
            assert (art / name / "exported" / "prefill_T16.pt").is_file()
            assert not (art / name / "exported" / "prefill_T16.pt2").exists()
