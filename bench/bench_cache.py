"""Restore from the cache against a cold build (issue: the artifact cache).

In one run: a cold build of the demo config A (empty artifacts, empty cache); a build of B
(the student's Core ML precision changed); then A again, restored from the cache; and a
second checkout with an empty artifacts/ sharing the cache. Goal: restoring A costs at most
5% of its cold build. Results: bench/results/cache-*.json.

    python bench/bench_cache.py
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, timed, write_result  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from scenario import Project  # noqa: E402

A = 'compute_precision = "fp16"'
B = 'compute_precision = "fp32"'


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    try:
        p = Project.create(work / "one")
        shutil.copy(REPO / "shape_sets.json", p.root / "shape_sets.json")
        config = (REPO / "pyproject.toml").read_text()
        assert A in config, "the demo config sets the student's compute precision"
        doit = [sys.executable, "-m", "doit"]
        (p.root / "pyproject.toml").write_text(config)
        cold = timed(doit, p.root, p.env())
        built = len(p.ran())
        (p.root / "pyproject.toml").write_text(config.replace(A, B))
        b = timed(doit, p.root, p.env())
        (p.root / "pyproject.toml").write_text(config)
        back = timed(doit, p.root, p.env())
        restored, rebuilt = len(p.restored()), len(p.ran() - {"prune_artifacts"})
        other = Project.create(work / "two")
        shutil.copy(REPO / "shape_sets.json", other.root / "shape_sets.json")
        (other.root / "pyproject.toml").write_text(config)
        checkout = timed(doit, other.root, other.env({"MODEL_EXPORT_CACHE": str(p.root / ".cache")}))
        assert rebuilt == 0 and other.ran() == set(), "a restore built something"
        path = write_result("cache", {
            "config": "demo (repo pyproject.toml); B = student compute_precision fp32",
            "cold_A_s": round(cold, 2), "tasks_built_cold": built, "build_B_s": round(b, 2),
            "restore_A_s": round(back, 2), "tasks_restored": restored,
            "second_checkout_s": round(checkout, 2),
            "restore_over_cold": round(back / cold, 4), "second_checkout_over_cold": round(checkout / cold, 4),
            "goal": "restore_over_cold <= 0.05",
        })
        print(f"cold build A       {cold:8.2f} s  ({built} tasks)")
        print(f"build B            {b:8.2f} s")
        print(f"A again (restored) {back:8.2f} s  ({restored} tasks restored)  ratio {back / cold:.3f} (goal <= 0.05)")
        print(f"second checkout    {checkout:8.2f} s  ratio {checkout / cold:.3f}")
        print(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
