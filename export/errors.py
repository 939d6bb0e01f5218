"""The project's one error type: every user-facing failure names its file and field."""
from __future__ import annotations

import sys
from contextlib import contextmanager


class ExportError(Exception):
    """A user-facing error. ``str()`` reads ``<file>: <field>: <message>``."""

    def __init__(self, message: str, *, file: object = None, field: str | None = None):
        self.message = message
        self.file = None if file is None else str(file)
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.field) if p]
        return ": ".join(parts + [self.message])


@contextmanager
def cli_errors():
    """Run a CLI body: an ExportError becomes one line on stderr and exit 2."""
    try:
        yield
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
