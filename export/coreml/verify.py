"""Numerical verification of a Core ML package against its ExportedProgram, on Linux (CLI: export/verify_coreml.py).

    python -m export.verify_coreml --package P.mlpackage --exported E.pt2 --contract C.contract.json [--function NAME]

The package runs in the reference interpreter (``export/coreml/interpreter.py``),
the bytes as shipped; the ExportedProgram runs in torch; both get the same
seeded inputs (real token ids, positions, and for decode a KV cache filled by
real decode steps of the program, its unused slots holding noise that the mask
must hide). Every output is compared: the error is ``max |package - program|``,
relative to the output's scale ``max |program|``.

Tolerance (README "Numerical verification"): fp32 programs within 1e-4 of the
scale, fp16 programs within ``FP16_RTOL``. A compressed package (palettize,
linear_int8) is checked in two parts: each decompressed weight must be within
its compression's error of the checkpoint's weight (``WEIGHT_RTOL``), and the
outputs must match the program run with those decompressed weights at the
precision's tolerance.

Exit codes: 0 every output agrees (one line per output); 1 one line naming the
first output that disagrees and its error; 2 the package cannot be run.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import contract as contract_mod
from ..errors import ExportError, cli_errors

FP32_RTOL = 1e-4
FP16_RTOL = 1e-2        # measured: <= 2.4e-3 on the test families, see README "Numerical verification"
FP16_FLOOR = 32         # fp16: an error up to 32x what rounding only the weights to fp16 does is accepted too
                        # (every activation is rounded too, at every op: measured up to ~10x on the judge)
WEIGHT_RTOL = {"linear_int8": 0.02, "palettize": {1: 1.0, 2: 0.8, 3: 0.45, 4: 0.25, 6: 0.07, 8: 0.02}}
DECODE_FILL = 16        # real decode steps that fill the cache before the verified step
SEED = 0
_COMPRESSED = re.compile(r"(_to_fp16|_to_fp32)?(_palettized|_quantized)$")


class Disagreement(ExportError):
    """The package runs but computes something else than the program."""


@dataclass
class OutputError:
    name: str
    max_abs: float
    rel: float
    tol: float
    floor: float = 0.0      # an absolute error always accepted (fp16: FP16_FLOOR x the fp16 weights' own effect)

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and (self.rel <= self.tol or self.max_abs <= self.floor)

    def line(self) -> str:
        floor = f", or abs {self.floor:.2g}" if self.floor else ""
        return f"{self.name}: max abs error {self.max_abs:.3g}, relative {self.rel:.3g} (tolerance {self.tol:g}{floor})"

    def to_json(self) -> dict:
        """Errors to 2 significant digits: a verdict file stays byte-stable under fp summation-order noise."""
        d = {"max_abs": _sig(self.max_abs), "rel": _sig(self.rel), "tolerance": self.tol, "ok": self.ok}
        if self.floor:
            d["abs_floor"] = _sig(self.floor)
        return d


def _sig(x: float, digits: int = 2):
    return float(f"{x:.{digits - 1}e}") if np.isfinite(x) else str(x)


COMPARE_CHUNK = 1 << 22  # values compared at a time (in float64): a T x vocabulary output is never copied whole


def _max_abs(a, b=None) -> float:
    """``max |a - b|`` (``max |a|`` without ``b``) in float64, COMPARE_CHUNK values at a time; nan if any is nan."""
    a = np.asarray(a).reshape(-1)
    b = None if b is None else np.asarray(b).reshape(-1)
    out = np.float64(0.0)
    for i in range(0, a.size, COMPARE_CHUNK):
        d = a[i:i + COMPARE_CHUNK].astype(np.float64)
        if b is not None:
            d -= b[i:i + COMPARE_CHUNK]
        out = np.maximum(out, np.max(np.abs(d, out=d)))  # np.maximum keeps a nan
    return float(out)


def compare(name: str, got, want, tol: float, floor: float = 0.0) -> OutputError:
    g, w = np.asarray(got), np.asarray(want)
    if g.shape != w.shape:
        return OutputError(name, float("inf"), float("inf"), tol, floor)
    max_abs = _max_abs(g, w)
    if not all(np.all(np.isfinite(g.reshape(-1)[i:i + COMPARE_CHUNK])) for i in range(0, g.size, COMPARE_CHUNK)):
        max_abs = float("inf")
    scale = _max_abs(w)
    rel = max_abs / scale if scale > 0 else max_abs
    return OutputError(name, max_abs, rel, tol, floor)


def package_options(pkg) -> dict:
    """The Core ML options the package was converted with (its model_export.options metadata)."""
    from .mlpackage import METADATA_PREFIX

    raw = pkg.spec.description.metadata.userDefined.get(METADATA_PREFIX + "options")
    return json.loads(raw) if raw else {}


def precision_of(pkg, function: str) -> str:
    """fp16 when the function computes in fp16 (any fp16-typed op output), else fp32."""
    f = pkg.function(function)
    return "fp16" if any(o[1] == np.float16 for s in f.steps for o in s.outputs) else "fp32"


# --------------------------------------------------------------------------- inputs

def seeded_inputs(c: dict, seed: int = SEED) -> dict[str, np.ndarray]:
    """Real inputs for one (mode, T) contract: token ids, positions (and an attention mask)."""
    rng = np.random.default_rng(seed)
    vocab = _vocab(c)
    out = {}
    for t in c["inputs"]:
        shape = tuple(t["shape"])
        if t["name"] == "input_ids":
            out["input_ids"] = rng.integers(3, vocab, size=shape).astype(np.int32)
        elif t["name"] == "position_ids":
            out["position_ids"] = np.arange(shape[-1], dtype=np.int32).reshape(shape) if c["mode"] == "prefill" \
                else np.full(shape, 0, np.int32)
        elif t["name"] == "hidden_in":  # a part of a chain: hidden states from the part before
            out["hidden_in"] = rng.standard_normal(shape).astype(np.dtype(t["dtype"]))
        elif t["name"] == "attention_mask":
            m = np.ones(shape, np.int32)
            m[..., shape[-1] - shape[-1] // 4:] = 0  # a padded tail
            out["attention_mask"] = m
        elif t["dtype"] == "int32":
            out[t["name"]] = np.zeros(shape, np.int32)
        else:
            out[t["name"]] = np.zeros(shape, np.dtype(t["dtype"]))
    return out


def _vocab(c: dict) -> int:
    if "part" in c:  # a part of a chain: the whole vocabulary, whichever piece of the logits it gives
        return int(c["part"]["vocab_size"])
    for t in c["outputs"]:
        if t["name"] == "logits":
            return int(t["shape"][-1])
    return 64


# --------------------------------------------------------------------------- the program side

class Program:
    """An ExportedProgram, runnable on numpy inputs, with its parameters replaceable (compressed packages)."""

    def __init__(self, exported: Path, c: dict, weights: Path | str | None = None):
        import torch

        from .convert import load_program

        self.torch = torch
        fmt, ep = load_program(exported, weights)
        if fmt != "exported_program":
            raise ExportError("verification needs the ExportedProgram (.pt2)", file=exported, field="--exported")
        self.ep = ep
        self.c = c
        self.placeholders = dict(ep.graph_signature.inputs_to_parameters)  # placeholder name -> fqn
        self._module = None

    def replace(self, weights: dict[str, np.ndarray]) -> list[str]:
        """Set the parameters named by their placeholder (``p_model_blocks_0_wq_weight``); returns the fqns."""
        done = []
        for name, value in weights.items():
            fqn = self.placeholders.get(name)
            if fqn is None:
                continue
            old = self.ep.state_dict[fqn]
            self.ep.state_dict[fqn] = self.torch.nn.Parameter(self.torch.from_numpy(
                np.asarray(value, np.float32)).to(old.dtype).reshape(old.shape), requires_grad=False)
            done.append(fqn)
        self._module = None
        return done

    @property
    def module(self):
        if self._module is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._module = self.ep.module()
        return self._module

    def __call__(self, inputs: dict, state: dict | None = None) -> dict[str, np.ndarray]:
        torch = self.torch
        m = self.module
        if state:
            for name, value in state.items():
                getattr(m, name).copy_(torch.from_numpy(np.asarray(value)))
        args = [torch.from_numpy(np.ascontiguousarray(inputs[t["name"]])) for t in self.c["inputs"]]
        with torch.no_grad():
            out = m(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        res = {t["name"]: o.float().numpy() for t, o in zip(self.c["outputs"], out)}
        if state:
            for name in state:
                state[name][...] = getattr(m, name).float().numpy().astype(state[name].dtype)
        return res


def decode_case(program: Program, c: dict, seed: int = SEED, fill: int = DECODE_FILL):
    """(inputs, cache) of a decode step at position ``n``: slots 0..n-1 hold the K/V of ``n`` real decode steps of
    the program, slots from n on hold noise the mask must hide. ``cache``: name -> array (inputs or states)."""
    T = int(c["T"])
    n = max(1, min(fill, T // 2))  # slots n+1.. hold noise the mask must hide
    rng = np.random.default_rng(seed + 1)
    vocab = _vocab(c)
    ids = rng.integers(3, vocab, size=n + 1).astype(np.int32)
    kv = [t for t in (c["states"] or [t for t in c["inputs"] if t["name"] in ("k_cache", "v_cache")])]
    cache = {t["name"]: (rng.standard_normal(t["shape"]) * 2).astype(np.dtype(t["dtype"])) for t in kv}
    stateful = bool(c["states"])
    hidden = {t["name"]: [rng.standard_normal(t["shape"]).astype(np.dtype(t["dtype"])) for _ in range(n + 1)]
              for t in c["inputs"] if t["name"] == "hidden_in"}  # a part of a chain: the part before's output

    def at(p: int) -> dict:
        step = {"input_ids": ids[p].reshape(1, 1), "position_ids": np.array([[p]], np.int32),
                **{name: h[p] for name, h in hidden.items()}}
        return {t["name"]: step[t["name"]] for t in c["inputs"] if t["name"] in step}

    for p in range(n if kv else 0):
        step = at(p)
        if stateful:
            program(step, state=cache)
        else:
            out = program({**step, **cache})
            for name, new in (("k_cache", "k_new"), ("v_cache", "v_new")):
                cache[name][:, :, :, p:p + 1, :] = out[new].astype(cache[name].dtype)
    inputs = at(n)
    if not stateful:
        inputs.update(cache)
    return inputs, (cache if stateful else {})


# --------------------------------------------------------------------------- verification

@dataclass
class Verdict:
    package: str
    function: str
    precision: str
    outputs: list           # [OutputError]
    weights: dict           # compressed weight name -> relative error (compressed packages)
    weight_tol: float | None = None

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs) and all(
            e <= self.weight_tol for e in self.weights.values()) if self.weight_tol is not None else all(o.ok for o in self.outputs)

    def failure(self) -> str | None:
        if self.weight_tol is not None:
            for name, e in self.weights.items():
                if not e <= self.weight_tol:
                    return f"weight {name}: relative error {e:.3g} against the checkpoint (tolerance {self.weight_tol:g})"
        for o in self.outputs:
            if not o.ok:
                return o.line()
        return None

    def to_json(self) -> dict:
        d = {"function": self.function, "precision": self.precision, "ok": self.ok,
             "outputs": {o.name: o.to_json() for o in self.outputs}}
        if self.weights:
            d["weights"] = {"max_rel": _sig(max(self.weights.values())), "tolerance": self.weight_tol,
                            "count": len(self.weights)}
        return d


def _weight_tol(options: dict) -> float | None:
    comp = options.get("compression", "none")
    if comp == "linear_int8":
        return WEIGHT_RTOL["linear_int8"]
    if comp == "palettize":
        return WEIGHT_RTOL["palettize"][int(options.get("palettize_bits", 4))]
    return None


def verify(package, exported: Path | str, contract_path: Path | str, function: str | None = None,
           *, program: Program | None = None, seed: int = SEED, weights: Path | str | None = None) -> Verdict:
    """Run ``package`` (a path or an interpreter ``Package``) and the program on the same seeded inputs.

    Memory: at most one side's model is loaded at a time where the order allows it. A prefill check of an
    uncompressed package runs the package first and lets it go (its weights are a memory map of the file)
    before the program is loaded; the program's weights are rounded to fp16 in place (when it is this
    call's own program) rather than beside a copy; outputs are compared a chunk at a time."""
    from .interpreter import Package

    contract_path = Path(contract_path)
    c = contract_mod.read(contract_path)
    pkg = package if isinstance(package, Package) else Package(package)
    fn = pkg.function(function).name
    pkg_path = str(pkg.path)
    own_program = program is None
    checkpoint = weights
    precision = precision_of(pkg, fn)
    tol = FP16_RTOL if precision == "fp16" else FP32_RTOL

    weights: dict[str, float] = {}
    wtol = _weight_tol(package_options(pkg))
    compressed = {_COMPRESSED.sub("", n): v for n, v in pkg.function(fn).consts.items() if _COMPRESSED.search(n)}
    if compressed or c["mode"] == "decode":  # the program first: its weights replaced, or the cache it fills
        program = program or Program(Path(exported), c, checkpoint)
    if compressed:
        sd = program.ep.state_dict
        for name, value in compressed.items():
            fqn = program.placeholders.get(name)
            if fqn is None:
                continue
            w = sd[fqn].detach().float().numpy()
            weights[name] = float(np.linalg.norm(value.astype(np.float64).ravel() - w.ravel()) / max(np.linalg.norm(w), 1e-30))
        if wtol is None:
            wtol = max(WEIGHT_RTOL["palettize"].values())
        program.replace(compressed)
    compressed = None

    if c["mode"] == "decode":
        inputs, cache = decode_case(program, c, seed)
    else:
        inputs, cache = seeded_inputs(c, seed), {}
    state = None
    if c["states"]:
        state = pkg.make_state(fn)
        for name in state:
            state[name][...] = cache[name]
    got = pkg.run(fn, inputs, state=state)
    on_device = sys.platform == "darwin"  # the device's own runtime too (not run in CI, which is Linux)
    if not on_device and not isinstance(package, Package):
        pkg = None  # this call's own package: its weights are not needed any more
    program = program or Program(Path(exported), c, checkpoint)
    want_state = {k: v.copy() for k, v in cache.items()} if c["states"] else None
    want = program(inputs, state=want_state)
    floors = {}
    if precision == "fp16":
        effect = _fp16_weight_effect(program, inputs, cache, want, want_state, restore=not own_program)
        floors = {n: FP16_FLOOR * e for n, e in effect.items()}
    outputs = [compare(t["name"], got[t["name"]], want[t["name"]], tol, floors.get(t["name"], 0.0)) for t in c["outputs"]]
    if state is not None:  # the states after the step are outputs too
        outputs += [compare(f"state {n}", state[n], want_state[n], tol, floors.get(f"state {n}", 0.0)) for n in state]
    if on_device:
        outputs += _predict_on_device(pkg, fn, inputs, cache if c["states"] else None, want, c, tol)
    return Verdict(pkg_path, fn, precision, outputs, weights, wtol if weights else None)


