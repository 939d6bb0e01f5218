"""Benchmark: three compression recipes on the ~50M reference student, through the real doit.

A temporary project (this checkout's dodo.py and export/, the reference student of bench/bench_build.py:
d 512, 6 layers, 32k vocab, ~50M parameters, seeded random weights) builds prefill at T=512 for minimumDeploymentTarget iOS18 with three recipes side by
side (the recipes of README "Deployment recipes", tests/scenario.py RECIPES_TOML, which tests/test_recipes.py
builds too); each recipe's package size and its measured quality against the float package
(export/coreml/quality.py: both packages run in the numpy Core ML interpreter on the same fixed tokens) are read from artifacts/student/coreml/prefill_T512.<recipe>.quality.json.
Results go to bench/results/recipes-<timestamp>.json with machine and versions; a table sorted by size is
printed.

    PYTHONPATH=. python bench/bench_recipes.py [--T 512]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from scenario import RECIPES_TOML, export_head, model_toml, project_toml  # noqa: E402
from bench_build import REFERENCE, make_checkpoint  # noqa: E402

from export.toolchain import versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp:
        root = Path(tmp) / "p"
        root.mkdir()
        shutil.copy(REPO / "dodo.py", root / "dodo.py")
        shutil.copytree(REPO / "export", root / "export", ignore=shutil.ignore_patterns("__pycache__"))
        (root / "checkpoints").mkdir()
        params = make_checkpoint(root / "checkpoints" / "student.pt", REFERENCE)
        (root / "shape_sets.json").write_text(json.dumps({"bench": {"prefill": [args.T]}}))
        (root / "pyproject.toml").write_text(project_toml(export_head() + RECIPES_TOML + model_toml(
            "student", "student", "checkpoints/student.pt", "bench", modes='["prefill"]',
            coreml='{ minimum_deployment_target = "iOS18" }', recipes='["lut4", "int4", "int8"]'), name="bench-recipes"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_EXPORT_")}
        env["MODEL_EXPORT_CACHE"] = str(Path(tmp) / "cache")
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "doit"], cwd=root, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if r.returncode != 0:
            sys.exit(f"build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        tasks = json.loads((root / "artifacts" / "last_build.json").read_text())["tasks"]
        rows = []
        for name in ("lut4", "int4", "int8"):
            q = json.loads((root / "artifacts" / "student" / "coreml" / f"prefill_T{args.T}.{name}.quality.json").read_text())
            rows.append({"recipe": name, **q, "compress_seconds": tasks[f"compress_coreml:student.prefill.T{args.T}.{name}"]["seconds"]})
        rows.sort(key=lambda row: row["size_bytes"])
    result = {"benchmark": "recipes", "T": args.T, "parameters": params, "config": REFERENCE, "build_seconds": round(seconds, 1), "rows": rows,
              "machine": machine(), "versions": versions(("torch", "coremltools", "numpy"))}
    out = REPO / "bench" / "results" / f"recipes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| recipe | size MB | x float | max abs err | mean abs err | top-1 agreement | mean KL |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['recipe']} | {row['size_bytes'] / 1e6:.1f} | {row['size_bytes'] / row['float_size_bytes']:.3f} | "
              f"{row['max_abs_err']:.4f} | {row['mean_abs_err']:.5f} | {row['top1_agreement']:.4f} | {row['mean_kl']:.6f} |")
    print(f"quality: {rows[0]['method']}")
    print(f"{params} parameters; float package: {rows[0]['float_size_bytes'] / 1e6:.1f} MB; build {seconds:.0f} s; {out}")


if __name__ == "__main__":
    main()
