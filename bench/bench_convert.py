"""Benchmark: export and Core ML conversion seconds and peak memory per (mode, T),
and the bundle's size against the sum of its packages.

Every step runs in its own process (the real CLIs); peak memory is that
process's max RSS (``os.wait4`` rusage). Results go to
``bench/results/bench_convert-<quick|full>-<timestamp>.json`` with machine
info and toolchain versions, and a table is printed.

    PYTHONPATH=. python bench/bench_convert.py --quick
    PYTHONPATH=. python bench/bench_convert.py            # ~50M student, T = 512 1024 2048 4096
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine  # noqa: E402

from export.digest import tree_files  # noqa: E402
from export.toolchain import versions  # noqa: E402

FULL = {"config": {}, "Ts": [512, 1024, 2048, 4096]}  # StudentConfig defaults: d 512, 6 layers, 32k vocab
QUICK = {"config": dict(vocab_size=1024, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=256, max_positions=4096),
         "Ts": [64, 128]}
MODES = ("prefill", "decode")


def run(args: list[str], timeout: float) -> dict:
    """Run ``python args`` in a child; its wall seconds, peak RSS (MB) and exit status."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        proc.kill()
        raise
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    ok = os.waitstatus_to_exitcode(status) == 0
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "ok": ok,
            **({} if ok else {"error": (err or ["?"])[-1][:300]})}


def size(pkg: Path) -> int:
    return sum((pkg / rel).stat().st_size for rel in tree_files(pkg))




def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small model at small T (a minute)")
    p.add_argument("--T", nargs="+", type=int, help="override the T list")
    p.add_argument("--format", default="exported_program", choices=["exported_program", "torchscript"])
    p.add_argument("--timeout", type=float, default=1800, help="per step, seconds")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    Ts = args.T or plan["Ts"]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_convert."))
    ck, exported, coreml = work / "student.pt", work / "exported", work / "coreml"

    from export.checkpoint import demo_model, save
    from export.models.student import StudentConfig

    config, model = demo_model("student", QUICK["config"] if args.quick else asdict(StudentConfig()))
    save(ck, "student", config, model.state_dict())
    params = sum(t.numel() for t in model.state_dict().values())
    del model

    suffix = {"exported_program": ".pt2", "torchscript": ".pt"}[args.format]
    rows, packages, contracts = [], [], []
    result = {"benchmark": "bench_convert", "quick": args.quick, "format": args.format, "parameters": params,
              "config": asdict(config), "machine": machine(), "versions": versions(), "steps": rows,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    dest = REPO / "bench" / "results" / f"bench_convert-{'quick' if args.quick else 'full'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    for T in Ts:
        for mode in MODES:
            name = f"{mode}_T{T}"
            row = {"mode": mode, "T": T}
            row["export"] = run(["-m", "export.export_pytorch", "--checkpoint", str(ck), "--out", str(exported), "--mode", mode,
                                 "--enumerated-T", str(T), "--format", args.format], args.timeout)
            if row["export"]["ok"]:
                pkg = coreml / f"{name}.mlpackage"
                row["convert"] = run(["-m", "export.convert_coreml", "--in", str(exported / (name + suffix)), "--out", str(pkg),
                                      "--contract", str(exported / f"{name}.contract.json")], args.timeout)
                if row["convert"]["ok"]:
                    row["package_bytes"] = size(pkg)
                    packages.append(pkg)
                    contracts.append(exported / f"{name}.contract.json")
            rows.append(row)
            print(_line(row), flush=True)
            dest.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")  # partial results survive a kill
    if packages:
        out = coreml / "student.mlpackage"
        b = run(["-m", "export.bundle", "--packages", *map(str, packages), "--contracts", *map(str, contracts),
                 "--out", str(out)], args.timeout)
        result["bundle"] = {**b, "functions": len(packages), "bytes": size(out) if b["ok"] else None,
                            "sum_of_packages_bytes": sum(size(pkg) for pkg in packages),
                            "largest_package_bytes": max(size(pkg) for pkg in packages)}
        print(f"bundle: {result['bundle']}")
    dest.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(dest)


def _line(row: dict) -> str:
    def cell(step):
        s = row.get(step)
        if not s:
            return f"{'-':>18}"
        return f"{s['seconds']:>7.1f}s {s['peak_rss_mb']:>7.0f}MB" if s["ok"] else f"{'FAILED':>18}"
    return f"{row['mode']:>8} T={row['T']:<5} export {cell('export')}  convert {cell('convert')}  package {row.get('package_bytes', 0) / 2**20:8.1f} MiB"


if __name__ == "__main__":
    main()
