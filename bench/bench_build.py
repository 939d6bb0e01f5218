"""Cold builds against the script users write today (issue: cold builds twice as fast).

In one run, alternating the order each round to cancel drift:
- naive: a shell script of the seed's CLI calls, one process per step, for every (mode, T):
  ``python -m export.export_pytorch ...`` then ``python -m export.convert_coreml ...``;
- ``doit convert_coreml`` cold (empty artifacts, empty cache);
- ``doit -n 2 convert_coreml`` cold.
Each records wall seconds, CPU seconds (children) and peak memory (sum of the process tree's
resident memory, sampled). The artifacts of all three must be byte-identical. Reference model:
a ~50M parameter student (d=512, 6 layers, 32k vocabulary), prefill and decode at T = 512,
1024, 2048, 4096; ``--quick``: the demo student at T = 64, 128. Results: bench/results/build-*.json.

    python bench/bench_build.py [--quick] [--rounds 1]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, TreeSampler, write_result  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from scenario import Project, project_toml, student_toml  # noqa: E402

PYPROJECT = student_toml("bench")
REFERENCE = dict(vocab_size=32000, d_model=512, n_layers=6, n_heads=8, n_kv_heads=2, ffn_hidden=1408, max_positions=4096)
QUICK = dict(vocab_size=1024, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=256, max_positions=4096)


def make_checkpoint(path: Path, config: dict) -> int:
    code = (
        "import torch, sys\n"
        "from export import checkpoint\nfrom export.models.registry import get\nfrom export.models.common import config_from_dict\n"
        f"arch = get('student'); cfg = config_from_dict(arch.config_cls, {config!r})\n"
        "torch.manual_seed(0); m = arch.build(cfg)\n"
        f"checkpoint.save({str(path)!r}, 'student', cfg, m.state_dict())\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-1])


def measure(cmd: list[str], cwd: Path, env: dict) -> dict:
    """Wall seconds, CPU seconds (sampled every 0.1 s, so a process living less than that is missed)
    and peak memory of a command's whole process tree."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid, every=0.1)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t
    peak, cpu = sampler.stop(), sampler.cpu_seconds()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-4000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": cpu, "peak_mb": peak}


def naive_script(ck: Path, work: Path, leaves) -> Path:
    lines = ["set -euo pipefail"]
    for mode, T in leaves:
        stem = f"{mode}_T{T}"
        lines.append(f"{sys.executable} -m export.export_pytorch --checkpoint {ck} --out {work}/exported "
                     f"--mode {mode} --enumerated-T {T} --format exported_program")
        lines.append(f"{sys.executable} -m export.convert_coreml --backend pytorch --in {work}/exported/{stem}.pt2 "
                     f"--out {work}/coreml/{stem}.mlpackage --contract {work}/exported/{stem}.contract.json")
    script = work / "naive.sh"
    script.write_text("\n".join(lines) + "\n")
    return script


def package_digests(folder: Path) -> dict[str, str]:
    from export.digest import tree_digest

    return {p.name: tree_digest(p) for p in sorted(folder.glob("*.mlpackage"))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args(argv)
    Ts = [64, 128] if args.quick else [512, 1024, 2048, 4096]
    leaves = [(m, t) for m in ("prefill", "decode") for t in Ts]
    work = Path(tempfile.mkdtemp(prefix="build-bench-"))
    try:
        ck = work / "student.pt"
        params = make_checkpoint(ck, QUICK if args.quick else REFERENCE)
        results: dict[str, list] = {"naive": [], "doit": [], "doit -n 2": []}
        digests = {}
        variants = list(results)
        for r in range(args.rounds):
            order = variants[r % 3:] + variants[:r % 3]
            for name in order:
                run_dir = work / f"{name.replace(' ', '_')}-{r}"
                if name == "naive":
                    run_dir.mkdir()
                    script = naive_script(ck, run_dir, leaves)
                    res = measure(["bash", str(script)], REPO, None)
                    digests[name] = package_digests(run_dir / "coreml")
                else:
                    p = Project.create(run_dir)
                    (p.root / "pyproject.toml").write_text(project_toml(PYPROJECT))
                    p.set_shape_sets({"bench": {"prefill": Ts, "decode": Ts}})
                    shutil.copy(ck, p.root / "checkpoints" / "student.pt")
                    extra = ["-n", "2"] if name.endswith("2") else []
                    res = measure([sys.executable, "-m", "doit", *extra, "convert_coreml"], p.root, p.env())
                    digests[name] = package_digests(p.root / "artifacts" / "student" / "coreml")
                results[name].append(res)
                print(f"round {r}: {name:10} {res}", flush=True)
        identical = len({tuple(sorted(d.items())) for d in digests.values()}) == 1
        best = {k: min(v, key=lambda x: x["wall_s"]) for k, v in results.items()}
        ratio = {k: round(best[k]["wall_s"] / best["naive"]["wall_s"], 3) for k in best}
        path = write_result("build-quick" if args.quick else "build", {
            "model": {"parameters": params, "config": QUICK if args.quick else REFERENCE, "T": Ts,
                      "modes": ["prefill", "decode"]},
            "rounds": args.rounds, "runs": results, "best": best, "wall_over_naive": ratio,
            "artifacts_identical": identical, "goal": "doit <= 0.5 x naive; doit -n 2 lower still",
        })
        print(f"{'variant':12} {'wall s':>8} {'cpu s':>8} {'peak MB':>8} {'/naive':>7}")
        for k, b in best.items():
            print(f"{k:12} {b['wall_s']:8.1f} {b['cpu_s']:8.1f} {b['peak_mb']:8.0f} {ratio[k]:7.3f}")
        print(f"artifacts byte-identical: {identical}")
        print(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