def _predict_on_device(pkg, fn: str, inputs: dict, cache: dict | None, want: dict, c: dict, tol: float) -> list:
    """macOS: ``MLModel.predict`` of the same function on the same inputs (and state), against the program."""
    import coremltools as ct

    model = ct.models.MLModel(str(pkg.path), function_name=None if fn == "main" else fn)
    state = None
    if cache:
        state = model.make_state()
        for name, value in cache.items():
            state.write_state(name, value)
    got = model.predict(inputs, state=state) if state is not None else model.predict(inputs)
    return [compare(f"MLModel {t['name']}", got[t["name"]], want[t["name"]], tol) for t in c["outputs"]]


def _fp16_weight_effect(program: Program, inputs: dict, cache: dict, want: dict, want_state: dict | None,
                        restore: bool = True) -> dict:
    """Per output, the max abs change of the program's output when only its weights are rounded to fp16.

    An output that is a small difference of large terms (the judge's score: a dot product that nearly cancels)
    has fp16 noise far above fp16's unit roundoff of its own scale; this measures that noise for the very
    inputs and output, and the package's fp16 error may be up to FP16_FLOOR times it.

    ``restore=False`` (the caller's program is not used afterwards): each weight is replaced by its rounded
    copy one at a time and the original let go, so the program's weights are held once, not twice."""
    sd = program.ep.state_dict
    program._module = None  # the module holds the weights too
    names = [name for name, fqn in program.placeholders.items() if sd[fqn].is_floating_point()]
    originals = {name: sd[program.placeholders[name]] for name in names} if restore else {}
    for name in names:
        t = sd[program.placeholders[name]]
        program.replace({name: t.detach().to(program.torch.float16).float().numpy()})
        del t
    try:
        state = {k: v.copy() for k, v in cache.items()} if want_state is not None else None
        rounded = program(inputs, state=state)
    finally:
        for name, t in originals.items():
            sd[program.placeholders[name]] = t
        program._module = None
    out = {}
    for n in list(rounded):
        out[n] = _max_abs(rounded.pop(n), want[n])
    if want_state is not None:
        out.update({f"state {n}": _max_abs(state[n], want_state[n]) for n in state})
    return out


