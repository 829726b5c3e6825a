"""The daemon's quality gate: the bundle's check on this device's kernels, cached between starts.

A result is kept per bundle (the manifest's sha256, which covers every file's), CPU (model and
feature flags: they choose ONNX Runtime's kernels), ONNX Runtime version and thread count, so a
restart or a systemd restart loop does not pay for it again; a new bundle, an upgraded runtime or
another board does. The figures are cached, not the verdict: a changed config still decides afresh
whether to serve below the gate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from edgekit.bundle import MANIFEST, Manifest
from edgekit.runtime import quality_check
from edgekit.runtime.engine import Engine
from edgekit.runtime.machine import cpu
from edgekit.runtime.quality_check import DeviceQuality

log = logging.getLogger("edgekit.serve")


def cache_folder(configured: Path | None) -> Path:
    """The folder for cached results: the config's, else systemd's CacheDirectory, else ~/.cache/edgekit."""
    if configured is not None:
        return configured
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekit"


def cache_key(bundle: Path, threads: int, int4_kernel: str | None = None) -> str:
    """What the figures depend on, hashed: bundle content, CPU, ONNX Runtime version, threads, and the
    Int4Layout kernel where the engine runs one."""
    import onnxruntime

    machine = cpu()
    parts = [hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest(), str(machine["model"]), machine["arch"],
             " ".join(machine["flags"]), onnxruntime.__version__, str(threads), int4_kernel or ""]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def measure(bundle: Path, manifest: Manifest, engine: Engine, cache: Path | None,
            tick: Callable[[], object] | None = None) -> DeviceQuality | None:
    """The check's figures for ``bundle`` on this device, judged by the bundle's gate: from the cache
    when this device measured them before, else measured now (and cached). None for a bundle that
    ships no reference (built before edgekit shipped them)."""
    reference = quality_check.Reference.read(bundle)
    if reference is None:
        return None
    folder = cache_folder(cache)
    entry = folder / f"quality-{cache_key(bundle, engine.threads, engine.int4_kernel)}.json"
    try:
        cached = DeviceQuality.from_dict(json.loads(entry.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        cached = None
    if cached is not None:
        # The verdict is the gate's, now: the figures are what was cached.
        return replace(quality_check.judge(cached, manifest.profile.quality), cached=True)
    result = quality_check.run(engine, reference, manifest.profile.quality, tick)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.partial")
        tmp.write_text(json.dumps(result.to_dict()) + "\n")
        tmp.replace(entry)
    except OSError as exc:
        # Only the next start's time is lost.
        log.warning("cannot cache the quality check in %s (%s); it runs again at the next start", folder, exc.strerror)
    return result
