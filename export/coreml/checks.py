"""Checks around a Core ML conversion.

- ``unsupported_ops(program)``: before converting, the ops of a TorchScript
  module or an ExportedProgram that coremltools has no converter for, by name;
  ``unsupported_op_origins`` also says where each comes from (module and
  source line, from the nodes' metadata), and ``check_supported`` refuses the
  program with that list. Our own converters (``coreml_torch_ops``) count.
- ``check_finite(mlmodel)``: after converting, no constant of the program
  holds NaN or Inf (``-inf`` masks turn into NaN in the converted program).
- ``check_on_device(...)``: on macOS, the package compiles and its predictions
  match the exported program; elsewhere it is skipped with a one-line notice.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError

# TorchScript plumbing the converter handles itself rather than through its op registry
_TS_PLUMBING = {"prim::Constant", "prim::ListConstruct", "prim::ListUnpack", "prim::TupleConstruct",
                "prim::TupleUnpack", "prim::GetAttr", "prim::NumToTensor", "prim::device", "prim::dtype"}


MAX_ORIGINS = 3  # origins listed per op


def _registry():
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY
    import coremltools.converters.mil.frontend.torch.ops  # noqa: F401  (fills the registry)

    from . import torch_ops as coreml_torch_ops  # noqa: F401  (adds ours)

    return _TORCH_OPS_REGISTRY


def _nodes(program) -> list[tuple[str, object]]:
    """(op name, node) of every op the converter looks up."""
    if isinstance(program, torch.export.ExportedProgram):
        out = []
        for node in program.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            try:
                out.append((target.name(), node))
            except AttributeError:
                out.append((getattr(target, "__name__", str(target)), node))
        return out
    return [(n.kind(), n) for n in program.inlined_graph.nodes() if n.kind() not in _TS_PLUMBING]


def unsupported_op_origins(program) -> dict[str, list[str]]:
    """Op name -> where its nodes come from (``module.path (Class), file:line in function: code``),
    for every op of ``program`` that coremltools cannot convert; sorted by name."""
    from ..provenance import node_origin

    registry = _registry()
    out: dict[str, list[str]] = {}
    for kind, node in _nodes(program):
        if registry.get_func(kind) is None:
            origins = out.setdefault(kind, [])
            origin = node_origin(node)
            if origin not in origins:
                origins.append(origin)
    return dict(sorted(out.items()))


def unsupported_ops(program) -> list[str]:
    """Sorted op names of ``program`` that coremltools 9.0 cannot convert."""
    return list(unsupported_op_origins(program))


def check_supported(program, *, file: object) -> None:
    """Refuse, before a long conversion, a program with ops coremltools cannot convert: each op by
    name with where it comes from."""
    missing = unsupported_op_origins(program)
    if missing:
        lines = []
        for kind, origins in missing.items():
            more = f" (and {len(origins) - MAX_ORIGINS} more places)" if len(origins) > MAX_ORIGINS else ""
            lines.append(f"  {kind}{more}:" + "".join(f"\n    from {o}" for o in origins[:MAX_ORIGINS]))
        raise ExportError(f"coremltools cannot convert {len(missing)} op(s): {', '.join(missing)}\n" + "\n".join(lines),
                          file=file, field="ops")


def _walk(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _walk(inner)


def check_finite(mlmodel, *, file: object) -> None:
    """Raise if any constant of the converted program holds NaN or Inf."""
    prog = mlmodel._mil_program
    if prog is None:
        return
    for fname, func in prog.functions.items():
        for op in _walk(func):
            for var in op.outputs:
                val = var.val
                if val is None or not isinstance(val, np.ndarray) and not np.isscalar(val):
                    continue
                arr = np.asarray(val)
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    bad = int((~np.isfinite(arr)).sum())
                    raise ExportError(f"constant {var.name!r} (op {op.op_type}) holds {bad} NaN/Inf value(s)",
                                      file=file, field=f"program.{fname}")


def check_on_device(package, program, example: tuple, contract: dict, *, file: object, rtol=5e-2, atol=5e-2) -> str:
    """On macOS: load (compiles) the package and compare its predictions with ``program``'s outputs."""
    if sys.platform != "darwin":
        return "skipped prediction and compile checks: they need macOS"
    import coremltools as ct

    model = ct.models.MLModel(str(package))  # loading compiles the package
    feeds = {t["name"]: x.numpy() for t, x in zip(contract["inputs"], example)}
    state = model.make_state() if contract.get("states") else None
    got = model.predict(feeds, state=state) if state is not None else model.predict(feeds)
    module = program.module() if isinstance(program, torch.export.ExportedProgram) else program
    with torch.no_grad():
        want = module(*example)
    want = want if isinstance(want, tuple) else (want,)
    for spec, w in zip(contract["outputs"], want):
        g = got[spec["name"]]
        if not np.allclose(g, w.float().numpy(), rtol=rtol, atol=atol):
            diff = float(np.abs(g - w.float().numpy()).max())
            raise ExportError(f"Core ML prediction differs from the exported program (max abs diff {diff:.3g})",
                              file=file, field=f"outputs.{spec['name']}")
    return "predictions match the exported program"


