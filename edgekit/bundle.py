"""Bundles: the typed manifest (what a bundle is, what built it, every file's size and sha256) and
the check that a folder's files match it.

Devices verify bundles with this module too, so it imports nothing heavy. Whether a bundle is
*trusted* (signed) is :mod:`edgekit.signing`'s question; this module only checks files.

Format policy (``format_version`` 1):

- A reader accepts fields it does not know and keeps them (:attr:`Manifest.extra`): later builds add
  fields within version 1, and a device must serve a bundle from a newer build that only adds some.
- A change that older readers would misread raises ``format_version``; a reader refuses any version
  newer than its own, naming both.
- ``manifest.sig`` signs the manifest file's exact bytes, so nothing rewrites a manifest it has read:
  a manifest is written once, by the build (or by a test making a bundle).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgekit.errors import BundleDamaged, EdgekitError
from edgekit.profiles import DeviceProfile, parse_profile
from edgekit.validation import Fields, read_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # written by edgekit.signing; not listed in the manifest it signs
_UNLISTED = (MANIFEST, SIGNATURE)
_CHUNK = 4 * 1024**2


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle, by its path inside the bundle folder."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelInfo:
    """The checkpoint the bundle was built from."""

    id: str  # a Hugging Face id, or the local folder the build was given
    revision: str | None
    architecture: str
    hidden_size: int
    layers: int
    text_only: bool
    mtp_included: bool


@dataclass(frozen=True)
class Recipe:
    """How the weights and the runtime were set up for the device."""

    precision: str
    execution_provider: str
    context_length: int
    threads: int
    kv_cache: str
    builder_options: dict[str, str]
    # How many matmuls the bundle's Int4Layout graphs run on edgekit's op (0: the bundle has none).
    int4_layout_nodes: int = 0


@dataclass(frozen=True)
class QualityReport:
    """How closely the export followed the fp32 PyTorch reference, and whether it passed the gate."""

    prompts: int
    positions: int
    top1_agreement: float
    mean_kl: float
    max_kl: float
    greedy_match: bool
    checked_on: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class VisionInfo:
    """The bundle's vision encoder (``vision.onnx``): its precision, the largest image the device
    takes, and how closely it follows transformers in fp32, alone and inside image+text prompts."""

    precision: str
    max_pixels: int
    preprocessor: str  # "checkpoint" (its preprocessor_config.json) or "defaults" (transformers' Qwen3-VL values)
    encoder_min_cosine: float
    encoder_max_relative_error: float
    encoder_passed: bool
    encoder_reason: str
    image_prompts: QualityReport


@dataclass(frozen=True)
class Manifest:
    """A bundle's ``manifest.json``."""

    name: str
    model: ModelInfo
    profile: DeviceProfile
    recipe: Recipe
    estimated_ram: dict[str, int]  # bytes by component, and "total"
    quality: QualityReport
    tools: dict[str, str | None]  # versions of what built it
    built_at: str
    build_seconds: float
    timings: dict[str, float]
    vision: VisionInfo | None = None  # None: a text-only bundle
    files: tuple[FileEntry, ...] = ()
    format_version: int = FORMAT_VERSION
    # Fields this reader does not know (a newer build's), kept as read.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def estimated_ram_total(self) -> int:
        return self.estimated_ram["total"]

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON data, in the file's field order."""
        data: dict[str, Any] = {"format_version": self.format_version, **self.extra}
        for f in fields(self):
            if f.name not in ("format_version", "extra", "files"):
                value = getattr(self, f.name)
                data[f.name] = value.to_dict() if isinstance(value, DeviceProfile) else _plain(value)
        data["files"] = [asdict(entry) for entry in self.files]
        data["size_bytes"] = self.size_bytes
        return data

    def write(self, folder: Path) -> Manifest:
        """Write ``manifest.json`` for ``folder``'s files as they are now; return the manifest written."""
        if self.format_version != FORMAT_VERSION:
            raise EdgekitError(f"this edgekit writes bundle format {FORMAT_VERSION}, not {self.format_version}")
        written = replace(self, files=tuple(file_entries(folder)))
        (folder / MANIFEST).write_text(json.dumps(written.to_dict(), indent=2) + "\n")
        return written

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """The bundle's manifest, checked for a format this version understands and for every field's type."""
        path = folder / MANIFEST
        return cls.from_dict(read_json(path, f"{folder}: not a bundle (no {MANIFEST})"), str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Manifest:
        """Validate manifest data; errors name ``where`` and the field."""
        top = Fields(data, where)
        version = top.get("format_version", int, "an integer (the bundle format version)")
        if version > FORMAT_VERSION:
            raise EdgekitError(f"{where}: bundle format version {version} is newer than this edgekit reads "
                               f"({FORMAT_VERSION}): upgrade edgekit on this machine")
        if version < 1:
            raise EdgekitError(f"{where}: field 'format_version' must be 1 or more (got {version})")
        model, recipe, quality = top.nested("model"), top.nested("recipe"), top.nested("quality")
        profile_data = top.get("profile", dict, "a mapping (the device profile)")
        files = top.get("files", list, "a list of {path, size, sha256}")
        vision = top.get("vision", dict, "a mapping (the vision encoder) or null", None)
        entries = []
        for i, item in enumerate(files):
            entry = Fields(item, where, f"files[{i}].")
            entries.append(FileEntry(path=entry.get("path", str, "a relative path"),
                                     size=entry.number("size", 0, 2**63, integer=True),
                                     sha256=entry.get("sha256", str, "64 hex digits")))
        manifest = cls(
            name=top.get("name", str, "a string"),
            model=ModelInfo(
                id=model.get("id", str, "a string"),
                revision=model.get("revision", str, "a string or null", None),
                architecture=model.get("architecture", str, "a string"),
                hidden_size=model.number("hidden_size", 1, 2**31, integer=True),
                layers=model.number("layers", 1, 2**31, integer=True),
                text_only=model.get("text_only", bool, "true or false"),
                mtp_included=model.get("mtp_included", bool, "true or false"),
            ),
            profile=replace(parse_profile(profile_data, f"{where}: profile", strict=False), path=str(profile_data.get("path", ""))),
            recipe=Recipe(
                precision=recipe.get("precision", str, "a string"),
                execution_provider=recipe.get("execution_provider", str, "a string"),
                context_length=recipe.number("context_length", 1, 2**31, integer=True),
                threads=recipe.number("threads", 1, 4096, integer=True),
                kv_cache=recipe.get("kv_cache", str, "a string"),
                builder_options=_str_map(recipe, "builder_options", str),
                int4_layout_nodes=recipe.number("int4_layout_nodes", 0, 2**31, integer=True, default=0),
            ),
            estimated_ram=_str_map(top, "estimated_ram", int),
            quality=_quality(quality),
            tools=_str_map(top, "tools", (str, type(None))),
            built_at=top.get("built_at", str, "an ISO 8601 time"),
            build_seconds=float(top.number("build_seconds", 0, float("inf"))),
            timings={k: float(v) for k, v in _str_map(top, "timings", (int, float)).items()},
            vision=_vision(Fields(vision, where, "vision.")) if vision is not None else None,
            files=tuple(entries),
            format_version=version,
        )
        if "total" not in manifest.estimated_ram:
            raise EdgekitError(f"{where}: field 'estimated_ram.total' must be an integer (missing)")
        top.get("size_bytes", int, "an integer", None)  # derived from the files; checked, not kept
        return replace(manifest, extra={k: v for k, v in data.items() if k not in top.used})


def _quality(quality: Fields) -> QualityReport:
    return QualityReport(
        prompts=quality.number("prompts", 0, 2**31, integer=True),
        positions=quality.number("positions", 0, 2**31, integer=True),
        top1_agreement=float(quality.number("top1_agreement", 0, 1)),
        mean_kl=float(quality.number("mean_kl", 0, float("inf"))),
        max_kl=float(quality.number("max_kl", 0, float("inf"))),
        greedy_match=quality.get("greedy_match", bool, "true or false"),
        checked_on=quality.get("checked_on", str, "a string"),
        passed=quality.get("passed", bool, "true or false"),
        reason=quality.get("reason", str, "a string"),
    )


def _vision(vision: Fields) -> VisionInfo:
    return VisionInfo(
        precision=vision.get("precision", str, "a string"),
        max_pixels=vision.number("max_pixels", 1, 2**31, integer=True),
        preprocessor=vision.get("preprocessor", str, "a string"),
        encoder_min_cosine=float(vision.number("encoder_min_cosine", -1, 1)),
        encoder_max_relative_error=float(vision.number("encoder_max_relative_error", 0, float("inf"))),
        encoder_passed=vision.get("encoder_passed", bool, "true or false"),
        encoder_reason=vision.get("encoder_reason", str, "a string"),
        image_prompts=_quality(vision.nested("image_prompts")),
    )


def _str_map(parent: Fields, key: str, kind: type | tuple[type, ...]) -> dict[str, Any]:
    """A mapping of string keys to values of ``kind``; the error names the entry."""
    value = parent.get(key, dict, "a mapping")
    for name, item in value.items():
        if not isinstance(item, kind) or (isinstance(item, bool) and kind is not bool):
            raise EdgekitError(f"{parent.where}: field '{parent.prefix}{key}.{name}' has the wrong type (got {item!r})")
    return dict(value)


def _plain(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB weights don't fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(folder: Path) -> list[FileEntry]:
    """Size and sha256 of every file under ``folder`` except the manifest and its signature, sorted by path."""
    return [FileEntry(path.relative_to(folder).as_posix(), path.stat().st_size, sha256_file(path))
            for path in sorted(_listable(folder))]


def _listable(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() not in _UNLISTED]


def bundle_id(folder: Path, manifest: Manifest | None = None) -> str:
    """``<name>-<first 12 hex of the manifest file's sha256>``: the folder name a device keeps this bundle under."""
    name = (manifest or Manifest.read(folder)).name
    return f"{name}-{sha256_file(folder / MANIFEST)[:12]}"


def verify(folder: Path) -> Manifest:
    """Check every file listed in the manifest (size, then sha256); refuse missing or extra files.

    This says the files are the ones the manifest lists, not who made them: signatures are
    :func:`edgekit.signing.verify`'s.
    """
    manifest = Manifest.read(folder)
    listed = {entry.path: entry for entry in manifest.files}
    present = {p.relative_to(folder).as_posix() for p in _listable(folder)}
    if missing := sorted(set(listed) - present):
        raise BundleDamaged(f"{folder}: incomplete bundle, missing {', '.join(missing)}")
    if extra := sorted(present - set(listed)):
        raise BundleDamaged(f"{folder}: files not in the manifest: {', '.join(extra)}")
    for name, entry in listed.items():
        path = folder / name
        if path.stat().st_size != entry.size:
            raise BundleDamaged(f"{path}: size {path.stat().st_size} differs from the manifest's {entry.size} (truncated or tampered)")
        if sha256_file(path) != entry.sha256:
            raise BundleDamaged(f"{path}: sha256 differs from the manifest (corrupted or tampered)")
    return manifest
