"""Byte-stable ``.mlpackage`` folders.

coremltools writes packages that differ from run to run: ``Manifest.json``
holds random UUIDs, ``model.mlmodel`` protobuf maps serialize in per-process
order, and ``conversion_date`` metadata is today's date. ``canonicalize``
rewrites all three from the content:

- user metadata is set (``metadata``) and the conversion date removed, unless
  ``SOURCE_DATE_EPOCH`` is set (then it is that day, as reproducible builds do);
- ``model.mlmodel`` is re-serialized with ``deterministic=True``;
- every Manifest identifier is a UUID derived from the item's path and bytes.
"""
from __future__ import annotations

import datetime
import json
import os
import uuid
from pathlib import Path

from ..digest import bytes_digest, file_digest, tree_digest

METADATA_PREFIX = "model_export."  # our keys in a package's user metadata

DATE_KEY = "com.github.apple.coremltools.conversion_date"
MANIFEST = "Manifest.json"


def model_file(package: Path | str) -> Path:
    return Path(package) / "Data" / "com.apple.CoreML" / "model.mlmodel"


def read_spec(package: Path | str):
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(model_file(package).read_bytes())
    return spec


MODEL_METADATA_FIELDS = {"author": "author", "license": "license", "version": "versionString",
                         "short_description": "shortDescription"}  # config key -> the spec's metadata field


def set_model_metadata(spec, fields: dict[str, str]) -> None:
    """Set the package's own metadata fields (``[tool.export.models.metadata]``: author, license, version,
    short_description) on ``spec``. Plain strings: the bytes stay a function of the config."""
    for key, value in fields.items():
        setattr(spec.description.metadata, MODEL_METADATA_FIELDS[key], value)


def _conversion_date() -> str | None:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return None
    return datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).date().isoformat()


def canonicalize(package: Path | str, metadata: dict[str, str], spec=None) -> None:
    """Rewrite ``package`` in place so its bytes depend on its content only; set ``metadata``.

    ``spec``: the model spec to write (default: the package's own ``model.mlmodel``).
    """
    package = Path(package)
    spec = read_spec(package) if spec is None else spec
    user = spec.description.metadata.userDefined
    user.pop(DATE_KEY, None)
    date = _conversion_date()
    if date:
        user[DATE_KEY] = date
    for key, value in metadata.items():
        user[key] = value
    model_file(package).write_bytes(spec.SerializeToString(deterministic=True))
    _canonical_manifest(package)


def _canonical_manifest(package: Path) -> None:
    path = package / MANIFEST
    manifest = json.loads(path.read_text())
    old_root = manifest.get("rootModelIdentifier")
    entries = {}
    root = None
    for old_id, item in manifest["itemInfoEntries"].items():
        item_path = package / "Data" / item["path"]
        content = tree_digest(item_path) if item_path.is_dir() else file_digest(item_path)
        new_id = str(uuid.UUID(bytes_digest(f"{item['path']}\0{content}".encode()), version=4)).upper()
        entries[new_id] = item
        if old_id == old_root:
            root = new_id
    manifest["itemInfoEntries"] = entries
    if root is not None:
        manifest["rootModelIdentifier"] = root
    path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def package_digest(package: Path | str) -> str:
    """The content digest of a package folder (sorted relative paths and file digests)."""
    return tree_digest(package)