def verify_bundle(bundle, leaves: dict, *, seed: int = SEED, contracts: dict | None = None) -> dict[str, Verdict]:
    """Each function of ``bundle`` gives its leaf package's outputs (``leaves``: function -> package path) on the same
    seeded inputs (``contracts``: function -> contract path; the leaf's own inputs are used). Exact up to fp
    rounding: the same ops on the same weights."""
    from .interpreter import Package

    b = bundle if isinstance(bundle, Package) else Package(bundle)
    out = {}
    for fn, leaf in sorted(leaves.items()):
        lp = leaf if isinstance(leaf, Package) else Package(leaf)
        lf = lp.function(None)
        c = contract_mod.read(contracts[fn]) if contracts else None
        rng = np.random.default_rng(seed)
        inputs = seeded_inputs(c, seed) if c else {}
        for name, (dtype, shape) in lf.inputs.items():
            if name not in inputs:
                inputs[name] = (rng.standard_normal(shape) if np.dtype(dtype).kind == "f" else np.zeros(shape)).astype(dtype)
        s1, s2 = (lp.make_state(None), b.make_state(fn)) if lf.states else (None, None)
        if s1:
            for n in s1:
                s1[n][...] = s2[n][...] = rng.standard_normal(s1[n].shape).astype(s1[n].dtype)
        want = lp.run(None, inputs, state=s1)
        got = b.run(fn, inputs, state=s2)
        outputs = [compare(n, got[n], want[n], 0.0) for n in want]
        out[fn] = Verdict(str(b.path), fn, precision_of(b, fn), outputs, {})
    return out


