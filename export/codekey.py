"""A step's code key: the source of every package module its code can run, found from the imports.

The closure starts at the step's module (export/stepdefs.py names it) and follows
every ``import`` of this package it finds in the source (module level and inside
functions alike: a lazy import runs too), read with ``ast``: nothing is imported,
so the planner never loads torch or coremltools for this. A package's
``__init__`` counts for every module below it (importing runs it). Adding an
import to a step's code is all it takes for the key to follow it; a module no
step reaches keys nothing.

The architecture modules of export/models/ (student, judge, ...) are imported by
name, one at a time, by the registry (export/models/registry.py): a step that runs
model code holds its leaf's own architecture module, and no other, so editing the
judge's code does not rebuild the student.

Each file's digest and import list are kept by file stat (in the stat cache's
database when one is given), so a no-op build parses nothing. See
docs/architecture.md, "Keys".
"""
from __future__ import annotations

import ast
import json
import os
import sqlite3
from functools import lru_cache
from pathlib import Path

from .digest import StatCache, bytes_digest
from .models.names import module_name
from .stepdefs import STEPS

PACKAGE = Path(__file__).resolve().parent  # the package that runs is the package that is keyed
NAME = __name__.split(".")[0]


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Module name -> source file of every module of the package."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for f in filenames:
            if f.endswith(".py"):
                rel = Path(dirpath, f).relative_to(root).with_suffix("")
                parts = [NAME, *rel.parts]
                if parts[-1] == "__init__":
                    parts.pop()
                out[".".join(parts)] = Path(dirpath, f)
    return out


def imports_of(module: str, source: bytes, is_package: bool) -> list[str]:
    """The absolute names that ``module``'s source imports, or may import (``from X import a``: X and X.a)."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return sorted(n for n in found if n == NAME or n.startswith(NAME + "."))


class _Index:
    """Per-file (digest, imports), read again only when a file's stat changed."""

    def __init__(self, stat: StatCache | None):
        self.stat = stat
        self.memo: dict[str, tuple[str, str, list[str]]] = {}

    def _db(self):
        db = self.stat.connection() if self.stat is not None else None
        if db is not None:
            try:
                db.execute("CREATE TABLE IF NOT EXISTS modules (path TEXT PRIMARY KEY, stat TEXT, digest TEXT, imports TEXT)")
            except sqlite3.Error:
                return None
        return db

    def get(self, module: str, path: Path) -> tuple[str, list[str]]:
        st = os.stat(path)
        key = StatCache.stat_key(st)
        hit = self.memo.get(str(path))
        if hit and hit[0] == key:
            return hit[1], hit[2]
        db = self._db()
        row = None
        if db is not None:
            try:
                row = db.execute("SELECT digest, imports FROM modules WHERE path=? AND stat=?", (str(path), key)).fetchone()
            except sqlite3.Error:
                row = None
        if row:
            digest, imports = row[0], json.loads(row[1])
        else:
            source = path.read_bytes()
            digest = bytes_digest(source)
            imports = imports_of(module, source, path.name == "__init__.py")
            if db is not None and not StatCache.racy(st):
                try:
                    db.execute("INSERT OR REPLACE INTO modules VALUES (?,?,?,?)",
                               (str(path), key, digest, json.dumps(imports)))
                except sqlite3.Error:
                    pass
        self.memo[str(path)] = (key, digest, imports)
        return digest, imports


def closure(start: str, arch: str | None = None, *, index: _Index | None = None,
            root: Path = PACKAGE, modules: dict[str, Path] | None = None) -> dict[str, str]:
    """Relative source path -> digest of every module of the package at ``root`` that ``start`` can run
    (for ``arch``: the registry imports the architecture's module by name, export/models/registry.py)."""
    modules = modules if modules is not None else _modules(root)
    index = index or _Index(None)
    own = f"{NAME}.models.{module_name(arch)}" if arch else None
    seen: set[str] = set()
    todo = [start] + ([own] if own else [])
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # the packages above it run first
        todo.extend(index.get(name, modules[name])[1])
    return {modules[m].relative_to(root).as_posix(): index.get(m, modules[m])[0] for m in sorted(seen)}


def digest_of(files: dict[str, str]) -> str:
    return bytes_digest(json.dumps(files, sort_keys=True).encode())


class CodeKeys:
    """The code keys of one build: ``files(step, arch)`` and ``digest(step, arch)``, computed once each."""

    def __init__(self, stat: StatCache | None = None, root: Path = PACKAGE, index: _Index | None = None):
        self.root = root
        self._index = index or _Index(stat)
        self._modules = _modules(root)
        self.files = lru_cache(maxsize=None)(self._files)
        self.digest = lru_cache(maxsize=None)(self._digest)

    def _files(self, step: str, arch: str | None = None) -> dict[str, str]:
        record = STEPS[step]
        return closure(record.module, arch if record.runs_model_code else None, index=self._index,
                       root=self.root, modules=self._modules)

    def _digest(self, step: str, arch: str | None = None) -> str:
        return digest_of(self.files(step, arch))


@lru_cache(maxsize=None)
def code_digest(step: str, arch: str | None = None) -> str:
    """The code key of ``step`` (for ``arch``), computed without a stat cache (a Dask worker's check)."""
    return CodeKeys().digest(step, arch)

