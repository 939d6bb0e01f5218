"""What a recipe costs in accuracy: a compressed package against its float package, both run as shipped.

Both packages run in the numpy reference interpreter of Core ML programs
(``export/coreml/interpreter.py``, the one numerical verification uses): the
compressed package's ``constexpr_*`` ops decompress its weights exactly as the
device does, and every op rounds to the dtype the program declares (fp16
activations for an fp16 package). They get the same fixed token sequences:

- prefill: ``SEQUENCES`` seeded sequences of T tokens (export/coreml/verify.py ``seeded_inputs``);
- decode: one seeded sequence of ``min(DECODE_TOKENS, T)`` tokens decoded one by one from an empty
  cache, each package carrying its own cache (its states, or its ``k_new``/``v_new`` written into the
  ``k_cache``/``v_cache`` inputs), so the compressed package's error accumulates as it would on device.

Figures, on the main output (``logits`` when there is one):

- ``max_abs_err``, ``mean_abs_err`` of the logits;
- ``top1_agreement``: the share of positions whose arg-max token agrees;
- ``mean_kl``: the mean KL divergence (float || compressed) of the next-token
  distribution, in nats.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .. import contract as contract_mod

SEQUENCES = 4  # fixed token sequences per prefill leaf (seeded)
DECODE_TOKENS = 16  # tokens of the fixed decode sequence (at most T)
METHOD = "both packages in the numpy Core ML interpreter (export/coreml/interpreter.py), same fixed tokens"


def _runs(pkg, c: dict) -> list[dict[str, np.ndarray]]:
    """The package's outputs on the fixed inputs of contract ``c``: one dict per prefill sequence or decode step."""
    from .verify import _vocab, seeded_inputs

    if c["mode"] != "decode":
        return [pkg.run(None, seeded_inputs(c, seed)) for seed in range(SEQUENCES)]
    T = int(c["T"])
    ids = np.random.default_rng(0).integers(3, _vocab(c), size=min(DECODE_TOKENS, T)).astype(np.int32)
    state = pkg.make_state(None) if c["states"] else None
    names = {t["name"] for t in c["inputs"]}
    cache = {t["name"]: np.zeros(t["shape"], np.dtype(t["dtype"])) for t in c["inputs"]
             if t["name"] in ("k_cache", "v_cache")}
    hidden = {t["name"]: np.random.default_rng(1).standard_normal((len(ids), *t["shape"])).astype(np.dtype(t["dtype"]))
              for t in c["inputs"] if t["name"] == "hidden_in"}  # a part of a chain: the part before's output
    out = []
    for p, token in enumerate(ids):
        step = {"input_ids": np.array([[token]], np.int32), "position_ids": np.array([[p]], np.int32),
                **{n: h[p] for n, h in hidden.items()}, **cache}
        res = pkg.run(None, {n: v for n, v in step.items() if n in names}, state=state)
        for name, new in (("k_cache", "k_new"), ("v_cache", "v_new")):
            if name in cache and new in res:
                axis = next(i for i, (a, b) in enumerate(zip(cache[name].shape, res[new].shape)) if a != b)
                index = [slice(None)] * cache[name].ndim
                index[axis] = slice(p, p + 1)
                cache[name][tuple(index)] = res[new].astype(cache[name].dtype)
        out.append(res)
    return out


def measure(float_package: Path, package: Path, contract: Path) -> dict:
    """Run the float and the compressed package on the same fixed tokens; compare their main output."""
    from .interpreter import Package

    c = contract_mod.read(contract)
    out_names = [t["name"] for t in c["outputs"]]
    pieces = [n for n in out_names if n == "logits" or re.fullmatch(r"logits_\d+", n)]  # a split head: its pieces
    main = "logits" if pieces else out_names[0]
    reference = _runs(Package(float_package), c)
    candidate = _runs(Package(package), c)
    errs, agree, kls, n = [], 0, [], 0
    for ra, rb in zip(reference, candidate):
        a, b = _main(ra, main, pieces), _main(rb, main, pieces)
        errs.append(np.abs(a - b).ravel())
        if main == "logits":
            a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            agree += int((a2.argmax(-1) == b2.argmax(-1)).sum())
            n += a2.shape[0]
            lp, lq = _log_softmax(a2), _log_softmax(b2)
            kls.append((np.exp(lp) * (lp - lq)).sum(-1))
    err = np.concatenate(errs)
    figures = {"output": main, "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
               "method": METHOD, "size_bytes": _size(package), "float_size_bytes": _size(float_package)}
    if main == "logits":
        figures["top1_agreement"] = agree / n
        figures["mean_kl"] = float(np.concatenate(kls).mean())
        figures["positions"] = n
    return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in figures.items()}


def _main(result: dict, main: str, pieces: list[str]) -> np.ndarray:
    """The main output as float64; a split head's logits_0 .. logits_k concatenated, as the app does."""
    if main == "logits" and "logits" not in result:
        return np.concatenate([np.asarray(result[n], np.float64) for n in pieces], axis=-1)
    return np.asarray(result[main], np.float64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in sorted(p.rglob("*")) if f.is_file())
