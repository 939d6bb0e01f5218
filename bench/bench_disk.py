"""Disk bytes of artifacts/ + the cache, and build time, before and after a change (issue 21, item 3).

For each revision (``--before``, default the merge-base with main; ``--after``, default HEAD), in one
run: a fresh clone at that revision, a cold ``doit`` of the model (empty artifacts, empty cache
inside the clone), then

- ``bytes``: ``du -sb artifacts .cache`` in one call (a file hardlinked in both is counted once),
  and each folder alone;
- the ``.pt2`` bytes, and the ``weight.bin`` files of the packages (how many, how many distinct
  inodes, their bytes counted once per inode);
- wall seconds and the peak resident memory of the process tree.

The ratios after/before are of the same run. Models:

- ``demo``: the repository's own config (student and judge, 4 T each), every task;
- ``qwen0.5b``: a random-weight transformers Qwen2 with Qwen2.5-0.5B's dimensions (hidden 896,
  24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936), prefill and decode at T 512
  and 2048, fp16 packages; ``convert_coreml`` (export + conversion of the 4 leaves). Run it under
  the machine's heavy lock: ``flock /work/heavy.lock python bench/bench_disk.py --model qwen0.5b``.

Results: bench/results/disk-<model>-<time>.json.

    PYTHONPATH=. python bench/bench_disk.py [--model demo|qwen0.5b] [--before REV] [--after REV] [--keep]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, TreeSampler, write_result  # noqa: E402

QWEN = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
            intermediate_size=4864, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
QWEN_TOML = """
[tool.export]
artifacts = "artifacts"
shape_sets = "shape_sets.json"

[[tool.export.models]]
name = "qwen"
architecture = "hf-causal-lm"
checkpoint = "models/qwen"
shape_set = "qwen"
modes = ["prefill", "decode"]
formats = ["exported_program"]
coreml = { compute_precision = "fp16", minimum_deployment_target = "iOS17" }
"""


def make_qwen(folder: Path) -> int:
    code = (
        "import torch, sys\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        f"cfg = Qwen2Config(**{QWEN!r})\n"
        "torch.manual_seed(0)\n"
        "m = Qwen2ForCausalLM(cfg).eval()\n"
        f"m.save_pretrained({str(folder)!r}, safe_serialization=True)\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-1])


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def du(*paths: Path) -> int:
    """Bytes of ``paths`` with ``du -sb`` in one call: a hardlinked file counts once."""
    present = [str(p) for p in paths if p.exists()]
    if not present:
        return 0
    out = subprocess.run(["du", "-sbc", *present], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def weight_files(artifacts: Path) -> dict:
    files = [p for p in artifacts.rglob("weight.bin") if p.is_file()]
    inodes = {}
    for p in files:
        st = p.stat()
        inodes[(st.st_dev, st.st_ino)] = st.st_size
    return {"files": len(files), "inodes": len(inodes), "bytes_per_inode": sum(inodes.values()),
            "bytes_per_file": sum(p.stat().st_size for p in files)}


def build(rev: str, root: Path, model: str, checkpoint: Path | None, targets: list[str]) -> dict:
    subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
    git("checkout", "-q", rev, cwd=root)
    if model == "qwen0.5b":
        py = root / "pyproject.toml"
        text = py.read_text()
        py.write_text(text[:text.index("[tool.export]")] + QWEN_TOML)
        (root / "shape_sets.json").write_text('{"qwen": {"prefill": [512, 2048], "decode": [512, 2048]}}\n')
        (root / "models" / "qwen").mkdir(parents=True)
        for f in checkpoint.iterdir():
            os.link(f, root / "models" / "qwen" / f.name)  # the checkpoint is not counted: it is the user's
    env = {**os.environ, "MODEL_EXPORT_CACHE": str(root / ".cache"), "PYTHONPATH": str(root)}
    env.pop("MODEL_EXPORT_REMOTE_CACHE", None)
    log = root.parent / f"{root.name}.log"
    t = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "doit", *targets], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        rc = proc.wait()
        sampler.stop()
    seconds = time.monotonic() - t
    if rc != 0:
        raise SystemExit(f"error: {rev}: the build failed (exit {rc}); log: {log}")
    artifacts, cache = root / "artifacts", root / ".cache"
    return {"rev": rev, "seconds": round(seconds, 1), "peak_mb": round(sampler.peak / 2**20),
            "bytes": du(artifacts, cache), "artifacts_bytes": du(artifacts), "cache_bytes": du(cache),
            "pt2_bytes": sum(p.stat().st_size for p in artifacts.rglob("*.pt2")),
            "weight_bin": weight_files(artifacts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["demo", "qwen0.5b"], default="demo")
    p.add_argument("--before", default=None, help="revision before the change (default: merge-base of HEAD and main)")
    p.add_argument("--after", default="HEAD")
    p.add_argument("--keep", action="store_true", help="keep the clones (printed)")
    args = p.parse_args()
    before = git("rev-parse", args.before or git("merge-base", "HEAD", "main"))
    after = git("rev-parse", args.after)
    targets = ["convert_coreml"] if args.model == "qwen0.5b" else []
    tmp = Path(tempfile.mkdtemp(prefix="bench-disk-"))
    try:
        checkpoint, params = None, None
        if args.model == "qwen0.5b":
            checkpoint = tmp / "qwen"
            params = make_qwen(checkpoint)
            print(f"checkpoint: {params} parameters, {du(checkpoint)} bytes", flush=True)
        runs = {}
        for label, rev in (("before", before), ("after", after)):
            runs[label] = build(rev, tmp / label, args.model, checkpoint, targets)
            print(f"{label} {rev[:10]}: {runs[label]}", flush=True)
        b, a = runs["before"], runs["after"]
        data = {"model": args.model, "parameters": params, "targets": targets or ["(all)"],
                "checkpoint_bytes": du(checkpoint) if checkpoint else None, "runs": runs,
                "ratios": {"bytes": round(a["bytes"] / b["bytes"], 4), "seconds": round(a["seconds"] / b["seconds"], 3),
                           "peak_mb": round(a["peak_mb"] / max(b["peak_mb"], 1), 3)}}
        path = write_result(f"disk-{args.model}", data)
        print(f"ratios after/before: {data['ratios']}; {path}")
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
