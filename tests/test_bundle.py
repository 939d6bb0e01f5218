"""The multifunction bundle: every (mode, T) function as its contract says,
weights stored once, metadata set again, byte-stable, bad input refused."""
from __future__ import annotations

import json

import coremltools as ct
import pytest

from conftest import files_of, run_module
from coreml_helpers import TS, entry, export_tiny, leftovers
from export import contract as contract_mod
from export.coreml.bundle import bundle
from export.coreml.convert import convert
from export.coreml.spec import describe, function_descriptions
from export.errors import ExportError

MODES = ("prefill", "decode")


def weights(pkg) -> int:
    return sum(f.stat().st_size for f in (pkg / "Data/com.apple.CoreML/weights").iterdir())


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """Every (mode, T) of the tiny student converted (ExportedProgram, fp16), plain and palettized 6 bit.

    Compressed packages need iOS18 to merge: multifunction packages are iOS18, and the
    iOS16 ``constexpr_lut_to_dense`` of an iOS17 package does not load into them."""
    root = tmp_path_factory.mktemp("bundle")
    exported = export_tiny(root)
    out = {"plain": [], "palettized": []}
    for mode in MODES:
        for T in TS:
            program, cpath = entry(exported, mode, T, "exported_program")
            out["plain"].append((convert(program, root / "pkgs" / f"{mode}_T{T}.mlpackage", cpath), cpath))
            out["palettized"].append((convert(program, root / "pal" / f"{mode}_T{T}.mlpackage", cpath,
                                              {"compression": "palettize", "palettize_bits": 6,
                                               "minimum_deployment_target": "iOS18"}), cpath))
    return out


@pytest.mark.parametrize("kind", ["plain", "palettized"])
def test_bundle_holds_every_function_and_stores_weights_once(packages, tmp_path, kind):
    pkgs, contracts = zip(*packages[kind])
    out = tmp_path / "student.mlpackage"
    agg = bundle(list(pkgs), list(contracts), out)
    assert (tmp_path / "contract.json").is_file()
    assert contract_mod.read(tmp_path / "contract.json", aggregate=True) == agg
    assert list(agg["functions"]) == ["prefill_T16", "prefill_T32", "decode_T16", "decode_T32"]
    spec = ct.models.MLModel(str(out), skip_model_load=True).get_spec()
    funcs = function_descriptions(spec)
    assert sorted(funcs) == sorted(agg["functions"])
    for name, c in agg["functions"].items():
        assert describe(funcs[name]) == {k: c[k] for k in ("inputs", "outputs", "states")}
    assert spec.description.defaultFunctionName == "prefill_T16"
    meta = spec.description.metadata.userDefined
    assert meta["model_export.checkpoint_digest"] == agg["functions"]["prefill_T16"]["checkpoint"]["digest"]
    assert meta["model_export.functions"] == "prefill_T16,prefill_T32,decode_T16,decode_T32"
    assert "coremltools" in json.loads(meta["model_export.toolchain"])
    single = max(weights(p) for p in pkgs)
    assert weights(out) <= 1.1 * single, (weights(out), single)
    assert leftovers(tmp_path) == []


def test_bundle_is_byte_stable(packages, tmp_path):
    pkgs, contracts = zip(*packages["plain"])
    a = tmp_path / "a" / "student.mlpackage"
    b = tmp_path / "b" / "student.mlpackage"
    bundle(list(pkgs), list(contracts), a)
    r = run_module("export.bundle", "--packages", *pkgs, "--contracts", *contracts, "--out", b)
    assert r.returncode == 0, r.stderr
    assert files_of(a) == files_of(b)
    assert (tmp_path / "a" / "contract.json").read_bytes() == (tmp_path / "b" / "contract.json").read_bytes()


