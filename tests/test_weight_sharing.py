"""One copy of the weights on disk (issue 21, item 3), and device limits checked before they bite (item 4).

- The files a build writes under artifacts/ are hardlinks to the cache's blobs: the (mode, T) packages of a
  model share one weight.bin with the cache (export/cache/store.py, ``adopt``).
- An artifact edited in place (through the hardlink: the blob is altered too) is found changed, the cache
  drops the altered blob instead of restoring it, and the build gives back the clean bytes, blob included.
- The build's ``.pt2`` hold the graph and refer to the checkpoint's tensors by digest
  (export/program_weights.py); converting and verifying them gives the very package a self-contained
  ``.pt2`` gives; a checkpoint that no longer holds those tensors is one error naming the tensor.
- A package over a device limit (a vocabulary above the Neural Engine's 16384) warns, or with
  ``device_limits = "fail"`` fails its step with one line naming the package, the function, the limit
  and the value; the report shows each package's figures.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import TINY
from export import checkpoint, export_pytorch, program_weights, weight_refs
from export.digest import file_digest, tree_files
from export.errors import ExportError

WEIGHT = "Data/com.apple.CoreML/weights/weight.bin"


def _blob(cache: Path, digest: str) -> Path:
    return cache / "cas" / digest[:2] / digest


def test_built_outputs_are_the_cache_blobs(tiny_built):
    """A cold build's outputs (not restores): each file is the cache's read-only blob, so the two packages
    of the student and its bundle share one weight.bin with the cache."""
    root = tiny_built.project.root
    cache, art = root / ".cache", root / "artifacts" / "student"
    # Manifest.json: coremltools rewrites it (same bytes, a new file) when a later step opens the package
    files = [p for p in art.rglob("*") if p.is_file() and p.name not in ("checkpoint.pt", "Manifest.json")]
    assert files
    for p in files:
        st = p.stat()
        blob = _blob(cache, file_digest(p))
        assert os.path.samestat(st, blob.stat()), p
        assert not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), p
    weights = [art / "coreml" / f"{mode}_T16.mlpackage" / WEIGHT for mode in ("prefill", "decode")]
    assert os.path.samestat(weights[0].stat(), weights[1].stat())
    # the bundle's too: it uses its leaves' weight file (export/coreml/bundle.py share_leaf_weights)
    assert os.path.samestat(weights[0].stat(), (art / "student.mlpackage" / WEIGHT).stat())


def test_artifact_edited_in_place_is_found_and_the_blob_healed(tiny_built, tmp_path):
    p = tiny_built.copy(tmp_path / "p")  # a copy: its files are no longer linked to its .cache
    coreml = p.root / "artifacts" / "student" / "coreml"
    for pkg in coreml.glob("*.mlpackage"):
        shutil.rmtree(pkg)
    p.doit()  # restored: hardlinks to the copy's blobs
    assert {"convert_coreml:student.prefill.T16", "convert_coreml:student.decode.T16"} <= p.restored()
    weights = [coreml / f"{mode}_T16.mlpackage" / WEIGHT for mode in ("prefill", "decode")]
    digest = file_digest(weights[0])
    blob = _blob(p.root / ".cache", digest)
    assert os.path.samestat(weights[0].stat(), blob.stat()) and os.path.samestat(weights[1].stat(), blob.stat())

    os.chmod(weights[0], 0o644)  # what a user who means to edit it does (root needs no chmod)
    with open(weights[0], "r+b") as f:  # in place: through the hardlink, into the blob
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert file_digest(blob) != digest  # the hardlinked blob is altered too

    r = p.doit()
    assert "dropped" in r.stderr and digest in r.stderr  # the cache refused to restore the altered blob
    assert p.artifact_digests() == tiny_built.artifact_digests()
    healed = _blob(p.root / ".cache", digest)
    assert file_digest(healed) == digest  # the cache holds the good bytes again
    for w in weights:
        assert file_digest(w) == digest
    p.doit()
    assert p.ran() == set() and p.restored() == set()


def test_build_pt2_refer_to_the_checkpoint(tiny_built):
    """The build's programs hold no weights: every parameter is referred to, its record in the archive empty."""
    root = tiny_built.project.root
    ck = checkpoint.load(root / "checkpoints" / "student.pt")
    n = len(ck.state_dict)
    for pt2 in (root / "artifacts" / "student" / "exported").glob("*.pt2"):
        refs = weight_refs.read(pt2)
        assert refs is not None and len(refs["tensors"]) >= n, pt2
        with zipfile.ZipFile(pt2) as z:
            held = sum(i.file_size for i in z.infolist() if "/data/weights/weight_" in i.filename)
        assert held <= 16, (pt2, held)  # one zero element per dtype
        assert weight_refs.external_bytes(pt2) >= sum(t.numel() * 4 for t in ck.state_dict.values()) - 64 * 32 * 4


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One tiny student (prefill, T 8) exported self-contained and weights-by-reference, fp32 and fp16."""
    tmp = tmp_path_factory.mktemp("refs")
    config, model = checkpoint.demo_model("student", TINY["student"])
    ck = tmp / "student.pt"
    checkpoint.save(ck, "student", config, model.state_dict())
    loaded = checkpoint.load(ck)
    module = loaded.model()
    out = {}
    for dtype in ("fp32", "fp16"):
        for external in (False, True):
            d = tmp / f"{dtype}-{'ref' if external else 'whole'}"
            export_pytorch.export_entry(loaded, module, d, model_name="student", mode="prefill", T=8,
                                        formats=["exported_program"], dtype=dtype, external_weights=external)
            out[dtype, external] = d
    return ck, out


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_graph_only_program_converts_to_the_same_package(exports, tmp_path, dtype):
    from export.coreml.convert import convert
    from export.coreml.mlpackage import METADATA_PREFIX, read_spec
    from export.coreml.verify import verify

    ck, dirs = exports
    whole, ref = dirs[dtype, False], dirs[dtype, True]
    assert (ref / "prefill_T8.pt2").stat().st_size < (whole / "prefill_T8.pt2").stat().st_size
    a = convert(whole / "prefill_T8.pt2", tmp_path / "a.mlpackage", whole / "prefill_T8.contract.json", log=lambda *_: None)
    b = convert(ref / "prefill_T8.pt2", tmp_path / "b.mlpackage", ref / "prefill_T8.contract.json", log=lambda *_: None,
                weights=ck)
    # the same package but for the digest of the contract it records (which lists the .pt2's digest)
    assert file_digest(a / WEIGHT) == file_digest(b / WEIGHT)
    specs = []
    for pkg in (a, b):
        spec = read_spec(pkg)
        spec.description.metadata.userDefined.pop(METADATA_PREFIX + "contract_digest")
        specs.append(spec.SerializeToString(deterministic=True))
    assert specs[0] == specs[1]
    assert sorted(tree_files(a)) == sorted(tree_files(b))
    v = verify(b, ref / "prefill_T8.pt2", ref / "prefill_T8.contract.json", weights=ck)
    assert v.failure() is None
    whole_ep = program_weights.load(whole / "prefill_T8.pt2")
    ref_ep = program_weights.load(ref / "prefill_T8.pt2", ck)
    assert whole_ep.state_dict.keys() == ref_ep.state_dict.keys()
    for k, t in whole_ep.state_dict.items():
        assert torch.equal(t, ref_ep.state_dict[k]), k


def test_graph_only_program_needs_its_checkpoint(exports, tmp_path):
    ck, dirs = exports
    pt2 = dirs["fp32", True] / "prefill_T8.pt2"
    with pytest.raises(ExportError) as e:
        program_weights.load(pt2)
    assert e.value.field == "weights" and "--weights" in str(e.value)
    # a checkpoint with one tensor changed: refused, the tensor named
    obj = torch.load(ck, weights_only=True)
    name = sorted(obj["state_dict"])[0]
    obj["state_dict"][name] = obj["state_dict"][name] + 1
    other = tmp_path / "other.pt"
    torch.save(obj, other)
    with pytest.raises(ExportError) as e:
        program_weights.load(pt2, other)
    assert e.value.field == f"state_dict.{name}" and "re-export" in str(e.value)


def test_cli_export_is_self_contained(exports):
    _, dirs = exports
    assert weight_refs.read(dirs["fp32", False] / "prefill_T8.pt2") is None
    program_weights.load(dirs["fp32", False] / "prefill_T8.pt2")  # no checkpoint needed


# --------------------------------------------------------------------------- device limits

BIG_VOCAB = dict(TINY["student"], vocab_size=20000)  # over the Neural Engine's 16384, still tiny


def test_device_limits_warn_then_fail(tiny_built, tmp_path):
    p = tiny_built.fresh(tmp_path / "p")
    config, model = checkpoint.demo_model("student", BIG_VOCAB)
    checkpoint.save(p.root / "checkpoints" / "student.pt", "student", config, model.state_dict())
    toml = p.root / "pyproject.toml"
    toml.write_text(toml.read_text().replace('shape_set = "tiny"', 'shape_set = "tiny"\nmodes = ["prefill"]'))
    r = p.doit("bundle_coreml")
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: convert_coreml:student.prefill.T16")]
    assert line and "16384" in line[0] and "20000" in line[0] and "function main" in line[0], r.stderr
    manifest = json.loads((p.root / "artifacts/student/coreml/prefill_T16.mlpackage.manifest.json").read_text())
    fig = manifest["device"]["functions"]["main"]
    assert fig["max_dim"] == 20000 and fig["ops"] > 10 and fig["weight_file_bytes"] > 20000 * 32 * 2
    bundle = json.loads((p.root / "artifacts/student/student.mlpackage.manifest.json").read_text())["device"]
    assert bundle["problems"] and bundle["functions"]["prefill_T16"]["max_dim"] == 20000
    p.doit("report")
    report = json.loads((p.root / "artifacts" / "report.json").read_text())
    rows = {(row["package"], row["function"]): row for row in report["device"]}
    assert rows["student/coreml/prefill_T16.mlpackage", "main"]["max_dim"] == 20000
    assert "Device limits" in (p.root / "artifacts" / "report.html").read_text()

    toml.write_text(toml.read_text().replace('modes = ["prefill"]', 'modes = ["prefill"]\ndevice_limits = "fail"'))
    before = file_digest(p.root / "artifacts/student/coreml/prefill_T16.mlpackage.manifest.json")
    r = p.doit("bundle_coreml", check=False)
    assert r.returncode != 0
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]
    assert errors and "prefill_T16.mlpackage" in errors[0] and "function main" in errors[0] \
        and "16384" in errors[0] and "20000" in errors[0] and "device_limits" in errors[0], errors
    # refused before it appeared: the package of the warn build is still there, untouched
    assert file_digest(p.root / "artifacts/student/coreml/prefill_T16.mlpackage.manifest.json") == before


def test_device_limits_config_is_checked(tmp_path):
    from scenario import Project

    p = Project.create(tmp_path / "p")
    toml = p.root / "pyproject.toml"
    toml.write_text(toml.read_text().replace('shape_set = "tiny"\n', 'shape_set = "tiny"\ndevice_limits = "maybe"\n', 1))
    r = p.doit("list", check=False)
    assert r.returncode != 0
    assert "error:" in r.stderr and "device_limits" in r.stderr and "maybe" in r.stderr


def test_weight_file_limit_per_platform():
    from export.coreml.checks import device_problems

    figures = {"weight_files": {"weight.bin": 1_500_000_000},
               "functions": {"main": {"ops": 10, "max_dim": 100, "max_dim_tensor": "x", "weight_file_bytes": 1_500_000_000}}}
    ios = device_problems(figures, "iOS18")
    assert len(ios) == 1 and ios[0]["limit"] == 1 << 30 and "function main" in ios[0]["line"]
    assert device_problems(figures, "macOS15") == []


def _publish(cache_dir: str, root: str, rel: str, start) -> None:
    from export.cache.store import Cache

    start.wait()
    Cache(cache_dir, log=lambda *_: None).put(f"key-{rel[1]}", Path(root), [rel], {"task": rel}, adopt=True)


def test_parallel_steps_publishing_the_same_bytes_share_one_blob(tmp_path):
    """`doit -n 2`: two conversions of one part (identical weight.bin) publish at the same moment; every output
    must end up a hardlink of the one blob the cache keeps (a second blob installed over the first left the
    first step's file a copy of its own: one more copy of a part's weights, 1 GB at 1B)."""
    import multiprocessing

    data = os.urandom(1 << 20) * 48  # 48 MB: a copy long enough for the publishers to overlap
    root = tmp_path / "artifacts"
    names = [f"p{i}/weight.bin" for i in range(4)]
    for rel in names:
        (root / rel).parent.mkdir(parents=True)
        (root / rel).write_bytes(data)
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(len(names))
    procs = [ctx.Process(target=_publish, args=(str(cache), str(root), rel, start)) for rel in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    blobs = [p for p in (cache / "cas").rglob("*") if p.is_file()]
    assert len(blobs) == 1
    for rel in names:
        assert os.path.samestat((root / rel).stat(), blobs[0].stat()), rel
    assert blobs[0].stat().st_nlink == len(names) + 1


def test_ios18_leaves_share_one_weight_file(tiny_built, tmp_path):
    """iOS18 packages (a stateful decode cache, and a recipe's compressed packages) of one model: every leaf,
    prefill and each decode T, has the same weight.bin, one inode with its bundle's and the cache's blob.
    coremltools would put a decode's T-sized int32 slot vector in the weight file from iOS18 on; the
    conversion keeps integer constants in the spec (export/coreml/weight_file.py)."""
    from scenario import RECIPES_TOML, export_head, model_toml, project_toml

    p = tiny_built.copy(tmp_path / "p")
    p.set_shape_sets({"tiny": {"prefill": [16], "decode": [16, 32]}})
    (p.root / "pyproject.toml").write_text(project_toml(export_head() + RECIPES_TOML + model_toml(
        "student", "student", "checkpoints/student.pt", "tiny", recipes='["int8"]',
        coreml='{ minimum_deployment_target = "iOS18", kv_cache = "state" }')))
    p.doit("-n", "2")
    art, cache = p.root / "artifacts" / "student", p.root / ".cache"
    leaves = ("prefill_T16", "decode_T16", "decode_T32")
    for suffix in ("", ".int8"):
        files = [art / "coreml" / f"{leaf}{suffix}.mlpackage" / WEIGHT for leaf in leaves]
        files.append(art / f"student{suffix}.mlpackage" / WEIGHT)
        st = files[0].stat()
        assert all(os.path.samestat(st, f.stat()) for f in files), suffix
        assert os.path.samestat(st, _blob(cache, file_digest(files[0])).stat()), suffix
    float_w, int8_w = (art / "coreml" / f"decode_T32{s}.mlpackage" / WEIGHT for s in ("", ".int8"))
    assert int8_w.stat().st_size < float_w.stat().st_size  # the recipe's file: compressed weights
    from export.coreml.mlpackage import read_spec

    decode = read_spec(art / "coreml" / "decode_T32.mlpackage")
    assert decode.specificationVersion >= 9 and len(decode.description.state) == 2  # iOS18, stateful
    # the packages still verify: each leaf against its program, each function of the bundle against its leaf
    for leaf in leaves:
        assert json.loads((art / "coreml" / f"{leaf}.verify.json").read_text())["ok"], leaf
    verdict = json.loads((art / "student.verify.json").read_text())["functions"]
    assert sorted(verdict) == sorted(leaves) and all(v["ok"] for v in verdict.values())
    p.doit("nightly")  # the same bytes again
    assert json.loads((p.root / "artifacts" / "nightly.json").read_text())["non_reproducible"] == []
