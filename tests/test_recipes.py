"""Compression recipes through the real doit (tiny student, one mode, one T): a recipe change recompresses
only, A -> B -> A restores, two recipes side by side, a recipe the target cannot run is refused before any
step, the quality is measured, user metadata survives the merge, the nightly proves compressed packages
byte-reproducible; the tokenizer of a transformers model is shipped beside its bundle and listed in
contract.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from scenario import RECIPES_TOML, Project, export_head, model_toml, project_toml  # noqa: E402

def toml(recipes: list[str], target: str = "iOS18") -> str:
    names = ", ".join(f'"{r}"' for r in recipes)
    return project_toml(export_head() + RECIPES_TOML + model_toml(
        "student", "student", "checkpoints/student.pt", "one", modes='["prefill"]',
        coreml=f'{{ minimum_deployment_target = "{target}" }}', recipes=f"[{names}]",
        metadata='{ author = "Team A", license = "MIT", version = "1.2.0", short_description = "tiny student" }'))


def configure(p: Project, recipes: list[str], target: str = "iOS18") -> None:
    (p.root / "pyproject.toml").write_text(toml(recipes, target))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    p = Project.create(tmp_path_factory.mktemp("recipes") / "p")
    p.set_shape_sets({"one": {"prefill": [16]}})
    configure(p, ["lut4"])
    p.doit()
    return p


def steps_ran(p: Project) -> set[str]:
    """Tasks that ran their step, leaving out the numerical verification of the float packages and the prune."""
    return {t for t in p.ran() if not t.startswith(("verify_coreml:", "prune_artifacts"))}


FLOAT = {"export_pytorch:student.prefill.T16", "convert_coreml:student.prefill.T16", "bundle_coreml:student"}


def test_a_recipe_builds_a_compressed_package_its_quality_and_its_bundle(built):
    assert steps_ran(built) == FLOAT | {"compress_coreml:student.prefill.T16.lut4", "bundle_coreml:student.lut4"}
    art = built.root / "artifacts" / "student"
    assert (art / "student.mlpackage").is_dir() and (art / "student.lut4.mlpackage").is_dir()
    q = json.loads((art / "coreml" / "prefill_T16.lut4.quality.json").read_text())
    assert q["size_bytes"] < q["float_size_bytes"]
    assert 0 < q["max_abs_err"] and 0 < q["mean_abs_err"] <= q["max_abs_err"]
    assert 0.5 < q["top1_agreement"] <= 1 and q["mean_kl"] >= 0 and q["positions"] == 4 * 16
    assert q["weights_per_part"]["lm_head"] == 1 and q["weights_per_part"]["attention"] == 8
    # measured on the packages as shipped, in the numpy Core ML interpreter: its first sequence's logits give
    # part of the figures (the step compares 4 sequences)
    from export import contract
    from export.coreml.interpreter import Package
    from export.coreml.verify import seeded_inputs

    assert "interpreter" in q["method"]
    inputs = seeded_inputs(contract.read(art / "exported" / "prefill_T16.contract.json"), 0)
    a, b = (Package(art / "coreml" / name).run(None, inputs)["logits"].astype("float64")
            for name in ("prefill_T16.mlpackage", "prefill_T16.lut4.mlpackage"))
    assert 0 < abs(a - b).max() <= q["max_abs_err"]
    record = json.loads((built.root / "artifacts" / "last_build.json").read_text())
    assert record["tasks"]["compress_coreml:student.prefill.T16.lut4"]["quality"] == q
    report = json.loads((built.root / "artifacts" / "report.json").read_text())
    [row] = report["recipes"]["student"]
    assert row["recipe"] == "lut4" and row["size_bytes"] > 0 and row["top1_agreement"] == q["top1_agreement"]
    assert "<h2>Recipes</h2>" in (built.root / "artifacts" / "report.html").read_text()


def test_user_metadata_survives_the_merge(built):
    from export.coreml.mlpackage import METADATA_PREFIX, read_spec

    for name in ("student.mlpackage", "student.lut4.mlpackage"):
        meta = read_spec(built.root / "artifacts" / "student" / name).description.metadata
        assert (meta.author, meta.license, meta.versionString, meta.shortDescription) == \
            ("Team A", "MIT", "1.2.0", "tiny student")
    meta = read_spec(built.root / "artifacts" / "student" / "student.lut4.mlpackage").description.metadata
    assert json.loads(meta.userDefined[METADATA_PREFIX + "recipe"])["name"] == "lut4"


def test_recipe_change_recompresses_only_and_switching_back_restores(built, tmp_path):
    p = built.copy(tmp_path / "p")
    reference = p.artifact_digests()
    configure(p, ["int8"])
    p.doit()
    assert steps_ran(p) == {"compress_coreml:student.prefill.T16.int8", "bundle_coreml:student.int8"}
    art = p.root / "artifacts" / "student"
    assert not (art / "coreml" / "prefill_T16.lut4.mlpackage").exists()  # pruned with its leaf
    configure(p, ["lut4"])
    p.doit()
    assert steps_ran(p) == set()
    assert p.restored() == {"compress_coreml:student.prefill.T16.lut4", "bundle_coreml:student.lut4"}
    now = p.artifact_digests()
    assert {k: v for k, v in now.items() if "lut4" in k} == {k: v for k, v in reference.items() if "lut4" in k}


def test_two_recipes_build_side_by_side(built, tmp_path):
    p = built.copy(tmp_path / "p")
    configure(p, ["lut4", "int4"])
    p.doit()
    assert steps_ran(p) == {"compress_coreml:student.prefill.T16.int4", "bundle_coreml:student.int4"}
    art = p.root / "artifacts" / "student"
    for r in ("lut4", "int4"):
        assert (art / f"student.{r}.mlpackage" / "Manifest.json").is_file()
        assert json.loads((art / "coreml" / f"prefill_T16.{r}.quality.json").read_text())["top1_agreement"] > 0.5
    rows = json.loads((p.root / "artifacts" / "report.json").read_text())["recipes"]["student"]
    assert sorted(r["recipe"] for r in rows) == ["int4", "lut4"]
    assert [r["size_bytes"] for r in rows] == sorted(r["size_bytes"] for r in rows)


def test_a_recipe_the_target_cannot_run_is_refused_before_any_step(built, tmp_path):
    p = built.copy(tmp_path / "p")
    before = p.artifact_digests()
    configure(p, ["int8", "lut4"], target="iOS17")
    r = p.doit(check=False)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "pyproject.toml" in lines[0] and "tool.export.models[0].recipes[1]" in lines[0]
    assert "per_grouped_channel" in lines[0] and "iOS18" in lines[0]
    assert p.artifact_digests() == before


def test_nightly_proves_compressed_packages_reproducible(built, tmp_path):
    p = built.copy(tmp_path / "p")
    p.doit("nightly")
    report = json.loads((p.root / "artifacts" / "nightly.json").read_text())
    task = report["tasks"]["compress_coreml:student.prefill.T16.lut4"]
    assert task["status"] == "built" and task["reproducible"] is True
    assert report["tasks"]["bundle_coreml:student.lut4"]["reproducible"] is True
    assert report["non_reproducible"] == []


def save_tokenizer(folder: Path, extra_word: str = "") -> None:
    """A real (tiny, word-level) tokenizer saved as transformers saves one: tokenizer.json + tokenizer_config.json."""
    import tokenizers
    import transformers

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "hello", "world", *([extra_word] if extra_word else [])])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(folder)


def test_tokenizer_and_parts_of_a_transformers_model(tmp_path):
    """A tiny Llama: its weights fall into the recipe's parts; its tokenizer and generation config reach the
    artifacts and contract.json; a tokenizer change rebundles and reconverts nothing."""
    from test_hf_causal_lm import save_family

    from export.digest import file_digest

    p = Project.create(tmp_path / "p")
    folder = save_family(p.root / "models", "llama")
    save_tokenizer(folder)
    assert (folder / "generation_config.json").is_file()
    (p.root / "pyproject.toml").write_text(project_toml(export_head() + RECIPES_TOML + model_toml(
        "llama", "hf-causal-lm", "models/llama", "hf", modes='["prefill"]',
        coreml='{ minimum_deployment_target = "iOS18" }', recipes='["lut4"]')))
    p.set_shape_sets({"hf": {"prefill": [16]}})
    p.doit()
    art = p.root / "artifacts" / "llama"
    q = json.loads((art / "coreml" / "prefill_T16.lut4.quality.json").read_text())
    assert q["weights_per_part"] == {"default": 0, "embeddings": 1, "attention": 8, "ffn": 6, "lm_head": 1}
    contract = json.loads((art / "contract.json").read_text())
    names = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
    assert sorted(contract["files"]) == sorted(names)
    for n in names:
        assert (art / n).read_bytes() == (folder / n).read_bytes()
        assert contract["files"][n]["digest"] == file_digest(folder / n)
    save_tokenizer(folder, extra_word="again")
    p.doit()
    assert steps_ran(p) == {"bundle_coreml:llama"}
    assert json.loads((art / "contract.json").read_text())["files"]["tokenizer.json"]["digest"] == \
        file_digest(folder / "tokenizer.json") != contract["files"]["tokenizer.json"]["digest"]


BAD_RECIPES = [
    ('[tool.export.recipes.r]\nattn = { quantize = "int8" }\n', ["student"], "tool.export.recipes.r.attn", "unknown part"),
    ('[tool.export.recipes.r]\ndefault = { quantize = "int8", palettize_bits = 4 }\n', ["r"], "tool.export.recipes.r.default",
     "exactly one"),
    ('[tool.export.recipes.r]\ndefault = { palettize_bits = 5 }\n', ["r"], "tool.export.recipes.r.default.palettize_bits",
     "not one of"),
    ('[tool.export.recipes.r]\ndefault = { palettize_bits = 4, group_size = 8 }\n', ["r"],
     "tool.export.recipes.r.default.group_size", "per_grouped_channel"),
    ('[tool.export.recipes.r]\ndefault = { quantize = "int2" }\n', ["r"], "tool.export.recipes.r.default.quantize", "not one of"),
    ('[tool.export.recipes.r]\ndefault = "none"\n', ["r"], "tool.export.recipes.r", "compresses nothing"),
    ('[tool.export.recipes.r]\ndefault = { quantize = "int8" }\n', ["s"], "tool.export.models[0].recipes[0]", "unknown value"),
]


@pytest.mark.parametrize("recipes,picked,field,words", BAD_RECIPES)
def test_bad_recipes_name_the_file_and_the_field(tmp_path, recipes, picked, field, words):
    import tomllib

    from export import config
    from export.errors import ExportError

    (tmp_path / "shape_sets.json").write_text(json.dumps({"one": {"prefill": [16]}}))
    names = ", ".join(f'"{r}"' for r in picked)
    text = (f'[tool.export]\n{recipes}\n[[tool.export.models]]\nname = "student"\nshape_set = "one"\nmodes = ["prefill"]\n'
            f'coreml = {{ minimum_deployment_target = "iOS18" }}\nrecipes = [{names}]\n')
    with pytest.raises(ExportError) as e:
        config.parse(tomllib.loads(text)["tool"]["export"], root=tmp_path, file=tmp_path / "pyproject.toml")
    assert e.value.field == field and words in str(e.value)


def test_in_conversion_compression_and_recipes_do_not_mix(tmp_path):
    import tomllib

    from export import config
    from export.errors import ExportError

    (tmp_path / "shape_sets.json").write_text(json.dumps({"one": {"prefill": [16]}}))
    text = ('[tool.export]\n[tool.export.recipes.r]\ndefault = { quantize = "int8" }\n[[tool.export.models]]\n'
            'name = "student"\nshape_set = "one"\nmodes = ["prefill"]\ncoreml = { compression = "palettize", minimum_deployment_target = "iOS18" }\nrecipes = ["r"]\n'
            'metadata = { author = "a" }\n')
    with pytest.raises(ExportError) as e:
        config.parse(tomllib.loads(text)["tool"]["export"], root=tmp_path, file=tmp_path / "pyproject.toml")
    assert e.value.field == "tool.export.models[0].coreml.compression" and "[tool.export.recipes]" in str(e.value)
    ok = text.replace('coreml = { compression = "palettize", minimum_deployment_target = "iOS18" }\n', "")
    m = config.parse(tomllib.loads(ok)["tool"]["export"], root=tmp_path, file=tmp_path / "pyproject.toml").models[0]
    assert [r.name for r in m.recipes] == ["r"] and m.metadata == (("author", "a"),)
    bad = ok.replace('metadata = { author = "a" }', 'metadata = { owner = "a" }')
    with pytest.raises(ExportError) as e:
        config.parse(tomllib.loads(bad)["tool"]["export"], root=tmp_path, file=tmp_path / "pyproject.toml")
    assert e.value.field == "tool.export.models[0].metadata.owner"


def test_weight_names_fall_into_parts():
    """Names as coremltools gives them (listed from converted tiny student, Llama and judge packages)."""
    from export.coreml.compress import part_of

    assert [part_of(n) for n in ("p_model_embed_weight_to_fp16", "p_model_blocks_0_wq_weight_to_fp16",
                                 "p_model_blocks_1_wo_weight_to_fp16", "p_model_blocks_0_w_gate_weight_to_fp16",
                                 "p_model_blocks_0_w_down_weight_to_fp16", "p_model_lm_head_weight_to_fp16")] == \
        ["embeddings", "attention", "attention", "ffn", "ffn", "lm_head"]
    assert [part_of(n) for n in ("p_model_lm_model_embed_tokens_weight_to_fp16",
                                 "p_model_lm_model_layers_0_self_attn_k_proj_weight_to_fp16",
                                 "p_model_lm_model_layers_0_mlp_up_proj_weight_to_fp16", "p_model_lm_lm_head_weight_to_fp16")] == \
        ["embeddings", "attention", "ffn", "lm_head"]
    assert [part_of(n) for n in ("p_embed_weight", "p_pos_weight", "p_layers_0_qkv_weight", "p_layers_0_out_weight",
                                 "p_layers_0_fc1_weight", "p_head_weight")] == \
        ["embeddings", "default", "attention", "attention", "ffn", "default"]
