"""What every benchmark records: the machine, the versions, and where results go."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
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
