"""The build: `doit` rebuilds what changed; `doit list` shows every task.

Thin on purpose: the graph lives in export/tasks.py, the config in
pyproject.toml ([tool.export]) and shape_sets.json. Loading it imports no
torch or coremltools.
"""
import sys

from export.planner import tasks
from export.planner.tasks import (  # noqa: F401  (doit finds task_* here)
    task_bundle_coreml, task_checkpoint, task_compress_coreml, task_convert_coreml, task_export_onnx, task_export_pytorch,
    task_prune_artifacts)

DOIT_CONFIG = tasks.setup(__file__, sys.argv)
