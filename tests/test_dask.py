"""Builds on a Dask cluster (export.runner.cluster): a real ``dask scheduler`` and two ``dask worker --name``
processes started here on 127.0.0.1 (as README "On a Dask cluster" tells a team to), the shared cache on a
directory store and on a real S3 server (moto, 127.0.0.1).

Each worker declares MEMORY_MB = 600 and has two threads; every step of these tiny projects
reserves 300-600 MB, and any two together more than 600: so no worker may ever run two steps
at once although it has the threads and doit has eight lanes in flight.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import test_cache
from faults import STEPS as TINY_STEPS
from faults import create_tiny
from scenario import Project
from test_parts import parted_built  # noqa: F401 - the local parted build, shared with tests/test_parts.py

pytest.importorskip("distributed")

WORKER_MB = 600
STEPS = ("checkpoint:", "export_pytorch:", "convert_coreml:", "bundle_coreml:", "verify_coreml:")


@pytest.fixture(scope="module")
def s3_env(s3_server) -> dict:
    return test_cache.s3_env(s3_server)


NAMES = ("alpha", "beta")  # the workers' --name


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_env):
    """(scheduler address, client, the workers' scratch folder). ``dask scheduler`` and two ``dask worker
    --name`` processes (each with a nanny, which restarts a killed worker with the same environment: its own
    local cache, the S3 endpoint and keys, TMPDIR)."""
    from distributed import Client

    base = tmp_path_factory.mktemp("dask")
    scratch = base / "worker-tmp"
    scratch.mkdir()
    dask = [sys.executable, "-m"]  # python -m distributed.cli.dask_worker: the `dask worker` command
    # the tests folder on the path: client.run() sends functions of this module by reference
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    log = open(base / "cluster.log", "ab")
    procs = [subprocess.Popen([*dask, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", ":0", "--scheduler-file", str(base / "scheduler.json")],
                              env=env, stdout=log, stderr=log)]
    try:
        deadline = time.monotonic() + 60
        while not (base / "scheduler.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads((base / "scheduler.json").read_text())["address"]
        for name in NAMES:
            wenv = {**env, "MODEL_EXPORT_CACHE": str(base / f"cache-{name}"), "TMPDIR": str(scratch), **s3_env}
            procs.append(subprocess.Popen([*dask, "distributed.cli.dask_worker", address, "--name", name,
                                           "--nworkers", "1", "--nthreads", "2", "--resources", f"MEMORY_MB={WORKER_MB}",
                                           "--host", "127.0.0.1", "--dashboard-address", ":0",
                                           "--local-directory", str(base / f"local-{name}")],
                                          env=wenv, stdout=log, stderr=log))
        client = Client(address, timeout=60)
        client.wait_for_workers(2, timeout=120)
        yield address, client, scratch
        client.close()
    finally:
        for proc in reversed(procs):  # the workers (and their nannies), then the scheduler
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@pytest.fixture(scope="module")
def reference(scenario_built) -> Project:
    """The same project built locally (no cluster): the bytes every cluster build must give."""
    return scenario_built.project


@pytest.fixture(scope="module")
def tiny_reference(tiny_built) -> Project:
    """The tiny project (faults.create_tiny: one student at T 16, both modes; 8 steps) built locally: the
    nightly builds on the cluster use it, the smallest project whose steps are of every kind but the
    judge's checkpoint (the killed-worker test below runs that one on the cluster)."""
    return tiny_built.project


def _steps(p: Project) -> dict[str, dict]:
    tasks = json.loads((p.root / "artifacts" / "last_build.json").read_text())["tasks"]
    return {n: rec for n, rec in tasks.items() if n.startswith(STEPS)}


def _assert_memory_limited(records: dict[str, dict]) -> None:
    """No worker ran two steps at once: the MEMORY_MB resource, not the threads, set the concurrency."""
    need = sorted(rec["reserved_mb"] for rec in records.values())
    assert need[-1] <= WORKER_MB and need[0] + need[1] > WORKER_MB  # the premise: one step per worker at a time
    by_worker: dict[str, list] = {}
    for name, rec in records.items():
        by_worker.setdefault(rec["worker"], []).append((rec["started"], rec["ended"], name))
    for worker, spans in by_worker.items():
        spans.sort()
        for (s1, e1, n1), (s2, e2, n2) in zip(spans, spans[1:]):
            assert s2 >= e1, f"{worker} ran {n1} and {n2} at once"


def _workers(client) -> set[str]:
    """The connected workers' names (what last_build.json records)."""
    return {str(w["name"]) for w in client.scheduler_info(n_workers=-1)["workers"].values()}


def test_nightly_on_the_cluster_with_a_directory_store(cluster, tiny_reference, tmp_path):
    address, client, _ = cluster
    p = create_tiny(tmp_path / "project")
    r = p.doit("nightly", "--dask", address, env={"MODEL_EXPORT_REMOTE_CACHE": str(tmp_path / "share")})
    assert f"dask: steps run on the cluster at {address} (8 lanes)" in r.stderr
    assert p.artifact_digests() == tiny_reference.artifact_digests()
    records = _steps(p)
    assert set(records) == TINY_STEPS and all(rec["status"] == "built" for rec in records.values())
    assert {rec["worker"] for rec in records.values()} == _workers(client)  # both workers ran steps
    _assert_memory_limited(records)
    nightly = json.loads((p.root / "artifacts" / "nightly.json").read_text())
    assert nightly["non_reproducible"] == []
    assert f"nightly: 0 reproducible, 0 not reproducible, {len(TINY_STEPS)} new to the cache" in r.stdout
    # the planner wrote each step's log from what its worker sent back
    log = (p.root / ".export" / "logs" / "convert_coreml__student.prefill.T16.log").read_text()
    assert "MIL" in log and "model-export-step-" not in log


def test_nightly_on_the_cluster_with_s3_then_plain_builds_use_it(cluster, tiny_reference, tmp_path, s3_env, s3_server):
    import s3fs

    address, client, _ = cluster
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing", skip_instance_cache=True)
    fs.mkdir("dask-nightly")
    env = {"MODEL_EXPORT_REMOTE_CACHE": "s3://dask-nightly/team/cache", **s3_env}
    p = create_tiny(tmp_path / "project")
    p.doit("nightly", "--dask", address, env=env)
    assert p.artifact_digests() == tiny_reference.artifact_digests()
    records = _steps(p)
    assert {rec["worker"] for rec in records.values()} == _workers(client)
    _assert_memory_limited(records)
    assert fs.find("dask-nightly/team/cache/ac")  # published to S3
    # The config may name the scheduler instead of the command line; an up-to-date build submits nothing.
    text = (p.root / "pyproject.toml").read_text()
    (p.root / "pyproject.toml").write_text(text + f'\n[tool.export.dask]\nscheduler = "{address}"\nlanes = 3\n')
    r = p.doit(env=env)
    assert "(3 lanes)" in r.stderr
    assert p.ran() == set() and p.restored() == set()
    # Another machine, no cluster, an empty local cache: everything comes from S3.
    q = create_tiny(tmp_path / "other")
    q.doit(env={**env, "MODEL_EXPORT_CACHE": str(tmp_path / "other-local")})
    assert q.ran() == set()
    assert q.artifact_digests() == tiny_reference.artifact_digests()


def test_a_step_no_worker_can_hold_fails_at_once(cluster, tmp_path):
    import torch

    from export import checkpoint

    address, _, _ = cluster
    p = Project.create(tmp_path / "project")
    # ~135 MB of weights: exporting it reserves 400 + 2 x 135 MB (export/stepdefs.py), more than any worker's 600 MB
    config, model = checkpoint.demo_model("student", dict(vocab_size=32000, d_model=512, n_layers=1, n_heads=8,
                                                          n_kv_heads=2, ffn_hidden=512, max_positions=64))
    torch.manual_seed(0)
    checkpoint.save(p.root / "checkpoints" / "student.pt", "student", config, model.state_dict())
    r = subprocess.run([sys.executable, "-m", "doit", "--dask", address, "export_pytorch:student.prefill.T16"],
                       cwd=p.root, env=p.env({"MODEL_EXPORT_REMOTE_CACHE": str(tmp_path / "share")}),
                       capture_output=True, text=True, timeout=300)  # a step left waiting would hang here
    assert r.returncode != 0
    err = r.stdout + r.stderr
    # the address came from the flag, and the error says so (not pyproject.toml)
    assert "doit --dask: ADDRESS: export_pytorch:student.prefill.T16 needs" in err, err
    assert f"the largest Dask worker at {address} holds {WORKER_MB} MB (MEMORY_MB)" in err
    assert "Traceback" not in err


def _executing(dask_worker):
    return os.getpid(), [str(ts.key) for ts in dask_worker.state.executing]


def test_a_worker_killed_during_a_conversion_is_replaced_and_the_step_runs_again(cluster, reference, tmp_path):
    address, client, scratch = cluster
    p = Project.create(tmp_path / "project")
    build = subprocess.Popen([sys.executable, "-m", "doit", "--dask", address, "convert_coreml:T16"], cwd=p.root,
                             env=p.env({"MODEL_EXPORT_REMOTE_CACHE": str(tmp_path / "share")}),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = None
    deadline = time.monotonic() + 600
    while victim is None and build.poll() is None and time.monotonic() < deadline:
        for log in scratch.glob("model-export-step-convert_coreml__*/.step.log"):
            try:
                converting = "Converting PyTorch Frontend" in log.read_text(errors="replace")
            except OSError:
                continue
            if converting:  # a conversion is under way in coremltools: find its worker
                task = log.parent.name[len("model-export-step-"):].rsplit("-", 1)[0].replace("__", ":")
                for addr, (pid, keys) in client.run(_executing).items():
                    if any(k.startswith(task + "-") for k in keys):
                        victim = (addr, pid, task)
                break
        time.sleep(0.2)
    assert victim is not None, "no conversion was seen running"
    addr, pid, task = victim
    name = str(client.scheduler_info(n_workers=-1)["workers"][addr]["name"])
    assert name in NAMES
    os.kill(pid, signal.SIGKILL)  # the worker process itself: no finally of its own runs
    out, _ = build.communicate(timeout=900)
    assert build.returncode == 0, out
    built = p.artifact_digests()
    leaves = ("student/coreml/prefill_T16", "student/coreml/decode_T16", "judge/coreml/prefill_T16")
    assert all(f"{leaf}.mlpackage.manifest.json" in built for leaf in leaves)
    assert built == {k: v for k, v in reference.artifact_digests().items() if k in built}
    records = _steps(p)
    assert records[task]["status"] == "built"  # ran again (maybe on the worker the nanny restarted, same name)
    assert records[task]["worker"] in NAMES and records[task]["lost_workers"] == [name]  # by --name, not address
    # one line for the lost worker, one for the step's retry; for each step the worker held (one may have been
    # assigned to it, waiting for its MEMORY_MB, and never started there)
    lost = [line for line in out.splitlines() if line.startswith("dask: worker ")]
    again = [line for line in out.splitlines() if " runs again on worker " in line]
    held = [n for n, rec in records.items() if rec.get("lost_workers")]
    assert task in held and len(lost) == len(again) == len(held), out
    for n in held:
        assert records[n]["lost_workers"] == [name]
        assert f"dask: worker {name} was lost while it held {n}; the scheduler runs the step again on another worker" \
            in lost, out
        assert f"dask: {n} runs again on worker {records[n]['worker']} (attempt 2, after 1 lost worker)" in again, out
    assert "tcp://" not in json.dumps(_steps(p))
    # the killed worker's scratch folder was removed by the next step (the retry's sweep): TMPDIR is clean
    assert not list(scratch.glob("model-export-step-*")) and not list(scratch.glob(".model-export-new-*")), \
        sorted(q.name for q in scratch.iterdir())
    client.wait_for_workers(2, timeout=120)  # the nanny replaced the dead worker


def test_workers_refuse_steps_of_other_code(cluster, tmp_path):
    address, _, _ = cluster
    p = Project.create(tmp_path / "project")
    atomic = p.root / "export" / "atomic.py"
    atomic.write_text(atomic.read_text() + "\n# a local edit the workers do not have\n")
    r = p.doit("--dask", address, "checkpoint", env={"MODEL_EXPORT_REMOTE_CACHE": str(tmp_path / "share")},
               check=False)
    assert r.returncode != 0
    assert "checkpoint:judge: this Dask worker runs other checkpoint code than the planner" in r.stdout + r.stderr
    assert not (p.root / "artifacts" / "judge" / "checkpoint.pt").exists()


def test_a_cluster_build_needs_a_shared_cache(cluster, tmp_path):
    address, _, _ = cluster
    p = Project.create(tmp_path / "project")
    r = p.doit("--dask", address, "checkpoint", check=False)
    assert r.returncode != 0
    assert "pyproject.toml: tool.export.cache.remote: steps on the Dask cluster" in r.stdout + r.stderr


def test_an_unreachable_scheduler_is_one_clear_error(tmp_path):
    p = Project.create(tmp_path / "project")
    r = p.doit("--dask", "tcp://127.0.0.1:1", check=False)
    assert r.returncode == 2
    assert "error: doit --dask: ADDRESS: cannot reach the Dask scheduler at tcp://127.0.0.1:1" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (p.root / "artifacts" / "last_build.json").exists()
    r = p.doit("--dask", "not-an-address", check=False)
    assert r.returncode == 2 and "expected tcp://host:port" in r.stderr


@pytest.mark.slow
def test_a_recipe_build_on_the_cluster_gives_a_local_builds_bytes(cluster, tmp_path):
    """compress_coreml and the recipe's bundle on the Dask path (prefill and decode); then a local nightly of the
    same project against the same store rebuilds every step and finds the cluster's bytes (issue #17). Both
    builds are of the recipe's bundle and what it needs (7 steps): the float bundle and the verifications are
    steps the other cluster tests run."""
    from scenario import RECIPES_TOML, export_head, model_toml, project_toml

    address, client, scratch = cluster
    env = {"MODEL_EXPORT_REMOTE_CACHE": str(tmp_path / "share")}
    p = Project.create(tmp_path / "project")
    p.set_shape_sets({"one": {"prefill": [16], "decode": [16]}})
    (p.root / "pyproject.toml").write_text(project_toml(export_head() + RECIPES_TOML + model_toml(
        "student", "student", "checkpoints/student.pt", "one", coreml='{ minimum_deployment_target = "iOS18" }',
        recipes='["lut4"]')))
    fresh = p.copy(tmp_path / "local")
    p.doit("--dask", address, "bundle_coreml:student.lut4", env=env)
    records = json.loads((p.root / "artifacts" / "last_build.json").read_text())["tasks"]
    recipe = {"compress_coreml:student.prefill.T16.lut4", "compress_coreml:student.decode.T16.lut4",
              "bundle_coreml:student.lut4"}
    assert {n for n, r in records.items() if r["status"] == "built"} == recipe | {
        f"{step}:student.{mode}.T16" for step in ("export_pytorch", "convert_coreml") for mode in ("prefill", "decode")}
    assert all(records[n]["worker"] in NAMES for n in recipe)  # they ran on the cluster
    art = p.root / "artifacts" / "student"
    for mode, positions in (("prefill", 4 * 16), ("decode", 16)):
        q = json.loads((art / "coreml" / f"{mode}_T16.lut4.quality.json").read_text())
        assert records[f"compress_coreml:student.{mode}.T16.lut4"]["quality"] == q
        assert "interpreter" in q["method"] and q["positions"] == positions and 0 < q["mean_abs_err"]
        assert 0.5 < q["top1_agreement"] <= 1 and q["size_bytes"] < q["float_size_bytes"]
    assert (art / "student.lut4.mlpackage" / "Manifest.json").is_file()
    assert not list(scratch.glob("model-export-step-*"))
    # the same project built here, every step again, against the store the cluster filled
    fresh.doit("nightly", "bundle_coreml:student.lut4", env={**env, "MODEL_EXPORT_CACHE": str(tmp_path / "local-cache")})
    nightly = json.loads((fresh.root / "artifacts" / "nightly.json").read_text())
    assert nightly["non_reproducible"] == []
    assert all(nightly["tasks"][n]["reproducible"] is True for n in recipe)
    assert fresh.artifact_digests() == p.artifact_digests()


@pytest.mark.slow
def test_a_parted_build_on_the_cluster_gives_a_local_builds_bytes(cluster, parted_built, tmp_path):
    """A parted model (tests/test_parts.py's: a 4-layer student in chunks of 2 layers and a split head part) built
    on the cluster: each part's export gets the checkpoint shipped with its inputs and reads its own tensors; its
    conversion and verification the tensors its .pt2 refers to. The artifacts are the local build's bytes.

    Of the 25 steps, the cluster builds the 14 that hold every kind of part and of step: the first chunk's
    prefill leaf (the embeddings), the middle chunk whole (both modes, its bundle and the bundle's check), the
    head's prefill leaf (the split logits); the rest are the same steps on other tensors."""
    address, _, scratch = cluster
    p = parted_built.fresh(tmp_path / "project")
    targets = ("verify_coreml:student.prefill.T16.chunk0", "verify_coreml:student.chunk1",
               "verify_coreml:student.prefill.T16.head")
    p.doit("--dask", address, *targets, env={"MODEL_EXPORT_REMOTE_CACHE": str(tmp_path / "share")})
    records = _steps(p)
    parts = {n for n in records if n.endswith((".chunk0", ".chunk1", ".head"))}
    leaves = ["prefill.T16.chunk0", "prefill.T16.chunk1", "decode.T16.chunk1", "prefill.T16.head"]
    assert parts == ({f"{step}:student.{leaf}" for step in ("export_pytorch", "convert_coreml", "verify_coreml")
                      for leaf in leaves} | {"bundle_coreml:student.chunk1", "verify_coreml:student.chunk1"})
    assert {n.split(":")[0] for n in parts} == {"export_pytorch", "convert_coreml", "verify_coreml", "bundle_coreml"}
    assert all(records[n]["status"] == "built" and records[n]["worker"] in NAMES for n in parts)
    built, local = p.artifact_digests(), parted_built.artifact_digests()
    assert {"student/chunk0/coreml/prefill_T16.mlpackage.manifest.json", "student/head/coreml/prefill_T16.mlpackage.manifest.json",
            "student/chunk1/student.chunk1.mlpackage/Manifest.json"} <= set(built), sorted(built)
    assert built == {k: v for k, v in local.items() if k in built}
    assert not list(scratch.glob("model-export-step-*"))


def test_a_killed_step_s_scratch_folder_is_removed_by_the_next_one(tmp_path):
    """The scratch folder of a process SIGKILLed during its step stays locked only while that process lives:
    the next step's sweep removes it, and leaves a running step's folder and any folder not made by a step."""
    import textwrap

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    code = textwrap.dedent("""
        import sys, time
        from export.runner.cluster import make_scratch
        path, lock = make_scratch("convert_coreml:student.prefill.T16")
        print(path, flush=True)
        time.sleep(600)
    """)
    victim = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    dead = Path(victim.stdout.readline().strip())
    (dead / "artifacts").mkdir()
    (dead / "artifacts" / "half-written.bin").write_bytes(b"x" * 1000)
    os.environ["TMPDIR"], saved = str(tmp_path), os.environ.get("TMPDIR")
    import tempfile

    tempfile.tempdir = None
    try:
        from export.runner.cluster import make_scratch, sweep_scratch

        assert sweep_scratch() == []  # its step runs: locked
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        victim.stdout.close()
        alive, lock = make_scratch("checkpoint:judge")  # this process's own running step
        user = tmp_path / "model-export-step-mine"  # not a step's (no mark): never touched
        user.mkdir()
        assert sweep_scratch() == [str(dead)]
        assert not dead.exists() and Path(alive).is_dir() and user.is_dir()
        os.close(lock)
    finally:
        if saved is None:
            os.environ.pop("TMPDIR")
        else:
            os.environ["TMPDIR"] = saved
        tempfile.tempdir = None
