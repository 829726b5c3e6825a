"""A wheelhouse: edgekit's runtime wheels for a device's platform, for devices without internet.

``pip download --platform`` fetches binary wheels for another architecture from this machine, so a
workstation can prepare an aarch64 device's runtime. edgekit's own wheel is built from the source
checkout when there is one (the version being developed), else downloaded like the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from edgekit import __version__
from edgekit.errors import EdgekitError
from edgekit.kernels.build import NATIVE_ENV

# manylinux tags a 64-bit Linux device with glibc 2.28+ (Raspberry Pi OS bookworm, Ubuntu 20.04+) runs.
_GLIBC = ("2_17", "2_24", "2_27", "2_28", "2_31", "2_34", "2_35")


def runtime_requirements() -> list[str]:
    """edgekit's device dependencies (no extras: no torch, no transformers)."""
    return [r for r in metadata.requires("edgekit") or [] if "extra ==" not in r]


def platform_tags(machine: str) -> list[str]:
    """pip ``--platform`` values for a 64-bit Linux ``machine`` (``aarch64`` or ``x86_64``)."""
    if machine not in ("aarch64", "x86_64"):
        raise EdgekitError(f"no runtime wheels for {machine!r}: devices must be aarch64 or x86_64 (64-bit)")
    return [f"manylinux_{glibc}_{machine}" for glibc in _GLIBC] + [f"manylinux2014_{machine}", "linux_" + machine]


def build(out: Path, machine: str, python: str) -> list[Path]:
    """Fill ``out`` with every wheel the runtime needs on ``machine`` with CPython ``python`` (e.g. ``3.11``)."""
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    source = Path(__file__).resolve().parents[2]
    if (source / "pyproject.toml").is_file():
        # The build hook compiles the Int4Layout op's library for this machine where it is x86-64
        # (kernels/build.py decides): an x86-64 device's wheel carries it, any other device's wheel is
        # pure Python (its bundles run ONNX Runtime's own kernels).
        env = None if machine == "x86_64" else {**os.environ, NATIVE_ENV: "0"}
        _pip([*pip, "wheel", "--no-deps", "-q", "-w", str(out), str(source)], "building edgekit's wheel", env)
    else:
        _pip([*pip, "download", "--no-deps", "-q", "-d", str(out), f"edgekit=={__version__}"], "downloading edgekit")
    platforms = [arg for tag in platform_tags(machine) for arg in ("--platform", tag)]
    _pip([*pip, "download", "-q", "--only-binary=:all:", *platforms, "--python-version", python, "--implementation", "cp",
          "-d", str(out), *runtime_requirements()], f"downloading runtime wheels for {machine}, Python {python}")
    return sorted(out.glob("*.whl"))


def _pip(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise EdgekitError(f"{what} failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
