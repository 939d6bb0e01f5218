"""How long CI takes: ``.ci/run``'s steps, timed from a fresh clone, with the machine's load.

    .venv/bin/python bench/bench_ci.py                 # the checked-out commit (HEAD)
    .venv/bin/python bench/bench_ci.py --rev main --rev h14   # several commits, one after the other

For each commit: ``git clone`` of this repository into a temporary folder, ``./dev setup`` there
(a new .venv, as CI makes it), then every ``./dev test ...`` line of that clone's ``.ci/run``, in
order, with ``CI=true`` and the variables .ci/run exports, as CI runs it. Recorded per step: wall seconds, pytest's counts (passed,
skipped, xfailed, ...), the load average before and after and sampled every 15 s while it ran,
the memory available; and the machine (cores, memory) and versions. The JSON goes to
bench/results/ci-*.json, each step's whole output beside the clones (--workdir). A step that
fails stops that commit's run and is recorded as failed.

The machine is often shared: compare commits measured in the same run (same load), and read
the load figures beside the times.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_result  # noqa: E402

COUNTS = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected|warnings?)")


def memory_mb() -> dict:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        if key in ("MemTotal", "MemAvailable"):
            info[key] = int(value.split()[0]) // 1024
    return {"total_mb": info.get("MemTotal"), "available_mb": info.get("MemAvailable")}


class LoadSampler:
    """os.getloadavg() every ``every`` seconds while a step runs (1-minute figure)."""

    def __init__(self, every: float = 15.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            self.samples.append(round(os.getloadavg()[0], 2))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def pytest_counts(output: str) -> dict:
    """The counts of pytest's closing line ("== 12 passed, 1 xfailed in 3.2s ==")."""
    for line in reversed(output.splitlines()):
        if re.search(r"\d+ (passed|failed|errors?|skipped)", line) and " in " in line:
            counts = {}
            for n, what in COUNTS.findall(line):
                what = {"error": "errors", "warning": "warnings"}.get(what, what)
                counts[what] = int(n)
            return counts
    return {}


def run_step(name: str, cmd: str, cwd: Path, env: dict, log: Path | None = None) -> dict:
    before = {"load": [round(x, 2) for x in os.getloadavg()], **memory_mb()}
    started = time.perf_counter()
    with LoadSampler() as sampler:
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = {"load": [round(x, 2) for x in os.getloadavg()], **memory_mb()}
    out = r.stdout + r.stderr
    if log is not None:
        log.write_text(out)
    step = {"step": name, "command": cmd, "seconds": round(seconds, 1), "exit": r.returncode,
            "counts": pytest_counts(out), "before": before, "after": after, "load_samples": sampler.samples,
            "slowest": _slowest(out)}
    print(f"  {name}: {seconds:.0f} s, exit {r.returncode}, {step['counts']}, load {before['load'][0]} -> "
          f"{after['load'][0]}", file=sys.stderr, flush=True)
    if r.returncode != 0:
        step["tail"] = out[-4000:]
    return step


def _slowest(output: str) -> list[str]:
    """The lines of pytest's ``--durations`` table."""
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if "slowest" in line and "durations" in line)
    except StopIteration:
        return []
    return [line for line in lines[start + 1:start + 16] if re.match(r"^\d+\.\d+s ", line)]


def ci_steps(clone: Path) -> list[str]:
    """The ``./dev test`` lines of the clone's .ci/run, in order."""
    return [line.strip() for line in (clone / ".ci" / "run").read_text().splitlines()
            if line.strip().startswith("./dev test")]


def ci_exports(clone: Path) -> dict[str, str]:
    """The variables the clone's .ci/run exports with a plain ``export NAME=VALUE`` (REQUIRE_CHROMIUM)."""
    found = {}
    for line in (clone / ".ci" / "run").read_text().splitlines():
        m = re.fullmatch(r"export ([A-Za-z_][A-Za-z0-9_]*)=(\S*)", line.strip())
        if m:
            found[m[1]] = m[2]
    return found


def bench_rev(rev: str, workdir: Path, keep: bool) -> dict:
    clone = workdir / f"ci-{re.sub(r'[^A-Za-z0-9_.-]', '_', rev)}"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "checkout", "--quiet", rev], cwd=clone, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()
    print(f"{rev} ({commit[:10]}) in {clone}", file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_EXPORT_", "PYTEST_", "VIRTUAL_ENV"))}
    env["CI"] = "true"
    env.update(ci_exports(clone))
    steps = [run_step("setup", "./dev setup", clone, env, workdir / f"{clone.name}-setup.log")]
    for i, cmd in enumerate(ci_steps(clone), 1):
        if steps[-1]["exit"] != 0:
            break
        steps.append(run_step(f"step{i}", cmd, clone, env, workdir / f"{clone.name}-step{i}.log"))
    total = sum(s["seconds"] for s in steps)
    tests = {}
    for s in steps[1:]:
        for k, v in s["counts"].items():
            tests[k] = tests.get(k, 0) + v
    if not keep:
        shutil.rmtree(clone, ignore_errors=True)
    return {"rev": rev, "commit": commit, "steps": steps, "total_seconds": round(total, 1),
            "passed": all(s["exit"] == 0 for s in steps), "tests": tests}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", action="append", help="commit, branch or tag to clone (default HEAD; repeat for several)")
    ap.add_argument("--workdir", type=Path, help="where the clones go (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the clones")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ci-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs = [bench_rev(rev, workdir, args.keep) for rev in (args.rev or ["HEAD"])]
    path = write_result("ci", {"cores": os.cpu_count(), "memory": memory_mb(), "runs": runs,
                               "command": " ".join(shlex.quote(a) for a in sys.argv)})
    for run in runs:
        steps = ", ".join(f"{s['step']} {s['seconds']:.0f} s" for s in run["steps"])
        print(f"{run['rev']}: {run['total_seconds']:.0f} s in all ({steps}); tests {run['tests']}", file=sys.stderr)
    print(path)


if __name__ == "__main__":
    main()
