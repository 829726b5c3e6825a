"""Bundle manifests: what a bundle is, what built it, and every file's size and sha256.

Device-side code verifies bundles with this module too, so it imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekit.errors import BundleDamaged, EdgekitError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # written by edgekit.signing; not listed in the manifest it signs
_UNLISTED = (MANIFEST, SIGNATURE)
_CHUNK = 4 * 1024**2


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB weights don't fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(folder: Path) -> list[dict[str, Any]]:
    """Size and sha256 of every file under ``folder`` except the manifest and its signature, sorted by path."""
    entries = []
    for path in sorted(_listable(folder)):
        entries.append({"path": path.relative_to(folder).as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def write_manifest(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` with ``fields`` plus the format version and the file list."""
    manifest = {"format_version": FORMAT_VERSION, **fields, "files": file_entries(folder)}
    manifest["size_bytes"] = sum(f["size"] for f in manifest["files"])
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """The bundle's manifest, checked for a format this version understands."""
    path = folder / MANIFEST
    if not path.is_file():
        raise EdgekitError(f"{folder}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EdgekitError(f"{path}: not valid JSON ({exc})") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EdgekitError(f"{path}: bundle format version {version!r}; this edgekit reads version {FORMAT_VERSION}")
    return manifest


def _listable(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in _UNLISTED]


def bundle_id(folder: Path) -> str:
    """``<name>-<first 12 hex of the manifest's sha256>``: the folder name a device keeps this bundle under."""
    return f"{read_manifest(folder)['name']}-{sha256_file(folder / MANIFEST)[:12]}"


def verify(folder: Path, trusted_keys: Sequence[Path] = ()) -> dict[str, Any]:
    """Check every file listed in the manifest (size, then sha256); refuse missing or extra files.

    With ``trusted_keys``, the manifest must also carry a valid signature by one of them.
    """
    manifest = read_manifest(folder)
    if trusted_keys:
        from edgekit import signing  # cryptography is only loaded where signatures are checked

        signing.check(folder, list(trusted_keys))
    listed = {entry["path"]: entry for entry in manifest["files"]}
    present = {p.relative_to(folder).as_posix() for p in _listable(folder)}
    if missing := sorted(set(listed) - present):
        raise BundleDamaged(f"{folder}: incomplete bundle, missing {', '.join(missing)}")
    if extra := sorted(present - set(listed)):
        raise BundleDamaged(f"{folder}: files not in the manifest: {', '.join(extra)}")
    for name, entry in listed.items():
        path = folder / name
        if path.stat().st_size != entry["size"]:
            raise BundleDamaged(f"{path}: size {path.stat().st_size} differs from the manifest's {entry['size']} (truncated or tampered)")
        if sha256_file(path) != entry["sha256"]:
            raise BundleDamaged(f"{path}: sha256 differs from the manifest (corrupted or tampered)")
    return manifest
