"""Nothing lost (issue #20): prune_artifacts removes only outputs the build itself wrote.

A real project with files of its own in every folder under artifacts/ (the seed's layout kept
hand exports beside the built ones) goes through builds, config changes that drop leaves and a
whole model, and a killed build; the user's files keep their digests to the end, and every
removal is printed by path.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

from faults import create_tiny, file_digests, kill_group, no_traceback, popen_doit
from scenario import export_head, judge_toml, model_toml, project_toml

SETS = {"two": {"prefill": [16, 32]}, "one": {"prefill": [16]}, "judge": {"prefill": [16]}}


def _config(p, *, student_set="two", precision="fp16", judge=True):
    text = export_head() + model_toml("student", "student", "checkpoints/student.pt", student_set, modes='["prefill"]',
                                      coreml=f'{{ compute_precision = "{precision}" }}') + (judge_toml() if judge else "")
    (p.root / "pyproject.toml").write_text(project_toml(text, name="prune"))


def _user_files(art: Path, tag: str) -> None:
    """A file of the user's in every folder under artifacts/ that is not itself a build output (a package)."""
    folders = [art, *(d for d in art.rglob("*") if d.is_dir() and not any(
        part.endswith(".mlpackage") for part in d.relative_to(art).parts))]
    for d in folders:
        (d / f"mine-{tag}.txt").write_text(f"the user's own file in {d.name} ({tag})\n")
    (art / "student" / "exported" / f"judge_fp16-{tag}.pt").write_bytes(b"a hand export " + tag.encode())
    (art / "student" / "coreml" / f"hand-{tag}.mlpackage").mkdir(exist_ok=True)
    (art / "student" / "coreml" / f"hand-{tag}.mlpackage" / "Manifest.json").write_text("{}")
    (art / "student" / "coreml" / f".notes-{tag}.tmp").write_text("a dot file of the user's")


def _mine(art: Path) -> dict[str, str]:
    return {rel: d for rel, d in file_digests(art).items() if "mine-" in rel or "hand" in rel
            or "judge_fp16-" in rel or ".notes-" in rel}


def test_user_files_survive_builds_config_changes_and_kills(tmp_path):
    p = create_tiny(tmp_path / "project")
    p.set_shape_sets(SETS)
    _config(p)
    art = p.root / "artifacts"
    for d in ("student/exported", "student/coreml", "judge/exported", "elsewhere"):
        (art / d).mkdir(parents=True)
    _user_files(art, "before")
    p.doit()
    _user_files(art, "after")  # now in every folder the build made too
    mine = _mine(art)
    assert len(mine) >= 14, sorted(mine)

    # a leaf dropped: its outputs, and only them, are removed, each by path
    t32 = ["artifacts/student/exported/prefill_T32.pt2", "artifacts/student/exported/prefill_T32.contract.json",
           "artifacts/student/coreml/prefill_T32.mlpackage", "artifacts/student/coreml/prefill_T32.mlpackage.manifest.json"]
    _config(p, student_set="one")
    r = p.doit()
    for rel in t32:
        assert not (p.root / rel).exists()
        assert f"prune_artifacts: removed {rel} " in r.stderr, r.stdout + r.stderr
    assert _mine(art) == mine

    # a model dropped; one of its outputs edited by the user first: that one is left alone, and said so
    (art / "judge" / "contract.json").chmod(0o644)
    (art / "judge" / "contract.json").write_text('{"edited": "by the user"}')
    _config(p, student_set="one", judge=False)
    r = p.doit()
    assert not (art / "judge" / "judge.mlpackage").exists() and not (art / "judge" / "checkpoint.pt").exists()
    assert "prune_artifacts: removed artifacts/judge/judge.mlpackage " in r.stderr
    assert "left artifacts/judge/contract.json alone" in r.stderr, r.stdout + r.stderr
    assert (art / "judge" / "contract.json").read_text() == '{"edited": "by the user"}'
    assert _mine(art) == mine

    # a build killed while it converts, then the config it was building dropped again; then built
    _config(p, student_set="two", precision="fp32", judge=True)
    proc = popen_doit(p)
    log = p.root / ".export/logs/convert_coreml__student.prefill.T16.log"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (log.exists() and log.stat().st_mtime > time.time() - 60
                                                                        and "prefill_T16" in log.read_text(errors="replace")):
        time.sleep(0.01)
    time.sleep(0.5)
    kill_group(proc, signal.SIGKILL)
    proc.communicate(timeout=60)
    _config(p, student_set="one", precision="fp32", judge=False)
    r = p.doit(check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    no_traceback(r)
    _config(p, student_set="one", precision="fp32", judge=True)
    p.doit()
    assert _mine(art) == mine
    leftovers = [q for q in art.rglob(".*") if ".notes-" not in q.name]
    assert not leftovers, leftovers
    built = {q.relative_to(art).as_posix() for q in art.glob("*/*") if "mine-" not in q.name and "hand" not in q.name}
    assert "student/exported" in built and "judge/judge.mlpackage" in built
    assert not (art / "student/exported/prefill_T32.pt2").exists()
