"""The architectures in eager mode: the declared IO, prefill/decode agreement, padding."""
from __future__ import annotations

import pytest
import torch

from export.models.registry import all_architectures, get
from export.models.names import ARCHITECTURE_MODES, ARCHITECTURE_NAMES

from conftest import TINY, tiny_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32}


def rollout_logits(prefill, decode, ids: list[int], n: int, T: int):
    """Prefill the first ``n`` of ``ids`` (padded to T), then decode the rest one by one,
    writing each step's k_new/v_new into slot ``position`` of the cache.
    Returns (logits of the decode steps [k, V], the final K/V caches)."""
    k = len(ids) - n
    inp = torch.zeros(1, T, dtype=torch.int32)
    inp[0, :n] = torch.tensor(ids[:n], dtype=torch.int32)
    pos = torch.arange(T, dtype=torch.int32)[None]
    _, k_cache, v_cache = prefill(inp, pos)
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    # Slots >= n hold the padding's K/V: garbage the decode mask must ignore. Make it loud.
    k_cache[:, :, :, n:] = 1e3
    v_cache[:, :, :, n:] = -1e3
    out = []
    for i in range(k):
        p = n + i
        logits, k_new, v_new = decode(torch.tensor([[ids[p]]], dtype=torch.int32),
                                      torch.tensor([[p]], dtype=torch.int32), k_cache, v_cache)
        out.append(logits[0, 0])
        k_cache[:, :, :, p:p + 1] = k_new
        v_cache[:, :, :, p:p + 1] = v_new
    return torch.stack(out), k_cache, v_cache


def full_prefill(prefill, ids: list[int], T: int):
    inp = torch.zeros(1, T, dtype=torch.int32)
    inp[0, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return prefill(inp, torch.arange(T, dtype=torch.int32)[None])


def test_registry_matches_names():
    REGISTRY = all_architectures()
    assert tuple(REGISTRY) == ARCHITECTURE_NAMES
    for name in ARCHITECTURE_NAMES:
        assert REGISTRY[name].modes == ARCHITECTURE_MODES[name]


def test_unknown_architecture_names_field():
    from export.errors import ExportError

    with pytest.raises(ExportError) as e:
        get("gpt5", file="x.pt")
    assert "x.pt" in str(e.value) and "architecture" in str(e.value) and "gpt5" in str(e.value)


@pytest.mark.parametrize("arch", sorted(TINY))  # hf-causal-lm: tests/test_hf_causal_lm.py
@pytest.mark.parametrize("T", [8, 32])
def test_wrapped_outputs_match_declared_io(arch, T):
    """wrap(model, mode)(*example_inputs) returns exactly what io() declares, in order."""
    a = get(arch)
    config, model = tiny_model(arch)
    for mode in a.modes:
        spec = a.io(config, mode, T)
        ex = a.example_inputs(config, mode, T, torch.float32, torch.Generator().manual_seed(1))
        assert [tuple(x.shape) for x in ex] == [t.shape for t in spec.inputs]
        assert [x.dtype for x in ex] == [DTYPES[t.dtype] for t in spec.inputs]
        with torch.no_grad():
            out = a.wrap(model, mode)(*ex)
        out = out if isinstance(out, tuple) else (out,)
        assert [tuple(o.shape) for o in out] == [t.shape for t in spec.outputs]
        assert [o.dtype for o in out] == [DTYPES[t.dtype] for t in spec.outputs]
        assert all(torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("n,k,T", [(1, 7, 8), (5, 4, 16), (3, 12, 32)])
def test_student_prefill_then_decode_equals_longer_prefill(n, k, T):
    a = get("student")
    config, model = tiny_model("student")
    prefill, decode = a.wrap(model, "prefill"), a.wrap(model, "decode")
    ids = torch.randint(0, config.vocab_size, (n + k,), generator=torch.Generator().manual_seed(n * 100 + k)).tolist()
    with torch.no_grad():
        got, k_cache, v_cache = rollout_logits(prefill, decode, ids, n, T)
        want, k_full, v_full = full_prefill(prefill, ids, T)
    torch.testing.assert_close(got, want[0, n:n + k], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k_cache[:, :, :, :n + k], k_full[:, :, :, :n + k], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v_cache[:, :, :, :n + k], v_full[:, :, :, :n + k], atol=1e-4, rtol=1e-4)


def test_student_prefill_padding_does_not_leak():
    """Logits of the real tokens do not depend on what pads the tail."""
    a = get("student")
    config, model = tiny_model("student")
    prefill = a.wrap(model, "prefill")
    T, n = 16, 6
    pos = torch.arange(T, dtype=torch.int32)[None]
    x = torch.randint(0, config.vocab_size, (1, T), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    y = x.clone()
    y[:, n:] = (y[:, n:] + 7) % config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(prefill(x, pos)[0][:, :n], prefill(y, pos)[0][:, :n], atol=1e-5, rtol=1e-5)


def test_judge_score_ignores_padding():
    a = get("judge")
    config, model = tiny_model("judge")
    T, n = 16, 5
    ids = torch.randint(0, config.vocab_size, (1, T), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    mask = torch.zeros(1, T, dtype=torch.int32)
    mask[:, :n] = 1
    other = ids.clone()
    other[:, n:] = (other[:, n:] + 11) % config.vocab_size
    with torch.no_grad():
        s1, s2 = model(ids, mask), model(other, mask)
        short = model(ids[:, :8], mask[:, :8])  # the same real tokens at another T
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, short, atol=1e-5, rtol=1e-5)
