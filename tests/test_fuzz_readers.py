"""Fuzzing the readers of user input: the config, shape_sets.json and contracts.
Any input either loads or raises ExportError (naming a file) — nothing else escapes."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export import config, contract, shape_sets
from export.errors import ExportError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

# JSON values, biased towards what the readers look for
KEYS = st.sampled_from(["name", "architecture", "checkpoint", "shape_set", "modes", "formats", "convert_from",
                        "dtype", "coreml", "artifacts", "shape_sets", "models", "cache", "memory_budget_mb",
                        "local", "remote", "read_only", "compute_precision", "minimum_deployment_target",
                        "compute_units", "kv_cache", "compression", "palettize_bits", "prefill", "decode",
                        "default", "tiny", "student", "judge", ""]) | st.text(max_size=8)
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
           | st.sampled_from(["student", "judge", "demo", "prefill", "decode", "fp16", "fp32", "iOS17", "iOS18",
                              "exported_program", "torchscript", "tiny", "state", "explicit", "palettize", "../x",
                              "a/b", "", "hf-causal-lm", "all"])
           | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
                    max_leaves=20)

GOOD_SETS = {"tiny": {"prefill": [16, 32], "decode": [16]}, "default": {"prefill": [8], "decode": [8]}}


def _model(draw_dict):
    return draw_dict


MODEL = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["student", "judge", "a/b", "..", "", "x" * 70]) | SCALARS,
    "architecture": st.sampled_from(["student", "judge", "hf-causal-lm", "gpt9"]) | SCALARS,
    "checkpoint": st.sampled_from(["demo", "checkpoints/x.pt", ""]) | SCALARS,
    "shape_set": st.sampled_from(["tiny", "default", "nope"]) | SCALARS,
    "modes": st.lists(st.sampled_from(["prefill", "decode", "train"]), max_size=3) | JSON,
    "formats": st.lists(st.sampled_from(["exported_program", "torchscript", "onnx"]), max_size=3) | JSON,
    "convert_from": st.sampled_from(["exported_program", "torchscript"]) | SCALARS,
    "dtype": st.sampled_from(["fp32", "fp16", "int8"]) | SCALARS,
    "coreml": st.dictionaries(st.sampled_from(["compute_precision", "minimum_deployment_target", "compute_units",
                                               "kv_cache", "compression", "palettize_bits", "x"]),
                              SCALARS, max_size=4) | JSON,
}) | JSON
TABLE = st.fixed_dictionaries({}, optional={
    "artifacts": st.just("artifacts") | SCALARS,
    "shape_sets": st.just("shape_sets.json") | SCALARS,
    "models": st.lists(MODEL, max_size=3) | JSON,
    "cache": st.dictionaries(st.sampled_from(["local", "remote", "read_only", "x"]), SCALARS, max_size=3) | JSON,
    "memory_budget_mb": SCALARS,
}) | JSON


def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="fuzz-config-"))
    (root / "shape_sets.json").write_text(json.dumps(GOOD_SETS))
    return root


ROOT = None


@FUZZ
@given(TABLE)
def test_config_parse_loads_or_raises_export_error(table):
    global ROOT
    ROOT = ROOT or _root()
    try:
        c = config.parse(table, root=ROOT, file=ROOT / "pyproject.toml")
    except ExportError as e:
        assert e.file and str(e).strip()
        return
    assert c.models and all(m.leaves() for m in c.models)


SETS_TEXT = (st.builds(json.dumps, JSON)
             | st.builds(json.dumps, st.dictionaries(KEYS, st.dictionaries(KEYS, st.lists(SCALARS, max_size=4)
                                                                          | JSON, max_size=3), max_size=3))
             | st.text(max_size=40)
             | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))


@FUZZ
@given(SETS_TEXT)
def test_shape_sets_load_loads_or_raises_export_error(text):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "shape_sets.json"
        f.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            data = shape_sets.load(f)
        except ExportError as e:
            assert e.file == str(f)
            return
    assert data and all(ts and all(type(t) is int and t > 0 for t in ts) for modes in data.values()
                        for ts in modes.values())


def _valid_contract() -> dict:
    return {
        "schema": contract.SCHEMA, "schema_version": contract.SCHEMA_VERSION, "model": "student",
        "architecture": "student", "mode": "prefill", "T": 16, "dtype": "float32",
        "inputs": [{"name": "input_ids", "shape": [1, 16], "dtype": "int32"}],
        "outputs": [{"name": "logits", "shape": [1, 16, 64], "dtype": "float32"}],
        "states": [], "exports": {"exported_program": {"file": "prefill_T16.pt2", "digest": "0" * 32}},
        "checkpoint": {"digest": "1" * 32}, "toolchain": {"torch": "2.13.0"},
    }


def _mutated(draw):
    c = _valid_contract()
    for _ in range(draw(st.integers(1, 3))):
        keys = [*c.keys()]
        where = draw(st.sampled_from(keys))
        what = draw(st.sampled_from(["drop", "set", "nest"]))
        if what == "drop":
            c.pop(where)
        elif what == "set":
            c[where] = draw(JSON)
        elif isinstance(c[where], list) and c[where] and isinstance(c[where][0], dict):
            k = draw(st.sampled_from([*c[where][0].keys(), "extra"]))
            c[where][0][k] = draw(JSON)
        elif isinstance(c[where], dict) and c[where]:
            k = draw(st.sampled_from([*c[where].keys()]))
            c[where][k] = draw(JSON)
    return c


CONTRACTS = st.composite(lambda draw: _mutated(draw))() | JSON


@FUZZ
@given(CONTRACTS, st.booleans())
def test_contract_validate_accepts_or_raises_export_error(data, aggregate):
    try:
        contract.validate(data, file="c.json", aggregate=aggregate)
    except ExportError as e:
        assert e.file == "c.json"


CONTRACT_TEXT = st.builds(json.dumps, CONTRACTS) | st.text(max_size=40)


@FUZZ
@given(CONTRACT_TEXT)
def test_contract_read_reads_or_raises_export_error(text):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "x.contract.json"
        f.write_text(text, errors="surrogatepass")
        try:
            c = contract.read(f)
        except ExportError as e:
            assert e.file == str(f)
            return
    assert c["schema"] == contract.SCHEMA


def test_the_valid_contract_is_valid():
    """The fuzzers start from a valid contract: otherwise they would test only rejections."""
    contract.validate(_valid_contract(), file="c.json")


def test_a_valid_table_loads(tmp_path):
    """The config fuzzer reaches the success path too (a table it can draw loads)."""
    (tmp_path / "shape_sets.json").write_text(json.dumps(GOOD_SETS))
    c = config.parse({"models": [{"name": "student", "shape_set": "tiny"}]}, root=tmp_path, file=tmp_path / "p.toml")
    assert c.models[0].leaves() == [("prefill", 16), ("prefill", 32), ("decode", 16)]
