"""No-op build speed (issue: the doit build graph).

In one run, on one machine:
1. ``python -c "import doit"`` (the floor: Python and doit starting);
2. a no-op ``doit`` on the demo graph (the repo's own [tool.export] config, built once first);
3. a no-op ``doit`` on a one-leaf project whose checkpoint is ~2 GB, against the same project
   with a ~10 MB checkpoint: equal times prove that no-op builds read no checkpoint bytes.

Goals: (2) at most 2x (1); (3) within 10% of each other. Results: bench/results/noop-*.json.

    python bench/bench_noop.py [--runs 10] [--big-gb 2]    (--big-gb 0: skip part 3)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, median_of, timed, write_result  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from scenario import Project, project_toml, student_toml  # noqa: E402

ONE_LEAF = student_toml("one", modes=("prefill",))


def checkpoint_of_size(path: Path, target_bytes: int) -> int:
    """A real student checkpoint of about ``target_bytes`` (its vocabulary sized to get there)."""
    import torch

    from export import checkpoint
    from export.models.registry import get
    from export.models.common import config_from_dict

    d = 64
    vocab = max(256, target_bytes // (2 * d * 4))
    arch = get("student")
    cfg = config_from_dict(arch.config_cls, dict(vocab_size=vocab, d_model=d, n_layers=1, n_heads=2, n_kv_heads=1,
                                                 ffn_hidden=64, max_positions=64))
    torch.manual_seed(0)
    checkpoint.save(path, "student", cfg, arch.build(cfg).state_dict())
    return path.stat().st_size


def one_leaf_project(root: Path, size: int) -> tuple[Project, int]:
    p = Project.create(root)
    (root / "pyproject.toml").write_text(project_toml(ONE_LEAF))
    p.set_shape_sets({"one": {"prefill": [16]}})
    actual = checkpoint_of_size(root / "checkpoints" / "student.pt", size)
    p.doit()
    return p, actual


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--big-gb", type=float, default=2.0)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="noop-bench-"))
    try:
        demo = Project.create(work / "demo")
        shutil.copy(REPO / "pyproject.toml", demo.root / "pyproject.toml")
        shutil.copy(REPO / "shape_sets.json", demo.root / "shape_sets.json")
        print("building the demo graph once...", flush=True)
        cold = timed([sys.executable, "-m", "doit"], demo.root, demo.env())
        compare_sizes = args.big_gb > 0
        if compare_sizes:
            small, small_size = one_leaf_project(work / "small", 10 * 2**20)
            print(f"building the one-leaf projects once ({args.big_gb} GB checkpoint)...", flush=True)
            big, big_size = one_leaf_project(work / "big", int(args.big_gb * 2**30))
        floor = median_of(args.runs, [sys.executable, "-c", "import doit"], work)
        noop = median_of(args.runs, [sys.executable, "-m", "doit"], demo.root, demo.env())
        ratio_demo = noop["median_s"] / floor["median_s"]
        if not compare_sizes:
            assert demo.ran() == set(), "a no-op build ran something"
            path = write_result("noop", {"runs": args.runs, "demo_cold_build_s": round(cold, 1), "import_doit": floor,
                                         "noop_demo": noop, "noop_demo_over_import_doit": round(ratio_demo, 3),
                                         "goals": {"noop_demo_over_import_doit": "<= 2"}})
            print(f"no-op doit {noop['median_s']:.3f} s, import doit {floor['median_s']:.3f} s: "
                  f"ratio {ratio_demo:.2f} (goal <= 2)\n{path}")
            return
        noop_small = median_of(args.runs, [sys.executable, "-m", "doit"], small.root, small.env())
        noop_big = median_of(args.runs, [sys.executable, "-m", "doit"], big.root, big.env())
        for p in (demo, big, small):
            assert p.ran() == set(), "a no-op build ran something"
        ratio_big = noop_big["median_s"] / noop_small["median_s"]
        path = write_result("noop", {
            "runs": args.runs, "demo_cold_build_s": round(cold, 1),
            "import_doit": floor, "noop_demo": noop, "noop_demo_over_import_doit": round(ratio_demo, 3),
            "checkpoint_bytes": {"small": small_size, "big": big_size},
            "noop_small_checkpoint": noop_small, "noop_big_checkpoint": noop_big,
            "noop_big_over_small": round(ratio_big, 3),
            "goals": {"noop_demo_over_import_doit": "<= 2", "noop_big_over_small": "within 0.9..1.1"},
        })
        print(f"{'measure':36} {'median s':>9}")
        label = 'python -c "import doit"'
        print(f"{label:36} {floor['median_s']:9.3f}")
        print(f"{'no-op doit, demo graph':36} {noop['median_s']:9.3f}   ratio {ratio_demo:.2f} (goal <= 2)")
        print(f"{'no-op doit, %5.0f MB checkpoint' % (small_size / 2**20):36} {noop_small['median_s']:9.3f}")
        print(f"{'no-op doit, %5.0f MB checkpoint' % (big_size / 2**20):36} {noop_big['median_s']:9.3f}   ratio {ratio_big:.2f} (goal 0.9..1.1)")
        print(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
