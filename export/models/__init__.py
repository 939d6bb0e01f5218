"""Architectures: ``registry.get(name)`` returns an ``Architecture`` (see ``spec.py``).

Importing this package imports nothing: task generation reads ``export.models.names``
without torch, and a step's code key (export/codekey.py) follows only what it imports.
"""
