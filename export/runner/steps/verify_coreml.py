"""verify_coreml: a package run in the reference interpreter against its ExportedProgram (a leaf), or each
function of a bundle against its leaf package; the verdict goes to a JSON file beside it."""
from __future__ import annotations

import json
from pathlib import Path

from ... import atomic
from ...errors import ExportError


def run(out: str, **kwargs) -> None:
    try:
        _run(out, **kwargs)
    except ExportError as e:  # a plain ExportError crosses to the planner (which must not import the interpreter)
        raise ExportError(str(e)) from None
    finally:
        _give_back()


def _give_back() -> None:
    """Hand the step's memory back before the worker's next step: the torch program's module graph is freed
    only by the cycle collector, and glibc keeps freed heap pages unless trimmed. Measured at the 0.5B
    shape, an export run in the same worker after a T512 check peaked 3.4 GB above its own need
    (bench/results/scale-qwen2.5-0.5b-20261129-072053.json)."""
    import ctypes
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def _run(out: str, package: str | None = None, exported: str | None = None, contract: str | None = None,
         bundle: str | None = None, leaves: dict | None = None, contracts: dict | None = None,
         weights: str | None = None) -> None:
    from ...coreml.verify import Disagreement, verify, verify_bundle

    if bundle is not None:
        verdicts = verify_bundle(Path(bundle), {fn: Path(p) for fn, p in leaves.items()},
                                 contracts={fn: Path(c) for fn, c in contracts.items()})
        body = {"package": Path(bundle).name, "functions": {fn: v.to_json() for fn, v in verdicts.items()}}
        for fn, v in verdicts.items():
            bad = v.failure()
            if bad:
                raise Disagreement(f"function {fn} does not reproduce its leaf package: {bad}", file=bundle, field="verify")
    else:
        v = verify(Path(package), Path(exported), Path(contract), weights=weights)
        bad = v.failure()
        if bad:
            raise Disagreement(f"function {v.function}: {bad}", file=package, field="verify")
        body = {"package": Path(package).name, **v.to_json()}
        for o in v.outputs:
            print(o.line())
    atomic.write_text(Path(out), json.dumps(body, indent=2, sort_keys=True) + "\n")
