"""A converted float package + a recipe (export/recipes.py) -> a compressed, byte-stable package.

Weights are sorted into parts by the names of their const ops in the converted
MIL program (``PART_PATTERNS``: the names coremltools gives the weights of an
ExportedProgram follow the module path, e.g. ``p_model_blocks_0_wq_weight_to_fp16``
for the student and ``p_model_lm_model_layers_0_self_attn_q_proj_weight_to_fp16`` for a
transformers Llama; tests/test_recipes.py lists the real names of both).
Only the program's parameters (``p_...``) of rank 2 or more are compressed
(norm gains, biases and the converter's own constants stay float). Each part's setting becomes one op-name config of
``ct.optimize.coreml.palettize_weights`` or ``linear_quantize_weights``.
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

from ..atomic import atomic_path
from .checks import check_device_limits
from ..errors import ExportError
from ..recipes import PARTS
from ..stepdefs import STEPS
from ..toolchain import versions
from .mlpackage import METADATA_PREFIX, canonicalize, read_spec
from .weight_file import integer_constants_inline

# first match wins; what matches none is "default"
PART_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("embeddings", re.compile(r"(^|_)(embed|embed_tokens|tok_embeddings|wte|word_embeddings)_weight")),
    ("lm_head", re.compile(r"(^|_)(lm_head(_\d+)?|output)_weight")),  # lm_head_<i>: a piece of a split head (parts)
    ("attention", re.compile(r"(^|_)(wq|wk|wv|wo|q_proj|k_proj|v_proj|o_proj|qkv_proj|out_proj|qkv|out|dense|query_key_value)_weight")),
    ("ffn", re.compile(r"(^|_)(w_gate|w_up|w_down|gate_proj|up_proj|down_proj|gate_up_proj|fc1|fc2|w1|w2|w3)_weight")),
)
MIN_RANK = 2
PARAMETER_PREFIX = "p_"  # coremltools names an ExportedProgram's parameters after their placeholders (p_<path>)


def part_of(name: str) -> str:
    for part, pattern in PART_PATTERNS:
        if pattern.search(name):
            return part
    return "default"


def weights(mlmodel) -> dict[str, tuple[int, ...]]:
    """The model's weight consts (name -> shape), as ``ct.optimize.coreml`` names them."""
    from coremltools.optimize.coreml import get_weights_metadata

    meta = get_weights_metadata(mlmodel, weight_threshold=0)
    return {name: tuple(m.val.shape) for name, m in sorted(meta.items())
            if name.startswith(PARAMETER_PREFIX) and m.val is not None and m.val.ndim >= MIN_RANK}


def assignment(mlmodel) -> dict[str, str]:
    """Weight const name -> part."""
    return {name: part_of(name) for name in weights(mlmodel)}


def _op_config(setting: dict):
    from coremltools.optimize import coreml as cto

    if setting["kind"] == "palettize":
        kw = {"nbits": setting["bits"], "mode": "uniform", "granularity": setting["granularity"], "weight_threshold": 0}
        if setting["granularity"] == "per_grouped_channel":
            kw["group_size"] = setting["group_size"]
        return cto.OpPalettizerConfig(**kw)
    kw = {"mode": "linear_symmetric", "dtype": setting["dtype"], "granularity": setting["granularity"],
          "weight_threshold": 0}
    if setting["granularity"] == "per_block":
        kw["block_size"] = setting["block_size"]
    return cto.OpLinearQuantizerConfig(**kw)


def apply(mlmodel, recipe: dict):
    """Compress ``mlmodel`` (a float ``ct.models.MLModel``) by ``recipe`` (``Recipe.to_json()``)."""
    from coremltools.optimize import coreml as cto

    parts = assignment(mlmodel)
    by_kind: dict[str, dict] = {"palettize": {}, "quantize": {}}
    for name, part in parts.items():
        setting = recipe["parts"][part]
        if setting["kind"] != "none":
            by_kind[setting["kind"]][name] = _op_config(setting)
    with warnings.catch_warnings(), integer_constants_inline():  # the same weight file for every T (weight_file.py)
        warnings.simplefilter("ignore")
        if by_kind["palettize"]:
            mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=by_kind["palettize"]))
        if by_kind["quantize"]:
            mlmodel = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=by_kind["quantize"]))
    return mlmodel, parts


def compress(package: Path | str, out: Path | str, recipe: dict, *, log=print, device_limits: dict | None = None) -> dict:
    """Write ``out``, the float ``package`` compressed by ``recipe``; return {part: number of weights}."""
    import coremltools as ct

    package, out = Path(package), Path(out)
    if not (package / "Manifest.json").is_file():
        raise ExportError("not an .mlpackage (no Manifest.json)", file=package, field="package")
    float_meta = dict(read_spec(package).description.metadata.userDefined)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    try:
        compressed, parts = apply(mlmodel, recipe)
    except ExportError:
        raise
    except Exception as e:  # coremltools raises anything from deep inside; keep its first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"coremltools could not compress with recipe {recipe['name']!r}: {type(e).__name__}: {first}",
                          file=package, field=f"recipes.{recipe['name']}") from None
    counts = {p: sum(1 for v in parts.values() if v == p) for p in PARTS}
    log(f"recipe {recipe['name']}: weights per part {counts}")
    meta = {k: v for k, v in float_meta.items() if k.startswith(METADATA_PREFIX)}
    meta[METADATA_PREFIX + "recipe"] = json.dumps(recipe, sort_keys=True)
    meta[METADATA_PREFIX + "toolchain"] = json.dumps(versions(STEPS["compress_coreml"].tools), sort_keys=True)
    spec = compressed.get_spec()
    with atomic_path(out, is_dir=True) as tmp:
        shutil.copytree(compressed.package_path, tmp, dirs_exist_ok=True)
        canonicalize(tmp, meta, spec=spec)
        if device_limits is not None:  # "fail": refused before it appears (export/coreml/checks.py)
            check_device_limits(tmp, device_limits["target"], device_limits["policy"], file=out)
    return counts
