"""The heavy steps, one module each, as the worker runs them (torch and coremltools load here).

Each module's ``run`` takes plain arguments (paths as strings) and writes its
outputs atomically; the planner digests them afterwards. A step's code key is
the import closure of its module (export/codekey.py), so each module imports
only what its step runs.
"""
