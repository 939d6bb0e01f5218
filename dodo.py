"""The build: `doit` rebuilds what changed; `doit list` shows every task.

Thin on purpose: the graph lives in export/tasks.py, the config in
pyproject.toml ([tool.export]) and shape_sets.json. Loading it imports no
torch or coremltools.
"""
import sys

from export.planner import noop

noop.fast_path(__file__, sys.argv)  # nothing changed since the last build: say so and stop here

from export.planner import tasks  # noqa: E402
from export.planner.tasks import (  # noqa: E402,F401  (doit finds task_* here)
    task_bundle_coreml, task_checkpoint, task_compress_coreml, task_convert_coreml, task_export_onnx, task_export_pytorch,
    task_prune_artifacts, task_verify_coreml)

DOIT_CONFIG = tasks.setup(__file__, sys.argv)