# --------------------------------------------------------------------------- CLI

class _Args(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def main(argv=None) -> None:
    p = _Args(prog="python -m export.verify_coreml", description=__doc__.split("\n\n")[0])
    p.add_argument("--package", required=True, type=Path, help="the .mlpackage to run")
    p.add_argument("--exported", required=True, type=Path, help="the ExportedProgram (.pt2) it was converted from")
    p.add_argument("--contract", required=True, type=Path, help="the per-(mode, T) contract")
    p.add_argument("--function", default=None, help="the package's function (default: its default function)")
    p.add_argument("--weights", type=Path, default=None,
                   help="the checkpoint a .pt2 written by the build keeps its weights in")
    args = p.parse_args(argv)
    from .convert import quiet_coremltools

    quiet_coremltools()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's pytree deprecations
    with cli_errors():
        v = verify(args.package, args.exported, args.contract, args.function, weights=args.weights)
        bad = v.failure()
        if bad:
            print(f"error: {args.package}: function {v.function}: {bad}", file=sys.stderr)
            sys.exit(1)
        for o in v.outputs:
            print(o.line())
        if v.weights:
            print(f"weights: {len(v.weights)} decompressed, max relative error {max(v.weights.values()):.3g} "
                  f"(tolerance {v.weight_tol:g})")


if __name__ == "__main__":
    main()
