"""The shared store: a second folder as a remote directory, and S3 on a real moto server (127.0.0.1)."""
from __future__ import annotations

import json
import os

import pytest

from export.cache.store import Cache
from export.digest import file_digest, tree_digest
from test_cache import OUTS, fresh_bucket, make_outputs, new_cache, remote_cache, spawn_put, start

# --- a directory as the remote store -------------------------------------------


def test_read_through_from_a_remote_directory(tmp_path):
    remote = tmp_path / "share"
    a = make_outputs(tmp_path / "a")
    machine_a, logs_a = new_cache(tmp_path / "local_a", remote=str(remote))
    machine_a.put("k1", a, OUTS, {"task": "t", "seconds": 2.0})
    assert (remote / "ac/k1/k1").is_file() and len(list((remote / "cas").rglob("*/*"))) == 3
    assert not list((remote / "tmp").iterdir()), "uploads are renamed into place"

    machine_b, logs_b = new_cache(tmp_path / "local_b", remote=f"file://{remote}")
    got = machine_b.get("k1", tmp_path / "b", OUTS)
    assert got == {"art/m.pt": file_digest(a / "art/m.pt"), "art/m.mlpackage": tree_digest(a / "art/m.mlpackage")}
    assert got["art/m.mlpackage"] == tree_digest(tmp_path / "b/art/m.mlpackage")
    assert logs_a == logs_b == [] and machine_b.hits == 1
    # read-through: the entry is now local too, and serves without the remote
    assert machine_b.stats()["entries"] == 1 and machine_b.stats()["remote"]["entries"] == 1
    offline, _ = new_cache(tmp_path / "local_b")
    assert offline.get("k1", tmp_path / "c", OUTS) == got


def test_read_only_publishes_nothing_remotely(tmp_path):
    remote = tmp_path / "share"
    cache, logs = new_cache(tmp_path / "local", remote=str(remote), read_only=True)
    cache.put("k1", make_outputs(tmp_path / "a"), OUTS, {"task": "t"})
    assert not remote.exists() and cache.stats()["entries"] == 1 and logs == []


def test_corrupt_remote_blob_is_refused_and_the_remote_entry_dropped(tmp_path):
    remote = tmp_path / "share"
    a = make_outputs(tmp_path / "a")
    new_cache(tmp_path / "local_a", remote=str(remote))[0].put("k1", a, OUTS, {})
    bad = next(p for p in (remote / "cas").rglob("*") if p.is_file() and p.stat().st_size == 5000)
    os.chmod(bad, 0o644)
    bad.write_bytes(b"b" * 5000)
    machine_b, logs = new_cache(tmp_path / "local_b", remote=str(remote))
    assert machine_b.get("k1", tmp_path / "b", OUTS) is None
    assert len(logs) == 1 and "does not match" in logs[0] and machine_b.corrupt == 1
    assert not (remote / "ac/k1/k1").exists() and machine_b.stats()["entries"] == 0
    assert not (tmp_path / "b").exists()


def test_escaping_remote_manifest_is_refused(tmp_path):
    remote = tmp_path / "share"
    new_cache(tmp_path / "local_a", remote=str(remote))[0].put("k1", make_outputs(tmp_path / "a"), OUTS, {})
    m = remote / "ac/k1/k1"
    data = json.loads(m.read_text())
    data["outputs"]["../../escaped"] = data["outputs"].pop("art/m.pt")
    m.write_text(json.dumps(data))
    reader, logs = new_cache(tmp_path / "local_b", remote=str(remote), read_only=True)
    assert reader.get("k1", tmp_path / "b", OUTS) is None
    assert len(logs) == 1 and "skipped" in logs[0]
    assert m.exists(), "a read-only client never deletes remotely"
    assert not list(tmp_path.rglob("escaped")) and reader.stats()["entries"] == 0


def test_unwritable_remote_warns_and_publishes_locally(tmp_path):
    (tmp_path / "file").write_text("")
    cache, logs = new_cache(tmp_path / "local", remote=str(tmp_path / "file/share"))
    cache.put("k1", make_outputs(tmp_path / "a"), OUTS, {})
    assert len(logs) == 1 and logs[0].startswith("warning: remote cache not writable")
    assert cache.published == 1 and cache.get("k1", tmp_path / "b", OUTS) is not None


