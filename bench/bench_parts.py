"""Peak memory of one leaf, whole model against one part: does a part's export and conversion scale with the
part, not the model?

A random-weight model with Qwen2.5-0.5B's dimensions (transformers' own Qwen2Config: hidden 896, 24 layers,
vocab 151936, tied embeddings; 494M parameters) is saved as transformers does for large models, sharded
(``save_pretrained(max_shard_size="500MB")``: model.safetensors.index.json + shards). Then, each in a fresh
process under ``/usr/bin/time -v`` (its maximum resident set size):

- ``whole``: the model loaded whole (export/checkpoint.py ``load``) and exported at one leaf (prefill, T),
  then that program converted to Core ML (fp16);
- ``chunk0``, ``chunk1`` of ``chunks = 4``: the part's tensors alone read from the shards
  (export/checkpoint.py ``load_part``), its modules built on the meta device, exported at the same leaf, then
  converted. chunk0 holds the embeddings (136M parameters) and 6 layers; chunk1 6 layers only.

    flock /work/heavy.lock .venv/bin/python bench/bench_parts.py [--T 512] [--keep DIR]

Writes bench/results/parts-<date>.json (machine, versions, every figure) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import REPO, RESULTS, machine, versions  # noqa: E402

QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
              rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000)  # --tiny: a smoke run of this script
OPTIONS = {"compute_precision": "fp16", "minimum_deployment_target": "iOS17"}


def make(folder: Path, tiny: bool = False) -> None:
    import torch
    import transformers

    config = transformers.Qwen2Config(**{**QWEN05, **(TINY if tiny else {})})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder, max_shard_size="500MB")


def plan(folder: Path, chunks: int) -> list:
    from types import SimpleNamespace

    from export import parts
    from export.config import PartsConfig

    m = SimpleNamespace(parts=PartsConfig(chunks=chunks), index=0, architecture="hf-causal-lm",
                        coreml=SimpleNamespace(compute_precision="fp16"))
    info = parts.index(folder)
    digests = parts.tensor_digests(info)
    return [{**p.to_json(), "digest": parts.part_digest(info, p, digests), "bytes": p.checkpoint_bytes,
             "weight_bytes": p.weight_bytes} for p in parts.plan(m, info, file="bench")]


def child_export(folder: str, out: str, T: int, part: str | None) -> None:
    from export import checkpoint, export_pytorch

    t0 = time.perf_counter()
    if part is None:
        ck = checkpoint.load(folder)
        model = ck.model()
        export_pytorch.export_entry(ck, model, Path(out), model_name="qwen", mode="prefill", T=T,
                                    formats=["exported_program"])
    else:
        export_pytorch.export_part(folder, json.loads(part), Path(out), model_name="qwen", mode="prefill", T=T,
                                   formats=["exported_program"])
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2)}))


def child_convert(out: str, T: int) -> None:
    from export.coreml.convert import convert

    t0 = time.perf_counter()
    convert(Path(out) / f"prefill_T{T}.pt2", Path(out) / f"prefill_T{T}.mlpackage",
            Path(out) / f"prefill_T{T}.contract.json", OPTIONS)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2)}))


def timed(argv: list[str]) -> dict:
    """Run ``argv`` under /usr/bin/time -v: its seconds (its own line) and maximum resident set size."""
    r = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{r.stdout}\n{r.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", r.stderr).group(1)
    own = json.loads(r.stdout.strip().splitlines()[-1])
    return {"max_rss_mb": round(rss / 1024), "wall": wall, "step_seconds": own["seconds"]}


def tree_mb(p: Path) -> float:
    return round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 1) if p.is_dir() \
        else round(p.stat().st_size / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--keep", type=Path, help="make the model here (kept), or reuse it if it is there")
    ap.add_argument("--tiny", action="store_true", help="a tiny model: check that the script runs")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "export":
            folder, out, T, part = rest
            child_export(folder, out, int(T), None if part == "-" else part)
        else:
            child_convert(rest[0], int(rest[1]))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-parts-"))
    folder = args.keep or work / "qwen05"
    try:
        if not (folder / "config.json").exists():
            made = timed([sys.executable, "-c", f"import sys, json, time; sys.path[:0] = [{str(REPO)!r}, {str(HERE)!r}]; "
                          f"t = time.perf_counter(); import bench_parts as b; from pathlib import Path; "
                          f"b.make(Path({str(folder)!r}), {args.tiny}); print(json.dumps({{'seconds': round(time.perf_counter() - t, 2)}}))"])
            print(f"made {folder}: {made}", flush=True)
        parts = plan(folder, args.chunks)
        me = [sys.executable, str(Path(__file__).resolve()), "--child"]
        rows = {}
        for name, part in [("whole", None)] + [(p["name"], p) for p in parts if p["name"] in ("chunk0", "chunk1")]:
            out = work / name
            out.mkdir()
            spec = "-" if part is None else json.dumps({k: v for k, v in part.items() if k != "weight_bytes"})
            export = timed([*me, "export", str(folder), str(out), str(args.T), spec])
            convert = timed([*me, "convert", str(out), str(args.T)])
            rows[name] = {"export": export, "convert": convert,
                          "program_mb": tree_mb(out / f"prefill_T{args.T}.pt2"),
                          "package_mb": tree_mb(out / f"prefill_T{args.T}.mlpackage"),
                          "part_checkpoint_mb": round(part["bytes"] / 2**20, 1) if part else None,
                          "layers": [part["first"], part["end"]] if part else None}
            print(name, json.dumps(rows[name]), flush=True)
            shutil.rmtree(out)
        whole = rows["whole"]
        for name, r in rows.items():
            r["export_rss_vs_whole"] = round(r["export"]["max_rss_mb"] / whole["export"]["max_rss_mb"], 3)
            r["convert_rss_vs_whole"] = round(r["convert"]["max_rss_mb"] / whole["convert"]["max_rss_mb"], 3)
        result = {"benchmark": "parts", "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine(), "versions": versions(), "model": {"config": QWEN05, "sharded": "500MB"},
                  "leaf": {"mode": "prefill", "T": args.T, "options": OPTIONS}, "chunks": args.chunks,
                  "checkpoint_mb": tree_mb(folder), "rows": rows}
        RESULTS.mkdir(exist_ok=True)
        if args.tiny:
            result["tiny"] = TINY
        path = (work if args.tiny else RESULTS) / f"parts-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"{'case':8} {'export RSS':>11} {'convert RSS':>12} {'program':>9} {'package':>9}")
        for name, r in rows.items():
            print(f"{name:8} {r['export']['max_rss_mb']:>8} MB {r['convert']['max_rss_mb']:>9} MB "
                  f"{r['program_mb']:>6} MB {r['package_mb']:>6} MB")
        print(path if not args.tiny else "(--tiny: not recorded)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
