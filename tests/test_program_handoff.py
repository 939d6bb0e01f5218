"""A worker converts the ExportedProgram it exported without loading the file again
(export.runner.steps), and the package is the same bytes the seed's two CLIs make (exporting as the build
does, the .pt2 referring to the checkpoint's weights: export/program_weights.py)."""
from __future__ import annotations

import subprocess
import sys

from export.digest import tree_digest
from scenario import Project, project_toml, student_toml


def test_conversions_reuse_the_exported_program_and_give_the_cli_bytes(tmp_path):
    p = Project.create(tmp_path / "project")
    (p.root / "pyproject.toml").write_text(project_toml(student_toml("tiny")))
    p.doit()
    logs = sorted((p.root / ".export" / "logs").glob("convert_coreml__*.log"))
    assert len(logs) == 4
    for log in logs:
        assert "still in memory (not loaded again)" in log.read_text(), log.name

    cli = tmp_path / "cli"
    ck = p.root / "checkpoints" / "student.pt"
    for mode in ("prefill", "decode"):
        subprocess.run([sys.executable, "-m", "export.export_pytorch", "--checkpoint", str(ck), "--out", str(cli),
                        "--mode", mode, "--enumerated-T", "32", "--format", "exported_program", "--external-weights"],
                       check=True)
        subprocess.run([sys.executable, "-m", "export.convert_coreml", "--backend", "pytorch",
                        "--in", str(cli / f"{mode}_T32.pt2"), "--out", str(cli / f"{mode}_T32.mlpackage"),
                        "--contract", str(cli / f"{mode}_T32.contract.json"), "--weights", str(ck)],
                       check=True, capture_output=True)
        built = p.root / "artifacts" / "student" / "coreml" / f"{mode}_T32.mlpackage"
        assert tree_digest(cli / f"{mode}_T32.mlpackage") == tree_digest(built)
