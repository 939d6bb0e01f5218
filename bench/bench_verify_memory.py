"""verify_coreml's peak memory and seconds on one leaf, this checkout against a reference, in one run.

    python bench/bench_verify_memory.py ARTIFACTS/model --leaf prefill:4096 [--reference main] [--reference-first]

Each side runs ``export.coreml.verify.verify`` on the same package, ExportedProgram and contract (under
``ARTIFACTS/model/{coreml,exported}``) in a fresh process whose ``export`` package is imported from the
side's checkout (``--reference``: a folder, or a git ref of this repo checked out in a temporary worktree).
Recorded per side: seconds, the process's peak resident memory (VmHWM) over the whole verification and
per phase (the package loaded, run; the program loaded, run; the fp16-rounded program run; each VmHWM
reset at the phase's start), and the verdict. Heavy at 0.5B: run it under ``flock /work/heavy.lock``.
Results: bench/results/verify-memory-*.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_result  # noqa: E402

CHILD = r'''
import json, sys, time, warnings
sys.path.insert(0, sys.argv[1])
warnings.filterwarnings("ignore")
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
from export.coreml import verify as V, interpreter as I
phases = []
def wrap(owner, attr, label):
    fn = getattr(owner, attr)
    def w(*a, **k):
        reset(); t = time.monotonic()
        try:
            return fn(*a, **k)
        finally:
            phases.append([label, round(hwm(), 1), round(time.monotonic() - t, 2)])
    setattr(owner, attr, w)
wrap(I.Package, "__init__", "package load"); wrap(I.Package, "run", "package run")
wrap(V.Program, "__init__", "program load"); wrap(V.Program, "__call__", "program run")
pkg, ep, c = sys.argv[2:5]
base = hwm(); t = time.monotonic()
reset()
v = V.verify(pkg, ep, c)
print(json.dumps({"seconds": round(time.monotonic() - t, 2), "phases": phases,
                  "peak_mb": round(max([hwm()] + [p[1] for p in phases]), 1), "import_mb": round(base, 1),
                  "verdict": v.to_json()}))
'''


def run_side(checkout: Path, pkg: Path, ep: Path, contract: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(checkout), str(pkg), str(ep), str(contract)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}",
                "returncode": out.returncode}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path, help="ARTIFACTS/<model> of a build")
    ap.add_argument("--leaf", required=True, help="MODE:T, e.g. prefill:4096")
    ap.add_argument("--reference", help="a folder or a git ref to measure too (before)")
    ap.add_argument("--reference-first", action="store_true")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    mode, T = args.leaf.split(":")
    pkg = args.model_dir / "coreml" / f"{mode}_T{T}.mlpackage"
    ep = args.model_dir / "exported" / f"{mode}_T{T}.pt2"
    contract = args.model_dir / "exported" / f"{mode}_T{T}.contract.json"
    sides = [("checkout", REPO)]
    tmp = None
    if args.reference:
        ref = Path(args.reference)
        if not ref.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix="verify-mem-ref-"))
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tmp / "ref"), args.reference],
                           check=True, capture_output=True)
            ref = tmp / "ref"
        side = ("reference", ref)
        sides = [side, *sides] if args.reference_first else [*sides, side]
    results = {}
    try:
        for label, co in sides:
            results[label] = {"checkout": str(co), **run_side(co, pkg, ep, contract)}
            print(label, json.dumps(results[label]), flush=True)
    finally:
        if tmp is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "ref")], capture_output=True)
    data = {"leaf": args.leaf, "package": str(pkg), "package_bytes": sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file()),
            "exported_bytes": ep.stat().st_size, "runs": results}
    a, b = results.get("checkout", {}), results.get("reference", {})
    if a.get("peak_mb") and b.get("peak_mb"):
        data["checkout_over_reference"] = {"peak_mb": round(a["peak_mb"] / b["peak_mb"], 3),
                                           "seconds": round(a["seconds"] / b["seconds"], 3)}
        print("checkout / reference:", data["checkout_over_reference"])
    print(write_result(f"verify-memory{args.tag}", data))


if __name__ == "__main__":
    main()
