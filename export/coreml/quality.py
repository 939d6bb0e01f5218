"""What a recipe costs in accuracy: a compressed package against its float package.

No Core ML runtime runs on Linux, so both packages' weights are taken back to
dense numpy (``ct.optimize.coreml.decompress_weights``: the constexpr ops of a
look-up table or a quantization become plain constants) and substituted into
the exported PyTorch program of the same (mode, T), which then runs in fp32 on
fixed token sequences. The float package's own (fp16) weights give the
reference, so the figures measure the compression alone:

- ``max_abs_err``, ``mean_abs_err`` of the logits;
- ``top1_agreement``: the share of positions whose arg-max token agrees;
- ``mean_kl``: the mean KL divergence (float || compressed) of the next-token
  distribution, in nats.

Weights are matched by name: coremltools names a parameter's const after the
program's placeholder (``p_model_blocks_0_wq_weight``), with ``_to_fp16`` and
``_palettized`` / ``_quantized`` appended (export/coreml/compress.py).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import contract as contract_mod
from .. import program_weights
from ..errors import ExportError

SEQUENCES = 4  # fixed token sequences per prefill leaf (seeded)
DECODE_TOKENS = 16  # fixed single tokens per decode leaf, each over an empty cache
SUFFIX = re.compile(r"(_to_fp16|_to_fp32|_palettized|_quantized)+$")


def dense_weights(package: Path) -> dict[str, np.ndarray]:
    """Placeholder name -> the package's dense weight (decompressed when it is compressed)."""
    import coremltools as ct
    from coremltools.optimize.coreml import decompress_weights, get_weights_metadata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = decompress_weights(ct.models.MLModel(str(package), skip_model_load=True))
        meta = get_weights_metadata(mlmodel, weight_threshold=0)
    return {SUFFIX.sub("", name): np.asarray(m.val, dtype=np.float32) for name, m in meta.items()
            if name.startswith("p_") and m.val is not None}


def _program_with(ep, weights: dict[str, np.ndarray], package: Path):
    placeholders = ep.graph_signature.inputs_to_parameters  # placeholder -> parameter path
    state = {}
    for ph, path in placeholders.items():
        if ph in weights:
            state[path] = torch.from_numpy(weights[ph])
    if not state:
        raise ExportError("no weight of the package matches a parameter of the exported program", file=package,
                          field="weights")
    module = ep.module()
    module.load_state_dict(state, strict=False, assign=True)  # assign: ep.module() shares its tensors between calls
    return module


def _inputs(c: dict, vocab: int) -> list[tuple]:
    """Fixed inputs from the contract: seeded random tokens; decode: single tokens over an empty cache."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(SEQUENCES if c["mode"] == "prefill" else DECODE_TOKENS):
        args = []
        for t in c["inputs"]:
            shape = tuple(t["shape"])
            if t["name"] == "position_ids":
                args.append(torch.arange(shape[-1], dtype=torch.int32).expand(shape).contiguous())
            elif t["name"] == "input_ids":
                args.append(torch.from_numpy(rng.integers(0, vocab, size=shape, dtype=np.int32)))
            elif t["name"] == "attention_mask":
                args.append(torch.ones(shape, dtype=getattr(torch, t["dtype"])))
            elif t["name"] == "hidden_in":  # a part of a chain (export/parts.py): the part before's hidden states
                args.append(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(getattr(torch, t["dtype"])))
            else:
                args.append(torch.zeros(shape, dtype=getattr(torch, t["dtype"])))
        out.append(tuple(args))
    return out


def measure(float_package: Path, package: Path, exported: Path, contract: Path, weights: Path | None = None) -> dict:
    """Run the exported program with the float package's and the compressed package's weights; compare."""
    c = contract_mod.read(contract)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = program_weights.load(exported, weights)
    float_weights = dense_weights(float_package)
    reference = _program_with(ep, float_weights, float_package)
    candidate = _program_with(ep, dense_weights(package), package)
    out_names = [t["name"] for t in c["outputs"]]
    pieces = [n for n in out_names if n == "logits" or re.fullmatch(r"logits_\d+", n)]  # a split head: its pieces
    main = "logits" if pieces else out_names[0]
    vocab = int(c["part"]["vocab_size"]) if "part" in c else _vocab(float_weights)  # a part may hold no embeddings
    errs, agree, kls, n = [], 0, [], 0
    with torch.no_grad():
        for args in _inputs(c, vocab):
            a = _main(reference(*args), out_names, main, pieces).float()
            b = _main(candidate(*args), out_names, main, pieces).float()
            errs.append((a - b).abs().flatten())
            if main == "logits":
                a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
                agree += int((a2.argmax(-1) == b2.argmax(-1)).sum())
                n += a2.shape[0]
                lp, lq = torch.log_softmax(a2.double(), -1), torch.log_softmax(b2.double(), -1)
                kls.append((lp.exp() * (lp - lq)).sum(-1))
    err = torch.cat(errs)
    figures = {"output": main, "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
               "method": "decompressed weights in the exported PyTorch program (fp32), against the float package's weights",
               "size_bytes": _size(package), "float_size_bytes": _size(float_package)}
    if main == "logits":
        figures["top1_agreement"] = agree / n
        figures["mean_kl"] = float(torch.cat(kls).mean())
        figures["positions"] = n
    return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in figures.items()}


def _vocab(weights: dict[str, np.ndarray]) -> int:
    """The token count: rows of the embedding table (tokens drawn below it are valid for every model)."""
    from .compress import part_of

    rows = [w.shape[0] for name, w in weights.items() if w.ndim == 2 and part_of(name) == "embeddings"]
    if not rows:
        raise ExportError("no embedding table among the package's weights: cannot draw valid tokens",
                          field="weights")
    return int(min(rows))


def _main(result, names: list[str], main: str, pieces: list[str] = ()):
    if isinstance(result, (tuple, list)):
        if main == "logits" and "logits" not in names:  # logits_0 .. logits_k, concatenated as the app does
            return torch.cat([result[names.index(n)] for n in pieces], dim=-1)
        return result[names.index(main)]
    return result


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in sorted(p.rglob("*")) if f.is_file())
