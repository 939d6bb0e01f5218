"""The shared store on a real S3 server other than moto: SeaweedFS (``weed mini``, started by the
session fixture on 127.0.0.1). It answers a create-only put of an existing key with 412 and no
<Condition> element, so s3fs raises a plain OSError there (issue #20); moto sends the element.

Publish, restore into a fresh checkout, two writers of the same entry, a corrupt blob repaired in
the store, and an outage followed by the late upload."""
from __future__ import annotations

import os
import socket
import threading

import pytest

from export.cache import Cache
from export.cache.store import STORE_RETRIES
from export.digest import file_digest, tree_digest
from test_cache import OUTS, fresh_bucket, make_outputs, remote_cache, spawn_put, start

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def store(seaweedfs, monkeypatch, request):
    """A fresh bucket on the SeaweedFS server; the endpoint and keys in the environment."""
    return fresh_bucket(seaweedfs, monkeypatch, request, "sw-")


def test_publish_then_restore_into_a_fresh_checkout(store, tmp_path):
    url, fs, _ = store
    a = make_outputs(tmp_path / "a")
    machine_a, logs_a = remote_cache(tmp_path / "local_a", url)
    machine_a.put("k1", a, OUTS, {"task": "t"})
    assert machine_a.uploaded == 1 and logs_a == []
    keys = fs.find(url)
    assert len([k for k in keys if "/cas/" in k]) == 3 and len([k for k in keys if "/ac/" in k]) == 1

    fresh, logs_b = remote_cache(tmp_path / "local_b", url)
    got = fresh.get("k1", tmp_path / "b", OUTS)
    assert got == {"art/m.pt": file_digest(a / "art/m.pt"), "art/m.mlpackage": tree_digest(a / "art/m.mlpackage")}
    assert tree_digest(tmp_path / "b/art/m.mlpackage") == got["art/m.mlpackage"] and logs_b == []


def test_publishing_an_entry_already_there_is_no_warning(store, tmp_path):
    """SeaweedFS answers the second create-only put with a bare 412: the entry is there, all is well."""
    url, fs, _ = store
    a = make_outputs(tmp_path / "a")
    first, _ = remote_cache(tmp_path / "local_a", url)
    first.put("k1", a, OUTS, {"task": "first"})
    manifest = f"{url}/ac/k1/k1"
    before = fs.cat_file(manifest)
    second, logs = remote_cache(tmp_path / "local_b", url)
    second.put("k1", a, OUTS, {"task": "second"})
    assert logs == [], logs
    assert fs.cat_file(manifest) == before and second.pending() == []
    with pytest.raises(OSError, match="pre-conditions"):  # what the server really sends: not FileExistsError
        fs.pipe_file(manifest, b"{}", mode="create")


def test_two_writers_of_the_same_entry(store, tmp_path):
    url, fs, env = store
    roots = [make_outputs(tmp_path / n) for n in ("a1", "a2")]
    weights = os.urandom(4 << 20)
    for r in roots:
        (r / "art/m.mlpackage/Data/weights/weight.bin").write_bytes(weights)
    procs = [spawn_put(tmp_path / f"local{i}", r, "k1", "ok", {**env, "REMOTE": url}) for i, r in enumerate(roots)]
    start(*procs, together=True)
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "", out + err  # no warning from either writer
    reader, logs = remote_cache(tmp_path / "local_c", url)
    assert reader.get("k1", tmp_path / "c", OUTS)["art/m.mlpackage"] == tree_digest(roots[0] / "art/m.mlpackage")
    assert logs == []


def test_a_corrupt_blob_is_replaced_by_its_good_bytes(store, tmp_path):
    url, fs, _ = store
    a = make_outputs(tmp_path / "a")
    remote_cache(tmp_path / "local_a", url)[0].put("k1", a, OUTS, {})
    digest = file_digest(a / "art/m.pt")
    remote_blob = f"{url}/cas/{digest[:2]}/{digest}"
    fs.pipe_file(remote_blob, b"b" * 5000)  # same size, wrong bytes

    machine_b, logs = remote_cache(tmp_path / "local_b", url)
    assert machine_b.get("k1", tmp_path / "b", OUTS) is None  # caught: a miss, the step runs again
    assert any("does not match" in line for line in logs), logs
    machine_b.put("k1", a, OUTS, {"task": "rebuilt"})  # the rebuild publishes the same bytes
    assert fs.cat_file(remote_blob) == (a / "art/m.pt").read_bytes(), "the bad object is still in the store"
    assert any("replaced by its good bytes" in line for line in logs), logs

    machine_c, logs_c = remote_cache(tmp_path / "local_c", url)
    assert machine_c.get("k1", tmp_path / "c", OUTS) is not None and logs_c == []


