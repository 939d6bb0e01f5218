"""Parted models (export/parts.py, the "parts" of export/models/decoder_lm.py): a decoder LM cut into
embed / chunk0..chunkN-1 / head, each part loaded from its own tensors alone and built as leaves of the graph.

- the parts chained in PyTorch reproduce the whole model's logits and K/V (the student, a tiny
  transformers Llama and Qwen2 from a sharded folder), and prefill n + k decode steps through the parts
  equal the whole model's prefill of n + k;
- the plan from the safetensors headers (no torch): chunks, max_part_mb, embed/head parts, tied heads,
  a sharded folder reads the same tensors as the single file;
- bad part configs: one error line naming pyproject.toml and the field, before any step runs;
- a real doit build of a parted student (slow): every part converted, verified and bundled, the chain
  contract; editing one layer's weights rebuilds that part's tasks only; a part's memory estimate follows
  its own bytes; a sharded checkpoint builds the same bytes as the single file.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from export import checkpoint, config as config_mod, parts
from export.config import PartsConfig
from export.errors import ExportError

from conftest import write_checkpoint
from scenario import Project, project_toml
from test_models import full_prefill, rollout_logits

T = 16


def _model(pc: PartsConfig, arch: str = "student", precision: str = "fp16"):
    return SimpleNamespace(parts=pc, index=0, architecture=arch, coreml=SimpleNamespace(compute_precision=precision))


class Chain:
    """The parts of a checkpoint, chained: ``prefill``/``decode`` with the whole model's signature (logits and
    K/V of every layer), each part run on its own inputs and its own layers' cache only."""

    def __init__(self, path: Path, pc: PartsConfig, arch: str):
        info = parts.index(path)
        self.parts = parts.plan(_model(pc, arch), info, file="pyproject.toml")
        self.modules = [checkpoint.load_part(path, p.to_json())[2] for p in self.parts]

    def _run(self, mode, x, pos, k_cache=None, v_cache=None):
        ks, vs = [], []
        for p, mod in zip(self.parts, self.modules):
            if not p.layers:
                out = mod.run(mode, x)
            elif mode == "prefill":
                out = mod.run(mode, x, pos)
            else:
                out = mod.run(mode, x, pos, k_cache[p.first:p.end], v_cache[p.first:p.end])
            if p.layers:
                ks.append(out[-2])
                vs.append(out[-1])
                out = out[:-2]
            x = torch.cat(out, dim=-1) if p.head else out[0]  # a split head: its pieces, concatenated
        return x, torch.cat(ks), torch.cat(vs)

    def prefill(self, ids, pos):
        return self._run("prefill", ids, pos)

    def decode(self, ids, pos, k_cache, v_cache):
        return self._run("decode", ids, pos, k_cache, v_cache)


def _student(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "student.safetensors", "student", n_layers=4)


def _llama(tmp_path, family="llama", shard: str | None = None) -> Path:
    from test_hf_causal_lm import save_family

    folder = save_family(tmp_path, family)
    if shard:  # as transformers writes large models: model.safetensors.index.json + shards
        import transformers

        lm = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        sharded = tmp_path / f"{family}-sharded"
        lm.save_pretrained(sharded, max_shard_size=shard)
        assert (sharded / parts.INDEX_FILE).is_file() and not (sharded / parts.SINGLE_FILE).exists()
        return sharded
    return folder


