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
