"""The reference interpreter against the ExportedProgram: a T=512 prefill of the ~50M student.

    PYTHONPATH=. python bench/bench_verify.py            # ~50M student (bench_build.REFERENCE), T=512
    PYTHONPATH=. python bench/bench_verify.py --quick    # the small config, T=64

Exports the prefill, converts it to Core ML in fp32 and in fp16, then times, in
the same run and on the same inputs, the ExportedProgram (torch, no_grad) and
the interpreter running each package (median of --repeat runs after one warm-up;
package loading, which materializes the weights once, is timed apart). Also
records the verification's errors (max abs and relative to scale, per output):
the fp16 figures are the measurement behind FP16_RTOL (README "Numerical
verification"). Writes bench/results/verify-<time>.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from bench_build import QUICK, REFERENCE  # noqa: E402


def median_time(fn, repeat: int) -> dict:
    fn()  # warm-up
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return {"median_s": round(statistics.median(runs), 4), "runs_s": [round(r, 4) for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    import numpy as np
    import torch

    from export import checkpoint, export_pytorch
    from export.coreml.convert import convert, quiet_coremltools
    from export.coreml.interpreter import Package
    from export import contract as contract_mod
    from export.coreml.verify import Program, seeded_inputs, verify

    quiet_coremltools()
    torch.set_num_threads(torch.get_num_threads())
    cfg = QUICK if args.quick else REFERENCE
    T = 64 if args.quick else 512
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config, model = checkpoint.demo_model("student", cfg)
        params = sum(p.numel() for p in model.parameters())
        ck = tmp / "student.pt"
        checkpoint.save(ck, "student", config, model.state_dict())
        del model
        out = tmp / "exported"
        export_pytorch.export_model(ck, out, modes=["prefill"], enumerated_T=[T], formats=["exported_program"])
        ep_path, c_path = out / f"prefill_T{T}.pt2", out / f"prefill_T{T}.contract.json"
        c = contract_mod.read(c_path)
        program = Program(ep_path, c)
        inputs = seeded_inputs(c)
        ep_time = median_time(lambda: program(inputs), args.repeat)
        results = {}
        for precision in ("fp32", "fp16"):
            pkg_path = convert(ep_path, tmp / f"{precision}.mlpackage", c_path, {"compute_precision": precision},
                               log=lambda *_: None)
            t = time.perf_counter()
            pkg = Package(pkg_path)
            load_s = time.perf_counter() - t
            run = median_time(lambda: pkg.run(None, inputs), args.repeat)
            v = verify(pkg, ep_path, c_path, program=program)
            results[precision] = {
                "load_s": round(load_s, 3), "interpreter": run,
                "ratio_to_exported_program": round(run["median_s"] / ep_time["median_s"], 3),
                "verdict": v.to_json(),
            }
            print(f"{precision}: interpreter {run['median_s']:.3f}s, ExportedProgram {ep_time['median_s']:.3f}s, "
                  f"ratio {results[precision]['ratio_to_exported_program']:.2f}x (load {load_s:.2f}s); "
                  + ", ".join(f"{o.name} rel {o.rel:.2e}" for o in v.outputs))
            del pkg
    path = write_result("verify-quick" if args.quick else "verify", {
        "model": {"parameters": params, "config": cfg, "T": T, "mode": "prefill", "export_dtype": "fp32"},
        "exported_program": ep_time, "packages": results, "repeat": args.repeat,
        "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
    })
    print(path)


if __name__ == "__main__":
    main()