class DeadStore:
    """A TCP server on 127.0.0.1 that accepts each connection and closes it at once (a store that is down),
    counting the connections: how often the cache tries it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.sock.close()


def test_an_outage_then_the_late_upload(store, tmp_path, monkeypatch):
    """The store unreachable: one warning, tried by the first request only (a few attempts: a build does not
    wait on a dead store again and again), entries published locally and marked; the next build that reaches
    the store uploads them."""
    url, fs, env = store
    dead = DeadStore()
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead.url)
    a = make_outputs(tmp_path / "a")
    b = make_outputs(tmp_path / "b", seed=b"b")
    down, logs = remote_cache(tmp_path / "local", url)
    assert down.get("k1", tmp_path / "x", OUTS) is None
    first = dead.connections
    # the first request's connections, each tried STORE_RETRIES times by s3fs and once by botocore (8 measured);
    # their default retries with backoff (5 x 5 attempts) made a build wait about 10 s here
    assert 1 <= first <= 6 * STORE_RETRIES, first
    down.put("k1", a, OUTS, {})
    down.put("k2", b, OUTS, {})
    assert down.get("k3", tmp_path / "y", OUTS) is None
    assert dead.connections == first, "the cache tried the dead store again"
    dead.close()
    assert len(logs) == 1 and logs[0].startswith("warning: remote cache unavailable") and "not tried again" in logs[0]
    assert down.pending() == ["k1", "k2"] and down.uploaded == 0

    monkeypatch.setenv("AWS_ENDPOINT_URL", env["AWS_ENDPOINT_URL"])  # the store is back
    up, logs_up = remote_cache(tmp_path / "local", url)
    assert up.upload_pending() == 2 and up.pending() == [] and logs_up == []
    fresh, _ = remote_cache(tmp_path / "elsewhere", url)
    assert fresh.get("k2", tmp_path / "z", OUTS)["art/m.pt"] == file_digest(b / "art/m.pt")


def test_the_cache_settings_reach_seaweedfs_from_the_environment(store, tmp_path, monkeypatch):
    url, fs, _ = store
    monkeypatch.setenv("MODEL_EXPORT_REMOTE_CACHE", url)
    logs = []
    cache = Cache.from_settings(local=tmp_path / "local", remote=None, log=logs.append)
    cache.put("k1", make_outputs(tmp_path / "a"), OUTS, {})
    assert cache.stats()["remote"]["entries"] == 1 and logs == []


# --- through the real doit ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    from faults import TINY_TOML, create_tiny
    from scenario import project_toml

    p = create_tiny(tmp_path_factory.mktemp("sw-doit") / "template")
    text = TINY_TOML.replace('shape_set = "tiny"', 'shape_set = "tiny"\nmodes = ["prefill"]')
    (p.root / "pyproject.toml").write_text(project_toml(text, name="seaweedfs"))
    return p


def _entries(fs, url) -> int:
    fs.invalidate_cache()
    return len([k for k in fs.find(url) if "/ac/" in k])


# The tiny project's steps: export, convert, verify the package, bundle, verify the bundle.
STEPS_RUN = 5


@pytest.mark.slow  # four real builds: in CI's slow step
def test_doit_publishes_restores_and_uploads_late_on_seaweedfs(tiny_project, store, tmp_path):
    url, fs, env = store
    remote = {**env, "MODEL_EXPORT_REMOTE_CACHE": url}
    a = tiny_project.copy(tmp_path / "a")
    r = a.doit(env=remote)
    assert "warning" not in r.stderr, r.stderr
    assert f"{STEPS_RUN} entries to the shared store" in r.stdout, r.stdout
    assert _entries(fs, url) == STEPS_RUN

    # a fresh checkout with an empty local cache restores every step from the store
    fresh = tiny_project.copy(tmp_path / "fresh")
    fresh.doit(env={**remote, "MODEL_EXPORT_CACHE": str(tmp_path / "fresh-cache")})
    assert fresh.ran() <= {"prune_artifacts"} and len(fresh.restored()) == STEPS_RUN
    assert fresh.artifact_digests() == a.artifact_digests()

    # an outage: one warning, entries kept locally; the next build that uses the store uploads them
    fs.rm(url, recursive=True)
    down = tiny_project.copy(tmp_path / "down")
    r = down.doit(env={**remote, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert [ln for ln in r.stderr.splitlines() if "warning" in ln] == [
        next(ln for ln in r.stderr.splitlines() if ln.startswith("warning: remote cache unavailable"))], r.stderr
    assert _entries(fs, url) == 0
    (down.root / "artifacts/student/student.mlpackage.manifest.json").unlink()  # something for the next build to do
    r = down.doit(env=remote)
    assert f"remote cache: uploaded {STEPS_RUN} entries" in r.stderr, r.stderr
    assert _entries(fs, url) == STEPS_RUN