CASES = {
    "student": ("student", _student, PartsConfig(chunks=2, embed_part=True, head_part=True, head_split=24)),
    "llama": ("hf-causal-lm", _llama, PartsConfig(chunks=2, head_split=50)),
    "qwen2-sharded": ("hf-causal-lm", lambda p: _llama(p, "qwen2", shard="20KB"), PartsConfig(chunks=2, head_part=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parts_chained_reproduce_the_whole_model(tmp_path, case):
    arch, make, pc = CASES[case]
    path = make(tmp_path)
    whole = checkpoint.load(path).model()
    chain = Chain(path, pc, arch)
    assert [p.name for p in chain.parts][:1] == (["embed"] if pc.embed_part else ["chunk0"])
    vocab = whole.dims.vocab_size
    ids = torch.randint(3, vocab, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = full_prefill(whole.prefill, ids, T)
        got = chain.prefill(*_padded(ids))
        for name, g, w in zip(("logits", "k_cache", "v_cache"), got, want):
            assert g.shape == w.shape, name
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)
        # prefill n, then k decode steps through the parts = the whole model's prefill of n + k
        n = 6
        steps, _, _ = rollout_logits(chain.prefill, chain.decode, ids, n, T)
        torch.testing.assert_close(steps, want[0][0, n:len(ids)], atol=1e-4, rtol=1e-4)


def _padded(ids):
    inp = torch.zeros(1, T, dtype=torch.int32)
    inp[0, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return inp, torch.arange(T, dtype=torch.int32)[None]


def test_plan_from_headers(tmp_path):
    ck = _student(tmp_path)
    info = parts.index(ck)
    assert (info.architecture, info.n_layers, info.hidden, info.vocab) == ("student", 4, 32, 64)
    plan = parts.plan(_model(PartsConfig(chunks=3, head_part=True)), info, file="pyproject.toml")
    assert [(p.name, p.first, p.end, p.embed, p.head) for p in plan] == [
        ("chunk0", 0, 2, True, False), ("chunk1", 2, 3, False, False), ("chunk2", 3, 4, False, False),
        ("head", 4, 4, False, True)]
    assert plan[1].tensors == tuple(sorted(n for n in info.tensors if n.startswith("blocks.2.")))
    assert set(plan[3].tensors) == {"norm.weight", "lm_head.weight"}
    # every tensor is in exactly one part, and a part's bytes are its tensors' (fp16 in its package)
    assert sorted(n for p in plan for n in p.tensors) == sorted(info.tensors)
    assert sum(p.weight_bytes for p in plan) * 2 == sum(r.end - r.start for r in info.tensors.values())
    # max_part_mb derives the chunks: the fewest for which every part fits
    per_layer = plan[1].weight_bytes
    embed = info.tensors["embed.weight"].numel * 2
    limit_mb = (2 * per_layer + embed) / 2**20
    derived = parts.plan(_model(PartsConfig(max_part_mb=limit_mb, head_part=True)), info, file="pyproject.toml")
    assert [p.name for p in derived] == ["chunk0", "chunk1", "head"]
    assert max(p.weight_bytes for p in derived) <= limit_mb * 2**20
    fewer = parts.plan(_model(PartsConfig(max_part_mb=limit_mb * 0.9, head_part=True)), info, file="pyproject.toml")
    # 2 layers + the embeddings no longer fit; 3 chunks split 2+1+1 (the larger first) still put them together
    assert [p.name for p in fewer] == ["chunk0", "chunk1", "chunk2", "chunk3", "head"]


def test_tied_head_and_sharded_folder_read_the_same_tensors(tmp_path):
    import transformers

    config = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(config)
    lm.save_pretrained(tmp_path / "one")
    lm.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    one, sharded = parts.index(tmp_path / "one"), parts.index(tmp_path / "sharded")
    assert one.tied and sharded.tied and len(sharded.files) > 3
    assert parts.tensor_digests(one) == parts.tensor_digests(sharded)
    pc = PartsConfig(chunks=2, head_part=True)
    for a, b in zip(parts.plan(_model(pc, "hf-causal-lm"), one, file="p"), parts.plan(_model(pc, "hf-causal-lm"),
                                                                                       sharded, file="p")):
        assert a == b or (a.tensors, a.weight_bytes) == (b.tensors, b.weight_bytes)
        assert parts.part_digest(one, a, parts.tensor_digests(one)) == \
            parts.part_digest(sharded, b, parts.tensor_digests(sharded))
    head = parts.plan(_model(pc, "hf-causal-lm"), one, file="p")[-1]
    assert "model.embed_tokens.weight" in head.tensors  # the tied head's weight
    want = lm.eval()(input_ids=torch.tensor([[5, 6, 7]])).logits
    chain = Chain(tmp_path / "sharded", pc, "hf-causal-lm")
    ids, pos = torch.tensor([[5, 6, 7]], dtype=torch.int32), torch.arange(3, dtype=torch.int32)[None]
    with torch.no_grad():
        torch.testing.assert_close(chain.prefill(ids, pos)[0], want, atol=1e-5, rtol=1e-5)


# --- config errors: one line naming pyproject.toml and the field ------------------------------------------

BAD = [
    ("chunks = 0", "tool.export.models[0].chunks", "at least 1"),
    ('chunks = "2"', "tool.export.models[0].chunks", "whole number"),
    ("chunks = 2\nmax_part_mb = 10", "tool.export.models[0].max_part_mb", "not both"),
    ("max_part_mb = -1", "tool.export.models[0].max_part_mb", "positive"),
    ('head_split = "yes"', "tool.export.models[0].head_split", "auto"),
    ("head_split = 20000", "tool.export.models[0].head_split", "16384"),
    ('embed_part = "yes"', "tool.export.models[0].embed_part", "true or false"),
    ("chunks = 5", "tool.export.models[0].chunks", "5 chunks for a model of 4 decoder layers"),
    ("max_part_mb = 0.001", "tool.export.models[0].max_part_mb", "no split fits"),
    ("max_part_mb = 0.001\nembed_part = true", "tool.export.models[0].max_part_mb", "the embeddings alone"),
]


def _parted_toml(extra: str, checkpoint: str = "checkpoints/student.safetensors") -> str:
    return project_toml(f"""[tool.export]
artifacts = "artifacts"
shape_sets = "shape_sets.json"

[[tool.export.models]]
name = "student"
architecture = "student"
checkpoint = "{checkpoint}"
shape_set = "tiny"
{extra}
coreml = {{ compute_precision = "fp16" }}
""")


@pytest.fixture(scope="module")
def parted_project(tmp_path_factory) -> Project:
    """A project (not built) whose student is parted: its checkpoint a 4-layer student in safetensors."""
    root = tmp_path_factory.mktemp("parted") / "project"
    p = Project.create(root)
    write_checkpoint(root / "checkpoints" / "student.safetensors", "student", n_layers=4)
    return p


@pytest.mark.parametrize("extra,field,words", BAD, ids=[b[0] for b in BAD])
def test_bad_part_config_is_one_error_line(parted_project, tmp_path, extra, field, words):
    p = parted_project.copy(tmp_path / "p")
    (p.root / "pyproject.toml").write_text(_parted_toml(extra))
    r = p.doit("list", check=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {p.root / 'pyproject.toml'}: {field}: "), r.stderr
    assert words in lines[0]
    assert not (p.root / "artifacts").exists()


@pytest.mark.parametrize("checkpoint_line,words", [("demo", "safetensors checkpoint"),
                                                    ("checkpoints/student.pt", "safetensors checkpoint"),
                                                    ("checkpoints/model.bin", "safetensors checkpoint")])
def test_parted_model_needs_a_safetensors_checkpoint(tmp_path, checkpoint_line, words):
    table = {"models": [{"name": "s", "architecture": "student", "checkpoint": checkpoint_line, "shape_set": "t",
                         "chunks": 2}]}
    (tmp_path / "shape_sets.json").write_text(json.dumps({"t": {"prefill": [16], "decode": [16]}}))
    with pytest.raises(ExportError) as e:
        config_mod.parse(table, root=tmp_path, file=tmp_path / "pyproject.toml")
    assert e.value.field == "tool.export.models[0].chunks" and words in str(e.value)
    table["models"][0].update(architecture="judge", checkpoint="j.safetensors")
    with pytest.raises(ExportError, match="not a decoder LM"):
        config_mod.parse(table, root=tmp_path, file=tmp_path / "pyproject.toml")


@pytest.mark.parametrize("folder", ["Llama-3.2-1B", "Qwen2.5-0.5B-Instruct", "not-there-yet-2.5"])
def test_a_model_folder_with_dots_in_its_name_can_be_parted(tmp_path, folder):
    # Hugging Face's folders are named after the model, dots and all; a folder that is not there yet is judged by
    # its name's suffix, and the missing checkpoint is reported where checkpoints are read
    if folder != "not-there-yet-2.5":
        (tmp_path / folder).mkdir()
    (tmp_path / "shape_sets.json").write_text(json.dumps({"t": {"prefill": [16], "decode": [16]}}))
    table = {"models": [{"name": "s", "architecture": "hf-causal-lm", "checkpoint": folder, "shape_set": "t",
                         "chunks": 2}]}
    cfg = config_mod.parse(table, root=tmp_path, file=tmp_path / "pyproject.toml")
    assert cfg.models[0].parts is not None


def test_a_model_without_part_keys_is_not_parted(tmp_path):
    (tmp_path / "shape_sets.json").write_text(json.dumps({"t": {"prefill": [16], "decode": [16]}}))
    table = {"models": [{"name": "s", "architecture": "student", "checkpoint": "demo", "shape_set": "t"}]}
    assert config_mod.parse(table, root=tmp_path, file=tmp_path / "pyproject.toml").models[0].parts is None


# --- one copy of the weights: a part's programs refer to its tensors ---------------------------------------

WEIGHT = "Data/com.apple.CoreML/weights/weight.bin"


def _spec_without_contract(pkg: Path) -> bytes:
    from export.coreml.mlpackage import METADATA_PREFIX, read_spec

    spec = read_spec(pkg)
    spec.description.metadata.userDefined.pop(METADATA_PREFIX + "contract_digest")
    return spec.SerializeToString(deterministic=True)


@pytest.mark.parametrize("part_name", ["chunk1", "head"])
def test_part_programs_refer_to_their_tensors_and_convert_to_the_same_package(tmp_path, part_name):
    """A part's .pt2 as the build writes it holds none of its weights: each is a reference to its checkpoint
    tensor (a split head's piece to rows of lm_head.weight), read back bit for bit; it converts to the package
    a self-contained .pt2 of the part gives (same weight file and spec, but for the contract digest)."""
    from export import export_pytorch, program_weights, weight_refs
    from export.coreml.convert import convert
    from export.digest import file_digest, tree_files

    ck = _student(tmp_path)
    plan = {q.name: q for q in parts.plan(_model(PartsConfig(chunks=2, head_part=True, head_split=24)), parts.index(ck),
                                          file="p")}
    part = {**plan[part_name].to_json(), "digest": "0" * 32}
    dirs = {}
    for external in (False, True):
        d = dirs[external] = tmp_path / ("ref" if external else "whole")
        export_pytorch.export_part(ck, part, d, model_name="student", mode="prefill", T=T, formats=["exported_program"],
                                   dtype="fp32", external_weights=external)
    whole, ref = dirs[False] / f"prefill_T{T}.pt2", dirs[True] / f"prefill_T{T}.pt2"
    refs = weight_refs.read(ref)["tensors"]
    full = program_weights.load(whole)
    assert set(refs) == set(full.state_dict)  # every weight of the part is a reference: none is stored
    assert weight_refs.external_bytes(ref) == plan[part_name].checkpoint_bytes
    if part_name == "head":
        assert sorted(tuple(r["rows"]) for r in refs.values() if "rows" in r) == [(0, 24), (24, 48), (48, 64)]
    else:
        assert all(r["tensor"].startswith(("blocks.2.", "blocks.3.")) for r in refs.values())
    back = program_weights.load(ref, ck)
    for k, t in full.state_dict.items():
        assert torch.equal(t, back.state_dict[k]), k
    a = convert(whole, tmp_path / "a.mlpackage", dirs[False] / f"prefill_T{T}.contract.json", log=lambda *_: None)
    b = convert(ref, tmp_path / "b.mlpackage", dirs[True] / f"prefill_T{T}.contract.json", log=lambda *_: None,
                weights=ck)
    assert file_digest(a / WEIGHT) == file_digest(b / WEIGHT)
    assert _spec_without_contract(a) == _spec_without_contract(b)
    assert sorted(tree_files(a)) == sorted(tree_files(b))


def test_part_program_needs_its_own_tensors_only(tmp_path):
    """A part's program reads its own tensors: another part's tensor changed is no matter; its own, an error
    naming the tensor."""
    from export import export_pytorch, program_weights

    ck = _student(tmp_path)
    plan = {q.name: q for q in parts.plan(_model(PartsConfig(chunks=2)), parts.index(ck), file="p")}
    part = {**plan["chunk1"].to_json(), "digest": "0" * 32}
    export_pytorch.export_part(ck, part, tmp_path / "e", model_name="student", mode="decode", T=T,
                               formats=["exported_program"], external_weights=True)
    pt2 = tmp_path / "e" / f"decode_T{T}.pt2"
    from safetensors import safe_open

    with safe_open(str(ck), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = checkpoint.config_from_dict(checkpoint.get("student").config_cls, json.loads(meta["config"]))
    for name, ok in (("blocks.0.wq.weight", True), ("blocks.3.wq.weight", False)):
        edited = dict(state, **{name: state[name] + 1})
        other = tmp_path / f"{name}.safetensors"
        checkpoint.save(other, "student", cfg, edited)
        if ok:
            program_weights.load(pt2, other)
        else:
            with pytest.raises(ExportError) as e:
                program_weights.load(pt2, other)
            assert e.value.field == f"state_dict.{name}"


def test_a_worker_drops_the_last_parts_programs_before_it_loads_another(tmp_path):
    """A worker keeps the part it loaded and the programs it exported from it (for their conversion, in the same
    worker); loading another part drops both, so that the old part's weights are not held beside the new one's
    (export/runner/checkpoints.py). The ledger weighs a part's export by its tensors as held, in fp32: a bf16
    checkpoint's at twice their size in the file (export/parts.py ``held_bytes``)."""
    import weakref

    from export import export_pytorch
    from export.runner import checkpoints, programs

    ck = _student(tmp_path)
    plan = {q.name: q for q in parts.plan(_model(PartsConfig(chunks=2)), parts.index(ck), file="p")}
    chunk0, chunk1 = ({**plan[n].to_json(), "digest": "0" * 32} for n in ("chunk0", "chunk1"))
    try:
        loaded = checkpoints.load_part(str(ck), chunk0)
        export_pytorch.export_part(ck, chunk0, tmp_path / "e", model_name="student", mode="prefill", T=T,
                                   formats=["exported_program"], loaded=loaded, keep=programs.PROGRAMS.keep,
                                   external_weights=True)
        assert programs.PROGRAMS  # kept for its conversion
        weight = weakref.ref(next(loaded[2].parameters()))
        assert checkpoints.load_part(str(ck), chunk0) is loaded and programs.PROGRAMS  # its other leaves: kept
        del loaded
        checkpoints.load_part(str(ck), chunk1)
        assert not programs.PROGRAMS
        # freed now, not at the garbage collector's next turn (a program's graph modules refer to each other)
        assert weight() is None, "chunk0's weights are still held after chunk1 was loaded"
    finally:
        checkpoints.forget()
    # held bytes: fp32 as in the file; a bf16 copy of the same tensors is held at twice its file size
    from safetensors import safe_open

    with safe_open(str(ck), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = checkpoint.config_from_dict(checkpoint.get("student").config_cls, json.loads(meta["config"]))
    half = tmp_path / "bf16.safetensors"
    checkpoint.save(half, "student", cfg, {k: v.to(torch.bfloat16) for k, v in state.items()})
    names = plan["chunk1"].tensors
    in_file = sum(r.end - r.start for n, r in parts.index(half).tensors.items() if n in names)
    assert parts.held_bytes(ck, names) == plan["chunk1"].checkpoint_bytes == 2 * in_file
    assert parts.held_bytes(half, names) == 2 * in_file
    assert parts.held_bytes(half) == parts.held_bytes(ck) == sum(v.numel() * 4 for v in state.values())
    assert parts.held_bytes(tmp_path / "nothing.pt") is None


def test_part_of_a_sharded_checkpoint_reads_its_own_shards(tmp_path):
    """A part of a sharded transformers folder: its .pt2 refers to tensors in several shards; a worker given the
    config, the index and only those shards (what the Dask path ships, export/planner/tasks.py _weight_inputs)
    loads it, every weight bit for bit the self-contained program's."""
    import shutil

    from export import export_pytorch, program_weights
    from export.planner.tasks import _weight_inputs

    folder = _llama(tmp_path, "qwen2", shard="20KB")
    info = parts.index(folder)
    plan = {q.name: q for q in parts.plan(_model(PartsConfig(chunks=2, head_part=True), "hf-causal-lm"), info, file="p")}
    part = {**plan["chunk1"].to_json(), "digest": "0" * 32}
    for external in (False, True):
        export_pytorch.export_part(folder, part, tmp_path / f"e{external}", model_name="q", mode="prefill", T=T,
                                   formats=["exported_program"], external_weights=external)
    pt2 = tmp_path / "eTrue" / f"prefill_T{T}.pt2"
    files = _weight_inputs({"weights": str(folder), "exported": str(pt2)})
    shards = [f for f in files if f.name.endswith(".safetensors")]
    every = parts.checkpoint_files(folder)
    assert files[:2] == [folder / "config.json", folder / parts.INDEX_FILE]
    assert 1 < len(shards) < len(every) - 2, (shards, every)  # several shards, not all of them
    worker = tmp_path / "worker"
    worker.mkdir()
    for f in files:
        shutil.copy(f, worker / f.name)
    back = program_weights.load(pt2, worker)
    full = program_weights.load(tmp_path / "eFalse" / f"prefill_T{T}.pt2")
    assert back.state_dict.keys() == full.state_dict.keys()
    for k, t in full.state_dict.items():
        assert torch.equal(t, back.state_dict[k]), k


# --- a real build ------------------------------------------------------------------------------------------

PARTED = 'chunks = 2\nhead_part = true\nhead_split = 24'


def create_parted(root: Path) -> Project:
    p = Project.create(root)
    write_checkpoint(root / "checkpoints" / "student.safetensors", "student", n_layers=4)
    (root / "pyproject.toml").write_text(_parted_toml(PARTED))
    p.set_shape_sets({"tiny": {"prefill": [16], "decode": [16]}})
    return p


@pytest.fixture(scope="module")
def parted_built(shared_tmp):
    from scenario import build_once

    return build_once(shared_tmp, "parted", create_parted, "-n", "2")


LEAVES = [f"{mode}.T16.{part}" for mode in ("prefill", "decode") for part in ("chunk0", "chunk1", "head")]


@pytest.mark.slow
def test_parted_build_converts_verifies_and_bundles_every_part(parted_built):
    p = parted_built.project
    ran = p.ran()
    for step in ("export_pytorch", "convert_coreml", "verify_coreml"):
        assert {f"{step}:student.{leaf}" for leaf in LEAVES} <= ran
    assert {"bundle_coreml:student.chunk0", "bundle_coreml:student.chunk1", "bundle_coreml:student.head",
            "bundle_coreml:student", "verify_coreml:student.chunk0"} <= ran
    art = p.root / "artifacts" / "student"
    chain = json.loads((art / "contract.json").read_text())
    assert [(c["part"], c["layers"], c["feeds"]) for c in chain["chain"]] == [
        ("chunk0", [0, 2], "chunk1"), ("chunk1", [2, 4], "head"), ("head", [4, 4], None)]
    assert chain["chain"][1]["modes"]["decode"] == {"inputs": ["hidden_in", "position_ids", "k_cache", "v_cache"],
                                                    "outputs": ["hidden_out", "k_new", "v_new"], "states": []}
    assert chain["chain"][2]["modes"]["prefill"]["outputs"] == ["logits_0", "logits_1", "logits_2"]
    assert chain["chain"][2]["logits"] == [["logits_0", 0, 24], ["logits_1", 24, 48], ["logits_2", 48, 64]]
    head = json.loads((art / "head" / "contract.json").read_text())
    assert head["functions"]["prefill_T16"]["outputs"][0] == {"name": "logits_0", "shape": [1, 16, 24],
                                                              "dtype": "float32"}
    chunk1 = json.loads((art / "chunk1" / "contract.json").read_text())["functions"]["decode_T16"]
    assert chunk1["inputs"][2] == {"name": "k_cache", "shape": [2, 1, 2, 16, 8], "dtype": "float32"}
    for part in ("chunk0", "chunk1", "head"):
        assert (art / part / f"student.{part}.mlpackage" / "Manifest.json").is_file()
    # the exported programs, chained, are the whole model
    whole = checkpoint.load(p.root / "checkpoints" / "student.safetensors").model()
    from export import program_weights, weight_refs

    ck = p.root / "checkpoints" / "student.safetensors"
    progs = {part: program_weights.load(art / part / "exported" / "prefill_T16.pt2", ck).module()
             for part in ("chunk0", "chunk1", "head")}
    for part in ("chunk0", "chunk1", "head"):  # the build's programs keep the part's weights in the checkpoint
        assert weight_refs.external_bytes(art / part / "exported" / "decode_T16.pt2") > 0
    ids, pos = _padded(list(range(3, 14)))
    with torch.no_grad():
        want = whole.prefill(ids, pos)[0]
        h = progs["chunk0"](ids, pos)[0]
        h = progs["chunk1"](h, pos)[0]
        torch.testing.assert_close(torch.cat(progs["head"](h), -1), want, atol=1e-5, rtol=1e-5)
    # a part's memory estimate follows its own bytes, not the checkpoint's
    record = json.loads((p.root / "artifacts" / "last_build.json").read_text())["tasks"]
    reserved = {part: record[f"export_pytorch:student.prefill.T16.{part}"]["reserved_mb"] for part in ("chunk1", "head")}
    from export.stepdefs import STEPS

    plan = {q.name: q for q in parts.plan(_model(PartsConfig(chunks=2, head_part=True, head_split=24)),
                                          parts.index(p.root / "checkpoints" / "student.safetensors"), file="p")}
    for part, mb in reserved.items():  # an fp32 checkpoint: held as read
        assert parts.held_bytes(ck, plan[part].tensors) == plan[part].checkpoint_bytes
        assert mb == STEPS["export_pytorch"].need_mb(plan[part].checkpoint_bytes)


@pytest.mark.slow
def test_editing_one_layer_rebuilds_that_part_only(parted_built, tmp_path):
    from safetensors import safe_open

    p = parted_built.copy(tmp_path / "p")
    assert "up to date" in p.doit().stdout
    before = p.artifact_digests()
    ck = p.root / "checkpoints" / "student.safetensors"
    with safe_open(str(ck), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state["blocks.3.w_up.weight"] = state["blocks.3.w_up.weight"] * 1.5  # layer 3: chunk1's
    cfg = checkpoint.config_from_dict(checkpoint.get("student").config_cls, json.loads(meta["config"]))
    checkpoint.save(ck, "student", cfg, state)
    p.doit()
    chunk1 = {f"{step}:student.{leaf}" for step in ("export_pytorch", "convert_coreml", "verify_coreml")
              for leaf in LEAVES if leaf.endswith("chunk1")}
    # chunk1's leaves, its bundle and the bundle's check; the chain contract is made again from the parts'
    # contracts (chunk1's names its new digest) and comes out the same
    assert p.ran() == chunk1 | {"bundle_coreml:student.chunk1", "verify_coreml:student.chunk1",
                                "bundle_coreml:student"}
    after = p.artifact_digests()
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed and all(k.startswith("student/chunk1/") for k in changed), changed
    assert "up to date" in p.doit().stdout
    # never stale: the incremental build's bytes are a cold build's of the edited checkpoint
    cold = Project(tmp_path / "cold")
    shutil.copytree(p.root, cold.root, ignore=shutil.ignore_patterns("artifacts", ".export", ".cache"))
    cold.doit()
    assert cold.artifact_digests() == after


@pytest.mark.slow
def test_sharded_checkpoint_builds_the_same_bytes(tmp_path):
    """A transformers folder, single file and sharded: every part's artifacts are the same bytes (the parts'
    keys and contracts name their tensors' digests, not the files that hold them)."""
    import transformers

    from test_hf_causal_lm import SIZES

    config = transformers.LlamaConfig(**SIZES)
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(config)
    built = {}
    for name, shard in (("single", None), ("sharded", "40KB")):
        root = tmp_path / name
        p = Project.create(root)
        folder = root / "checkpoints" / "llama"
        lm.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        (root / "pyproject.toml").write_text(_parted_toml('chunks = 2\nmodes = ["prefill"]', "checkpoints/llama").replace(
            'architecture = "student"', 'architecture = "hf-causal-lm"'))
        p.set_shape_sets({"tiny": {"prefill": [16]}})
        p.doit("-n", "2")
        built[name] = p
    assert (tmp_path / "sharded" / "checkpoints" / "llama" / parts.INDEX_FILE).is_file()
    single, sharded = built["single"].artifact_digests(), built["sharded"].artifact_digests()
    assert any(k.endswith(".pt2") for k in single) and single == sharded


@pytest.mark.slow
def test_stateful_decode_per_chunk(tmp_path):
    """kv_cache = "state": each chunk keeps its own layers' K/V as Core ML states; the packages convert for
    iOS18 and their states after a step match the program's (the reference interpreter)."""
    p = create_parted(tmp_path / "p")
    (p.root / "pyproject.toml").write_text(_parted_toml("chunks = 2\nhead_part = true").replace(
        'coreml = { compute_precision = "fp16" }',
        'coreml = { compute_precision = "fp16", minimum_deployment_target = "iOS18", kv_cache = "state" }'))
    p.doit("-n", "2", "verify_coreml:*decode*")
    art = p.root / "artifacts" / "student"
    c = json.loads((art / "chunk1" / "exported" / "decode_T16.contract.json").read_text())
    assert [t["name"] for t in c["inputs"]] == ["hidden_in", "position_ids"]
    assert c["states"] == [{"name": n, "shape": [2, 1, 2, 16, 8], "dtype": "float16"} for n in ("k_cache", "v_cache")]
    verdict = json.loads((art / "chunk1" / "coreml" / "decode_T16.verify.json").read_text())
    assert verdict["ok"] and {"hidden_out", "state k_cache", "state v_cache"} == set(verdict["outputs"])
    head = json.loads((art / "head" / "exported" / "decode_T16.contract.json").read_text())
    assert head["states"] == [] and head["kv_cache"] == "explicit"  # no cache in the head: nothing to keep


@pytest.mark.slow
def test_parted_model_in_torchscript(tmp_path):
    """formats = ["torchscript", "exported_program"]: each part's TorchScript (self-contained: its weights in the
    file) is written beside its ExportedProgram and converted (convert_from is the first format), and the
    packages pass verification against the programs; the parts' TorchScript modules chained are the model."""
    p = Project.create(tmp_path / "p")
    write_checkpoint(p.root / "checkpoints" / "student.safetensors", "student", n_layers=4)
    (p.root / "pyproject.toml").write_text(_parted_toml('chunks = 2\nmodes = ["prefill"]\n'
                                                        'formats = ["torchscript", "exported_program"]'))
    p.set_shape_sets({"tiny": {"prefill": [16]}})
    p.doit()
    art = p.root / "artifacts" / "student"
    for part in ("chunk0", "chunk1"):
        c = json.loads((art / part / "exported" / "prefill_T16.contract.json").read_text())
        assert set(c["exports"]) == {"torchscript", "exported_program"}
        assert json.loads((art / part / "coreml" / "prefill_T16.verify.json").read_text())["ok"]
        assert (art / part / f"student.{part}.mlpackage" / "Manifest.json").is_file()
    assert (art / "contract.json").is_file()
    log = (p.root / ".export" / "logs" / "convert_coreml__student.prefill.T16.chunk1.log").read_text()
    assert "Torch Script" in log, log[-2000:]  # coremltools converted the TorchScript (its warning says so)
    whole = checkpoint.load(p.root / "checkpoints" / "student.safetensors").model()
    scripts = [torch.jit.load(str(art / part / "exported" / "prefill_T16.pt")) for part in ("chunk0", "chunk1")]
    ids, pos = _padded(list(range(3, 14)))
    with torch.no_grad():
        h = scripts[0](ids, pos)[0]
        torch.testing.assert_close(scripts[1](h, pos)[0], whole.prefill(ids, pos)[0], atol=1e-5, rtol=1e-5)


def test_a_lying_header_of_a_parted_checkpoint_is_one_error_line(parted_project, tmp_path):
    """The parts are planned from the header before any step: offsets beyond the file are refused, naming the
    file and the tensor, and nothing is built."""
    p = parted_project.copy(tmp_path / "p")
    (p.root / "pyproject.toml").write_text(_parted_toml("chunks = 2"))
    ck = p.root / "checkpoints" / "student.safetensors"
    data = ck.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["blocks.1.wq.weight"]["data_offsets"][1] += 4  # 4 bytes more than dtype x shape, past the others
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    ck.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    r = p.doit("list", check=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {ck}: header.blocks.1.wq.weight: "), lines[0]
    assert not (p.root / "artifacts").exists()
