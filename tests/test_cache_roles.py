"""Cache entries keyed by content and role, not by where outputs land (issue #20).

An action key holds its inputs by role (``role`` in export/planner/tasks.py: the path under the artifacts folder,
whatever that folder is), a manifest names each output by role, and a restore writes them where this
checkout's config puts them. So changing ``artifacts`` restores every step, and two checkouts with
different ``artifacts`` settings share one cache without deleting each other's entries."""
from __future__ import annotations

from faults import TINY_TOML, create_tiny
from scenario import judge_toml, project_toml

STEPS = {"checkpoint:judge", "export_pytorch:student.prefill.T16", "export_pytorch:judge.prefill.T16",
         "convert_coreml:student.prefill.T16", "convert_coreml:judge.prefill.T16", "bundle_coreml:student",
         "bundle_coreml:judge", "verify_coreml:student.prefill.T16", "verify_coreml:judge.prefill.T16",
         "verify_coreml:student", "verify_coreml:judge"}


def _config(p, artifacts: str) -> None:
    text = TINY_TOML.replace('shape_set = "tiny"', 'shape_set = "tiny"\nmodes = ["prefill"]') + judge_toml("tiny")
    text = text.replace('artifacts = "artifacts"', f'artifacts = "{artifacts}"')
    (p.root / "pyproject.toml").write_text(project_toml(text, name="roles"))


def _status(p, artifacts: str, status: str) -> set[str]:
    import json

    tasks = json.loads((p.root / artifacts / "last_build.json").read_text())["tasks"]
    return {n for n, t in tasks.items() if t["status"] == status}


def _digests(p, artifacts: str) -> dict[str, str]:
    from faults import file_digests

    return {rel: d for rel, d in file_digests(p.root / artifacts).items() if "/" in rel}  # the models' files


def test_other_artifacts_folders_restore_every_step_and_drop_nothing(tmp_path):
    cache = tmp_path / "cache"
    env = {"MODEL_EXPORT_CACHE": str(cache)}
    a = create_tiny(tmp_path / "a")
    _config(a, "artifacts")
    a.doit(env=env)
    assert a.ran() >= STEPS
    reference = _digests(a, "artifacts")
    entries = sorted(q.name for q in (cache / "ac").rglob("*") if q.is_file())

    # a second checkout sharing the cache, with its artifacts elsewhere: every step restored
    b = create_tiny(tmp_path / "b")
    _config(b, "build")
    r = b.doit(env=env)
    assert _status(b, "build", "built") <= {"prune_artifacts"} and _status(b, "build", "restored") == STEPS, r.stdout
    assert "dropped" not in r.stderr and "warning" not in r.stderr, r.stderr
    assert _digests(b, "build") == reference

    # the first checkout moves its artifacts: restored too; and back again
    _config(a, "out/models")
    r = a.doit(env=env)
    assert _status(a, "out/models", "built") <= {"prune_artifacts"} and _status(a, "out/models", "restored") == STEPS, \
        r.stdout + r.stderr
    assert "dropped" not in r.stderr, r.stderr
    assert _digests(a, "out/models") == reference
    r = b.doit(env=env)  # the other checkout still finds everything
    assert _status(b, "build", "built") == set() and "dropped" not in r.stderr

    assert sorted(q.name for q in (cache / "ac").rglob("*") if q.is_file()) == entries, "an entry was deleted"
