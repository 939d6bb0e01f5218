"""No-op build speed, by graph size (issue: a quiet, fast no-op at any size).

In one run, on one machine, alternating the commands round by round so that the load of the machine
falls on each alike:
1. ``python -c "import doit"`` (the floor: Python and doit starting);
2. a no-op ``doit`` on generated graphs of about 100, 1000 and 3000 tasks (``--sizes``): N demo
   students, each with a prefill and a decode at k T values. Their state is primed, not built (no
   step needs to run for a no-op): every task's outputs are written as small files (packages as
   folders shaped like real .mlpackages), and doit's dependency file records them through doit's
   own ``Dependency.save_success``, as a build would. A first ``doit`` then must run nothing; what
   the no-op measures is what every no-op costs: loading the graph and the up-to-date checks.
3. with ``--demo``: a no-op on the demo graph (the repo's own [tool.export], built for real once).
4. with ``--big-gb G``: a no-op on a one-leaf project whose checkpoint is ~G GB, against the same
   project with a ~10 MB checkpoint: equal times prove that no-op builds read no checkpoint bytes.

Goal: (2) at most 1.5x (1) at 1000 tasks. Results: bench/results/noop-*.json.

    python bench/bench_noop.py [--runs 10] [--sizes 100 1000 3000] [--demo] [--big-gb 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, timed, write_result  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from scenario import Project, project_toml, student_toml  # noqa: E402

ONE_LEAF = student_toml("one", modes=("prefill",))
# models x T values per mode: about 100, 1000, 3000 tasks (each model: a checkpoint, 2 x k exports and
# conversions, a bundle; plus prune_artifacts)
SHAPES = {100: (4, 6), 1000: (10, 25), 3000: (30, 25)}


def graph_toml(models: int) -> str:
    lines = ['[tool.export]', 'artifacts = "artifacts"', 'shape_sets = "shape_sets.json"']
    for i in range(models):
        lines += ['', '[[tool.export.models]]', f'name = "m{i:03d}"', 'architecture = "student"', 'checkpoint = "demo"',
                  'shape_set = "wide"']
    return "\n".join(lines) + "\n"


PRIME = textwrap.dedent('''
    """Prime a project's state as if it were built: every output written (small), every task recorded
    as successful in doit's dependency file by doit's own Dependency.save_success."""
    import sys
    sys.argv = ["doit", "list"]  # a read-only command: no lock
    sys.path.insert(0, ".")
    from pathlib import Path
    import dodo
    from doit.dependency import Dependency, SqliteDB
    from doit.loader import load_tasks
    from export.planner import tasks as T

    tasks = {t.name: t for t in load_tasks(vars(dodo))}
    dep = Dependency(SqliteDB, ".export/doit.sqlite", checker_cls=T.ContentChecker)
    done = set()

    def write(p: Path):
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".mlpackage":  # the layout of a real package: a manifest, the model, the weights
            for rel, size in (("Manifest.json", 600), ("Data/com.apple.CoreML/model.mlmodel", 4000),
                              ("Data/com.apple.CoreML/weights/weight.bin", 20000)):
                f = p / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes((str(f) * (size // len(str(f)) + 1)).encode()[:size])
        else:
            p.write_bytes(str(p).encode() * 50)

    def visit(name):
        if name in done:
            return
        done.add(name)
        task = tasks[name]
        for d in task.task_dep:
            visit(d)
        for action in task.actions:
            if getattr(action, "py_callable", None) is T.run_step:
                step, kwargs, outputs, full, key, inputs = action.args
                for p in outputs:
                    write(p)
                task.values = {"outputs": {T.rel(p): T._stat().any(p) for p in outputs}}
                for utd, _, _ in task.uptodate:  # what doit's up-to-date check computes before saving
                    if hasattr(utd, "_calc_digest"):
                        utd.config_digest = utd._calc_digest()
                for saver in task.value_savers:
                    task.values.update(saver())
                dep.save_success(task)

    producers = {t: n for n, task in tasks.items() for t in task.targets}
    order = sorted(tasks, key=lambda n: n.split(":")[0] != "checkpoint")
    for n in order:
        for f in tasks[n].file_dep:
            if f in producers:
                visit(producers[f])
        visit(n)
    dep.close()
    print(sum(1 for t in tasks.values() if t.actions))
''')


def graph_project(root: Path, models: int, k: int) -> tuple[Project, int]:
    """A project of ``models`` demo students, prefill and decode at k T values, its state primed."""
    p = Project.create(root)
    (root / "pyproject.toml").write_text(project_toml(graph_toml(models)))
    ts = [16 * (i + 1) for i in range(k)]
    p.set_shape_sets({"wide": {"prefill": ts, "decode": ts}})
    (root / ".export").mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, "-c", PRIME], cwd=root, env=p.env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"priming failed:\n{r.stdout}\n{r.stderr}")
    counts = json.loads(p.doit("plan", "--json").stdout)["counts"]  # never start a real build of thousands of steps
    if set(k for k, v in counts.items() if v) != {"up-to-date"}:
        raise SystemExit(f"priming left work to do: {counts}")
    p.doit()  # the first run after priming: it finds the state complete (and fills the stat cache)
    p.doit()
    leaves = p.last_build()
    assert p.ran() == set() and p.restored() == set(), f"a primed no-op ran something: {p.ran() | p.restored()}"
    return p, len(leaves)


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


def rounds(runs: int, commands: dict[str, tuple[list[str], Path, dict | None]]) -> dict[str, dict]:
    """Each command once per round, ``runs`` rounds: the medians, and every run."""
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(runs):
        for k, (cmd, cwd, env) in commands.items():
            times[k].append(timed(cmd, cwd, env))
    return {k: {"median_s": round(statistics.median(v), 4), "runs_s": [round(x, 4) for x in v]} for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="*", default=[100, 1000, 3000], choices=sorted(SHAPES))
    ap.add_argument("--demo", action="store_true", help="also the demo graph, built for real once (minutes)")
    ap.add_argument("--big-gb", type=float, default=0.0, help="also the 10 MB against G GB checkpoint no-op")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="noop-bench-"))
    py = sys.executable
    try:
        commands = {"import_doit": ([py, "-c", "import doit"], work, None)}
        tasks_of = {}
        for size in args.sizes:
            models, k = SHAPES[size]
            print(f"priming a graph of ~{size} tasks ({models} models x 2 modes x {k} T)...", flush=True)
            p, n = graph_project(work / f"g{size}", models, k)
            tasks_of[f"noop_{size}"] = n
            commands[f"noop_{size}"] = ([py, "-m", "doit"], p.root, p.env())
        extra = {}
        if args.demo:
            demo = Project.create(work / "demo")
            shutil.copy(REPO / "pyproject.toml", demo.root / "pyproject.toml")
            shutil.copy(REPO / "shape_sets.json", demo.root / "shape_sets.json")
            print("building the demo graph once...", flush=True)
            extra["demo_cold_build_s"] = round(timed([py, "-m", "doit"], demo.root, demo.env()), 1)
            tasks_of["noop_demo"] = len(demo.last_build())
            commands["noop_demo"] = ([py, "-m", "doit"], demo.root, demo.env())
        if args.big_gb > 0:
            small, small_size = one_leaf_project(work / "small", 10 * 2**20)
            print(f"building the one-leaf projects once ({args.big_gb} GB checkpoint)...", flush=True)
            big, big_size = one_leaf_project(work / "big", int(args.big_gb * 2**30))
            extra["checkpoint_bytes"] = {"small": small_size, "big": big_size}
            commands["noop_small_checkpoint"] = ([py, "-m", "doit"], small.root, small.env())
            commands["noop_big_checkpoint"] = ([py, "-m", "doit"], big.root, big.env())
        print(f"timing {len(commands)} commands, {args.runs} rounds...", flush=True)
        measured = rounds(args.runs, commands)
        floor = measured["import_doit"]["median_s"]
        ratios = {k: round(v["median_s"] / floor, 3) for k, v in measured.items() if k.startswith("noop_") and "checkpoint" not in k}
        if args.big_gb > 0:
            extra["noop_big_over_small"] = round(measured["noop_big_checkpoint"]["median_s"]
                                                 / measured["noop_small_checkpoint"]["median_s"], 3)
        path = write_result("noop", {"runs": args.runs, "tasks": tasks_of, "measured": measured,
                                     "over_import_doit": ratios, **extra,
                                     "goals": {"noop_1000 over import_doit": "<= 1.5",
                                               "noop_big_over_small": "within 0.9..1.1"}})
        label = 'python -c "import doit"'
        print(f"{'measure':36} {'tasks':>6} {'median s':>9} {'ratio':>7}")
        print(f"{label:36} {'':>6} {floor:9.3f}")
        for k, v in measured.items():
            if k == "import_doit":
                continue
            print(f"{k:36} {tasks_of.get(k, ''):>6} {v['median_s']:9.3f} {ratios.get(k, ''):>7}")
        if "noop_big_over_small" in extra:
            print(f"big / small checkpoint: {extra['noop_big_over_small']:.2f} (goal 0.9..1.1)")
        print(path)
        print(json.dumps(ratios))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