# --------------------------------------------------------------------------- device limits (issue 21, item 4)

# What a device loads, per the deployment target's platform: about 1 GB per weight file on iOS, about 2 GB on
# macOS (the figures Anemll works to); the Neural Engine takes no tensor dimension above 16384 (a 150k-entry
# vocabulary head exceeds it). Op counts are reported, with no limit.
WEIGHT_FILE_LIMITS = {"iOS": 1 << 30, "macOS": 2 << 30}
ANE_MAX_DIM = 16384
WEIGHTS_DIR = "Data/com.apple.CoreML/weights"


def _platform(target: str) -> str:
    return "macOS" if target.startswith("macOS") else "iOS"


def _dims(value_type) -> list[int]:
    kind = value_type.WhichOneof("type")
    if kind == "tensorType":
        return [d.constant.size for d in value_type.tensorType.dimensions if d.WhichOneof("dimension") == "constant"]
    if kind == "stateType":
        return _dims(value_type.stateType.wrappedType)
    return []


def _spec_ops(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _spec_ops(inner)


def device_figures(package: Path | str) -> dict:
    """The figures a device cares about, from the package's spec and the sizes of its weight files (the
    model is not loaded): ``{"weight_files": {name: bytes}, "functions": {name: {"ops", "max_dim",
    "max_dim_tensor", "weight_file_bytes"}}}``."""
    from .mlpackage import read_spec

    package = Path(package)
    spec = read_spec(package)
    weights = package / WEIGHTS_DIR
    files = {p.name: p.stat().st_size for p in sorted(weights.iterdir()) if p.is_file()} if weights.is_dir() else {}
    functions = {}
    if spec.WhichOneof("Type") == "mlProgram":
        for name, fn in sorted(spec.mlProgram.functions.items()):
            best, where, ops = 0, None, 0
            for v in fn.inputs:
                d = max(_dims(v.type), default=0)
                if d > best:
                    best, where = d, v.name
            for op in _spec_ops(fn.block_specializations[fn.opset]):
                ops += 1
                for v in op.outputs:
                    d = max(_dims(v.type), default=0)
                    if d > best:
                        best, where = d, v.name
            functions[name] = {"ops": ops, "max_dim": best, "max_dim_tensor": where,
                               "weight_file_bytes": sum(files.values())}
    return {"weight_files": files, "functions": functions}


def device_problems(figures: dict, target: str) -> list[dict]:
    """Each limit of ``target``'s devices that the package's figures exceed: ``{function, what, limit, value,
    line}`` (``line``: the problem in one line, what the planner prints)."""
    platform = _platform(target)
    limit = WEIGHT_FILE_LIMITS[platform]
    out = []
    functions = sorted(figures["functions"]) or ["(all)"]
    for fname, size in sorted(figures["weight_files"].items()):
        if size > limit:
            out.append({"function": ", ".join(functions), "what": f"weight file {fname} on {platform}",
                        "limit": limit, "value": size})
    for fn, f in sorted(figures["functions"].items()):
        if f["max_dim"] > ANE_MAX_DIM:
            out.append({"function": fn, "what": f"tensor dimension on the Neural Engine ({f['max_dim_tensor']})",
                        "limit": ANE_MAX_DIM, "value": f["max_dim"]})
    for p in out:
        p["line"] = problem_line(p)
    return out


def problem_line(p: dict) -> str:
    """One problem, said in one line: the function, the limit and the value."""
    unit = lambda n: f"{n} bytes ({n / 2**30:.2f} GiB)" if "weight file" in p["what"] else str(n)  # noqa: E731
    return f"function {p['function']}: {p['what']}: {unit(p['value'])} is over the limit of {unit(p['limit'])}"


def check_device_limits(package: Path | str, target: str, policy: str | None, *, file: object) -> dict:
    """``device_figures`` of ``package`` with its ``problems`` against ``target``'s limits; with ``policy``
    "fail", the first problem is an error naming the package (``file``), the function, the limit and the value."""
    figures = device_figures(package)
    figures["target"] = target
    figures["problems"] = device_problems(figures, target)
    if policy == "fail" and figures["problems"]:
        raise ExportError(f"over a device limit of {target} (device_limits = \"fail\"): "
                          f"{problem_line(figures['problems'][0])}", file=file, field="device_limits")
    return figures