def test_concurrent_publishing_to_a_remote_directory(tmp_path):
    roots = [make_outputs(tmp_path / n) for n in ("a1", "a2")]
    weights = os.urandom(8 << 20)
    for r in roots:
        (r / "art/m.mlpackage/Data/weights/weight.bin").write_bytes(weights)
    env = {"REMOTE": str(tmp_path / "share")}
    procs = [spawn_put(tmp_path / f"local{i}", r, "k1", "ok", env) for i, r in enumerate(roots)]
    start(*procs, together=True)
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and out.strip() == "", err
    reader, logs = new_cache(tmp_path / "local_c", remote=str(tmp_path / "share"))
    assert reader.get("k1", tmp_path / "c", OUTS)["art/m.mlpackage"] == tree_digest(roots[0] / "art/m.mlpackage")
    assert logs == []


# --- S3 on a real moto server ---------------------------------------------------------


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """A fresh bucket; the endpoint and dummy keys in the environment, as a developer would set them."""
    return fresh_bucket(s3_server, monkeypatch, request, "cache-")


def test_s3_put_then_read_through(s3, tmp_path):
    url, fs, _ = s3
    a = make_outputs(tmp_path / "a")
    machine_a, logs_a = remote_cache(tmp_path / "local_a", url)
    machine_a.put("k1", a, OUTS, {"task": "t"})
    keys = fs.find(url)
    assert len([k for k in keys if "/cache/cas/" in k]) == 3 and len([k for k in keys if "/cache/ac/" in k]) == 1
    assert not [k for k in keys if "/tmp/" in k]

    machine_b, logs_b = remote_cache(tmp_path / "local_b", url)
    got = machine_b.get("k1", tmp_path / "b", OUTS)
    assert got == {"art/m.pt": file_digest(a / "art/m.pt"), "art/m.mlpackage": tree_digest(a / "art/m.mlpackage")}
    assert logs_a == logs_b == [] and machine_b.stats()["remote"] == {"entries": 1, "blobs": 3,
                                                                      "bytes": machine_a.stats()["bytes"]}


def test_s3_writes_are_create_only(s3, tmp_path):
    url, fs, _ = s3
    a = make_outputs(tmp_path / "a")
    first, _ = remote_cache(tmp_path / "local_a", url)
    first.put("k1", a, OUTS, {"task": "first"})
    manifest = f"{url}/ac/k1/k1"
    before = fs.cat_file(manifest)
    second, logs = remote_cache(tmp_path / "local_b", url)
    second.put("k1", a, OUTS, {"task": "second"})  # publishes the same entry: succeeds, leaves it alone
    assert logs == [] and second.published == 1
    assert fs.cat_file(manifest) == before and json.loads(before)["producer"]["task"] == "first"
    with pytest.raises(FileExistsError):  # the server refuses an overwrite (If-None-Match: *)
        fs.pipe_file(manifest, b"{}", mode="create")


def test_s3_concurrent_publishing_from_two_processes(s3, tmp_path):
    url, fs, env = s3
    roots = [make_outputs(tmp_path / n) for n in ("a1", "a2")]
    weights = os.urandom(4 << 20)
    for r in roots:
        (r / "art/m.mlpackage/Data/weights/weight.bin").write_bytes(weights)
    procs = [spawn_put(tmp_path / f"local{i}", r, "k1", "ok", {**env, "REMOTE": url})
             for i, r in enumerate(roots)]
    start(*procs, together=True)
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and out.strip() == "", err
    reader, logs = remote_cache(tmp_path / "local_c", url)
    assert reader.get("k1", tmp_path / "c", OUTS)["art/m.mlpackage"] == tree_digest(roots[0] / "art/m.mlpackage")
    assert logs == []


def test_s3_read_only_publishes_nothing(s3, tmp_path, monkeypatch):
    url, fs, _ = s3
    monkeypatch.setenv("MODEL_EXPORT_CACHE_READ_ONLY", "1")
    monkeypatch.setenv("MODEL_EXPORT_REMOTE_CACHE", url)
    logs = []
    cache = Cache.from_settings(local=tmp_path / "local", remote=None, log=logs.append)
    assert cache.read_only and cache.remote_url == url
    cache.put("k1", make_outputs(tmp_path / "a"), OUTS, {})
    assert fs.find(url) == [] and cache.stats()["entries"] == 1 and logs == []


def test_s3_unreachable_is_a_miss_with_one_warning(tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cache, logs = new_cache(tmp_path / "local", remote="s3://nowhere/x", storage_options={
        "endpoint_url": "http://127.0.0.1:9", "skip_instance_cache": True,
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}})
    assert cache.get("k1", tmp_path / "b", OUTS) is None
    assert cache.get("k2", tmp_path / "b", OUTS) is None
    assert len(logs) == 1 and logs[0].startswith("warning: remote cache unavailable")
