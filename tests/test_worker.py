"""The step worker process (export.runner.worker): it never outlives the process that started it."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from export.runner import worker
    w = worker._Worker(Path(sys.argv[1]))
    # another process keeps the request pipe open: the worker cannot see its parent die by an EOF
    holder = subprocess.Popen(["sleep", "600"], pass_fds=(w.requests.fileno(),))
    print(w.proc.pid, holder.pid, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_worker_dies_with_a_sigkilled_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "worker.log")], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    worker_pid, holder_pid = map(int, parent.stdout.readline().split())
    try:
        assert _alive(worker_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        try:  # wait for the worker's end on a pidfd (readable once it has exited), not by polling
            fd = os.pidfd_open(worker_pid)
        except ProcessLookupError:  # already gone
            fd = None
        if fd is not None:
            try:
                select.select([fd], [], [], 30)
            finally:
                os.close(fd)
        assert not _alive(worker_pid), "the worker outlived its parent"
    finally:
        os.kill(holder_pid, signal.SIGKILL)


LEFTOVERS = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from export.runner import worker
    exported, out = Path(sys.argv[1]), Path(sys.argv[2])
    w = worker._Worker(out / "worker.log")
    seen = []
    for i in range(2):  # two steps in one living worker: nothing of the first is left when the second ends
        status, value = w.call(("convert_coreml", {
            "exported": str(exported / "prefill_T8.pt2"), "contract": str(exported / "prefill_T8.contract.json"),
            "out": str(out / f"p{i}.mlpackage"), "options": {}}, str(out / f"step{i}.log")))
        assert status == "ok", value
        seen.append(sorted(os.listdir(os.environ["TMPDIR"])))
    print(json.dumps(seen), flush=True)
    w.close()
""")


def test_what_a_step_leaves_in_the_tmpdir_goes_with_the_step(exported, tmp_path):
    # coremltools keeps each converted program in a tmp*.mlpackage until its process exits (a 0.5B model's is
    # 943 MB); a worker lives for the whole build, so the step's own TMPDIR (export/runner/scratch.py) takes them
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp / "tmpnotours.mlpackage").mkdir()  # a folder the build did not make stays
    killed = tmp / "model-export-step-tmp-convert_coreml-dead0000"  # a killed worker's: marked, unlocked
    killed.mkdir()
    (killed / ".model-export-scratch").write_text("1\n")
    (killed / "tmpleft.mlpackage").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", LEFTOVERS, str(exported[("student", "fp32")]), str(out)], cwd=REPO,
                       env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    assert json.loads(r.stdout.splitlines()[-1]) == [["tmpnotours.mlpackage"], ["tmpnotours.mlpackage"]]
    assert (out / "p0.mlpackage").is_dir() and (out / "p1.mlpackage").is_dir()
