"""The programs a worker process exported, kept for their conversion (as long as the worker lives:
one build, or one lane of ``doit -n 2``)."""
from __future__ import annotations

from collections import OrderedDict

# A worker that exports and later converts the same programs keeps them: converting one then needs no
# torch.export.load of the file it wrote. Bounded by the programs' file sizes (an overestimate: an fp32
# program shares its weights with the loaded checkpoint).
KEEP_PROGRAMS_BYTES = 2 << 30


class Programs:
    """ExportedPrograms by the digest of the bytes they were saved as, the oldest dropped past ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self._kept: OrderedDict[str, tuple[object, int]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._kept)

    def keep(self, digest: str, program, size: int) -> None:
        self._kept[digest] = (program, size)
        while self._kept and sum(n for _, n in self._kept.values()) > self.limit:
            self._kept.popitem(last=False)

    def clear(self) -> None:
        """Forget every kept program (export/runner/checkpoints.py: before the worker loads another checkpoint
        or part, whose weights the kept programs would otherwise keep alive beside the new ones)."""
        self._kept.clear()

    def take(self, digest: str):
        """The kept program whose saved bytes have ``digest`` (then forgotten), or None."""
        entry = self._kept.pop(digest, None)
        return None if entry is None else entry[0]


PROGRAMS = Programs(KEEP_PROGRAMS_BYTES)
