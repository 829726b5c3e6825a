"""What machine this is, as a benchmark or a quality check records it: CPU model and flags, cores,
ONNX Runtime's version, and edgekit's own version and commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from edgekit import __version__


def cpu() -> dict[str, Any]:
    """The CPU's model name and feature flags from /proc/cpuinfo (x86 "model name"/"flags", arm64
    "CPU implementer"/"CPU part"/"Features"), and the core count."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or fields.get("Model") or fields.get("Hardware")
    if not model and "CPU part" in fields:
        model = f"implementer {fields.get('CPU implementer', '?')} part {fields['CPU part']}"
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    return {"model": model or platform.processor() or platform.machine(), "arch": platform.machine(),
            "flags": sorted(flags), "cores": os.cpu_count()}


def commit() -> str | None:
    """The git commit of the edgekit source in use, when it runs from a checkout (None otherwise)."""
    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():
        return None
    done = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def facts(threads: int | None) -> dict[str, Any]:
    """Everything a figure needs beside it to be compared later (as llama-bench records)."""
    import onnxruntime

    return {"edgekit": __version__, "commit": commit(), "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "kernel": platform.release(), "cpu": cpu(), "threads": threads}