def test_contract_that_does_not_describe_the_package(packages, tmp_path):
    (p0, c0), (p1, c1) = packages["plain"][:2]
    out = tmp_path / "student.mlpackage"
    with pytest.raises(ExportError, match=r"prefill_T16\.mlpackage: inputs\.input_ids\.shape"):
        bundle([p0, p1], [c1, c0], out)
    assert not out.exists() and not (tmp_path / "contract.json").exists()


def test_duplicate_function(packages, tmp_path):
    (p0, c0) = packages["plain"][0]
    with pytest.raises(ExportError, match="two packages for function prefill_T16"):
        bundle([p0, p0], [c0, c0], tmp_path / "student.mlpackage")


def test_cli_error_is_one_line(packages, tmp_path):
    (p0, c0) = packages["plain"][0]
    r = run_module("export.bundle", "--packages", p0, tmp_path / "missing.mlpackage", "--contracts", c0, c0,
                   "--out", tmp_path / "s.mlpackage")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr
    assert not (tmp_path / "s.mlpackage").exists()


WEIGHT = "Data/com.apple.CoreML/weights/weight.bin"


def _referenced(package, function: str | None = None) -> list[tuple]:
    """The blobs (header but offset, digest of the bytes) the constants of a package's function point at."""
    from export.coreml.bundle import _blob_values, _blobs
    from export.coreml.mlpackage import read_spec

    blobs = _blobs(package / WEIGHT)
    spec = read_spec(package)
    fn = spec.mlProgram.functions[function or "main"]
    return sorted(blobs[int(v.blobFileValue.offset)] for v in _blob_values(fn))


@pytest.mark.parametrize("kind", ["plain", "palettized"])
def test_bundle_shares_the_leaves_weight_file(packages, tmp_path, kind):
    """The leaves' weight files are the same bytes, and so is the bundle's (the merge's own file held the same
    blobs less the duplicates it drops): the build's store keeps one file. Each function's constants point at
    the same blobs as its leaf's, and each function computes its leaf's outputs bit for bit."""
    from export.coreml.verify import verify_bundle

    pkgs, contracts = zip(*packages[kind])
    out = tmp_path / "student.mlpackage"
    agg = bundle(list(pkgs), list(contracts), out)
    leaf = (pkgs[0] / WEIGHT).read_bytes()
    # palettized leaves are iOS18, whose integer constants (a decode's T-sized slot vector) coremltools would
    # put in the weight file: the conversion keeps them in the spec (export/coreml/weight_file.py)
    assert all((p / WEIGHT).read_bytes() == leaf for p in pkgs)
    assert (out / WEIGHT).read_bytes() == leaf
    for name, pkg in zip(agg["functions"], pkgs):
        assert _referenced(out, name) == _referenced(pkg), name
    verdicts = verify_bundle(out, dict(zip(agg["functions"], pkgs)), contracts=dict(zip(agg["functions"], contracts)))
    assert all(v.failure() is None for v in verdicts.values()), {k: v.failure() for k, v in verdicts.items()}


def test_bundle_of_leaves_with_other_weight_files_keeps_its_own(packages, tmp_path):
    """Leaves whose weight files differ: the merge's own weight file stays, its constants untouched."""
    import shutil

    from export.coreml.bundle import share_leaf_weights
    from export.coreml.mlpackage import read_spec

    (p0, c0), (p1, c1) = packages["plain"][:2]
    other = tmp_path / "other.mlpackage"
    shutil.copytree(p1, other)
    data = bytearray((other / WEIGHT).read_bytes())
    data[-1] ^= 1
    (other / WEIGHT).write_bytes(bytes(data))
    out = tmp_path / "student.mlpackage"
    bundle([p0, p1], [c0, c1], out)
    before, spec = (out / WEIGHT).read_bytes(), read_spec(out)
    was = spec.SerializeToString(deterministic=True)
    assert share_leaf_weights(spec, out, [p0, other]) is False
    assert (out / WEIGHT).read_bytes() == before and spec.SerializeToString(deterministic=True) == was
