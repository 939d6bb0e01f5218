"""What every benchmark records: the machine, the versions, and where results go."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    mem_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "platform": platform.platform(),
            "load_average": os.getloadavg()}


def versions() -> dict:
    from export.toolchain import versions as v

    return {**v(), "doit": _version("doit"), "xxhash": _version("xxhash")}


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    body = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
            "versions": versions(), **data}
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path


def timed(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> float:
    """Wall seconds of one command."""
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return elapsed


def median_of(n: int, cmd: list[str], cwd: Path, env: dict | None = None) -> dict:
    runs = [timed(cmd, cwd, env) for _ in range(n)]
    return {"median_s": round(statistics.median(runs), 4), "runs_s": [round(r, 4) for r in runs]}


class TreeSampler:
    """Every ``every`` seconds: the sum of the resident memory of a process and all its descendants
    (``peak``, bytes), and the CPU time of every process seen in the tree (grandchildren included:
    a doit worker is not waited for by the benchmark)."""

    def __init__(self, pid: int, every: float = 0.2):
        import psutil

        self.root, self.every, self.peak, self.samples = psutil.Process(pid), every, 0, 0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            rss = 0
            for p in procs:
                try:
                    with p.oneshot():
                        rss += p.memory_info().rss
                        t = p.cpu_times()
                        self.cpu[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
            self.peak, self.samples = max(self.peak, rss), self.samples + 1
            self._stop.wait(self.every)

    def stop(self) -> float:
        """Stop sampling; the peak in MB."""
        self._stop.set()
        self._thread.join()
        return round(self.peak / 2**20, 1)

    def cpu_seconds(self) -> float:
        return round(sum(self.cpu.values()), 2)
