"""Benchmark of the PyTorch export step: seconds and peak memory per (mode, T, format).

Each (mode, T, format) runs in a fresh process (so peak memory is its own):
the child loads the checkpoint, builds the model, then times ``export_entry``;
it reports its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) after loading
and at the end. Results go to ``bench/results/export-<date>[-quick].json``
with the machine and toolchain versions, and a table is printed.

    PYTHONPATH=. python bench/bench_export.py            # ~50M-parameter student, T 512..4096
    PYTHONPATH=. python bench/bench_export.py --quick    # demo student, T 64/128
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import REPO, machine  # noqa: E402
FULL_TS = (512, 1024, 2048, 4096)
QUICK_TS = (64, 128)
MODES = ("prefill", "decode")
FORMATS = ("torchscript", "exported_program")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args) -> None:
    """One measurement, in its own process; prints one JSON line."""
    import torch

    from export import checkpoint, export_pytorch

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    ck = checkpoint.load(args.checkpoint)
    model = ck.model()
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    out = Path(args.out)
    t1 = time.perf_counter()
    export_pytorch.export_entry(ck, model, out, model_name="bench", mode=args.mode, T=args.T, formats=[args.format])
    export_s = time.perf_counter() - t1
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".pt", ".pt2"))
    print(json.dumps({"load_seconds": round(load_s, 3), "export_seconds": round(export_s, 3),
                      "rss_after_load_mb": round(rss_loaded, 1), "peak_rss_mb": round(_rss_mb(), 1),
                      "artifact_mb": round(size / 2**20, 2)}))




def make_checkpoint(path: Path, quick: bool) -> dict:
    import torch

    from export import checkpoint
    from export.models.registry import get

    if quick:
        checkpoint.make_demo(path, "student")
        config = checkpoint.load(path).config
    else:
        arch = get("student")
        config = arch.config_cls()  # the defaults: d_model 512, 6 layers, vocab 32000
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = arch.build(config)
        checkpoint.save(path, "student", config, model.state_dict())
    sd = checkpoint.load(path).state_dict
    from dataclasses import asdict

    return {"config": asdict(config), "parameters": sum(v.numel() for v in sd.values())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the demo-sized student at T 64/128")
    p.add_argument("--T", nargs="+", type=int, help="override the sequence lengths")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--format", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.T = args.T[0]
        return child(args)

    from export.toolchain import versions

    ts = tuple(args.T or (QUICK_TS if args.quick else FULL_TS))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        tmp = Path(tmp)
        ck = tmp / "student.pt"
        model_info = make_checkpoint(ck, args.quick)
        print(f"student: {model_info['parameters'] / 1e6:.1f}M parameters; T {list(ts)}", flush=True)
        for mode in MODES:
            for T in ts:
                for fmt in FORMATS:
                    out = tmp / f"{mode}-{T}-{fmt}"
                    out.mkdir()
                    t0 = time.perf_counter()
                    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--checkpoint", str(ck),
                                        "--mode", mode, "--T", str(T), "--format", fmt, "--out", str(out)],
                                       env=env, capture_output=True, text=True)
                    wall = time.perf_counter() - t0
                    if r.returncode != 0:
                        row = {"mode": mode, "T": T, "format": fmt, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
                    else:
                        row = {"mode": mode, "T": T, "format": fmt, **json.loads(r.stdout.strip().splitlines()[-1]),
                               "process_seconds": round(wall, 2)}
                    rows.append(row)
                    print(_row(row), flush=True)
    # every child's peak, as the kernel saw it (max over all children)
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = {
        "benchmark": "export_pytorch", "quick": args.quick,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(), "model": {"architecture": "student", **model_info},
        "method": "one fresh process per (mode, T, format); export_seconds times export_entry only "
                  "(trace/export + serialize + write); peak_rss_mb is the child's getrusage ru_maxrss",
        "children_peak_rss_mb": round(children_peak, 1),
        "total_seconds": round(time.time() - started, 1),
        "results": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    name = f"export-{dt.date.today().isoformat()}{'-quick' if args.quick else ''}.json"
    (args.results / name).write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(rows))
    print(f"\nwrote {args.results / name} ({result['total_seconds']} s)")


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['mode']:8} {r['T']:>5} {r['format']:17} ERROR {r['error']}"
    return (f"{r['mode']:8} {r['T']:>5} {r['format']:17} {r['export_seconds']:>9.2f} {r['peak_rss_mb']:>10.0f}"
            f" {r['rss_after_load_mb']:>10.0f} {r['artifact_mb']:>9.1f}")


def table(rows) -> str:
    head = f"{'mode':8} {'T':>5} {'format':17} {'export s':>9} {'peak MB':>10} {'loaded MB':>10} {'file MB':>9}"
    return "\n".join([head, "-" * len(head)] + [_row(r) for r in rows])


if __name__ == "__main__":
    main()
