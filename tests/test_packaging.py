"""What a device install pulls in: the runtime wheels, and edgekit's own wheel."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest

from edgekit.deploy.wheelhouse import runtime_requirements
from tests.test_arm64 import arm64_wheels  # noqa: F401  (the session fixture)

# Build-time only: none of them may reach a device (`pip install edgekit`). huggingface-hub is not
# among them: tokenizers itself depends on it.
BUILD_ONLY = {"torch", "transformers", "onnxruntime-genai", "onnx", "onnx-ir", "safetensors"}


def test_the_device_requirements_hold_no_build_dependency() -> None:
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in runtime_requirements()}
    assert "onnxruntime" in names and not names & BUILD_ONLY, names


@pytest.mark.slow
def test_the_device_wheelhouse_holds_no_build_dependency_and_no_fixtures(wheels: Path) -> None:
    """The wheels `edgekit wheelhouse` collects for a device: no torch, transformers or model builder,
    and edgekit's own wheel without the torch-only test fixtures."""
    names = {"-".join(w.name.split("-")[:1]).lower().replace("_", "-") for w in wheels.glob("*.whl")}
    assert {"edgekit", "onnxruntime", "tokenizers", "paho-mqtt"} <= names and not names & BUILD_ONLY, names
    (edgekit_wheel,) = wheels.glob("edgekit-*.whl")
    packaged = zipfile.ZipFile(edgekit_wheel).namelist()
    assert "edgekit/serve/daemon.py" in packaged and "edgekit/mqtt/protocol.py" in packaged
    assert not [name for name in packaged if name.startswith("edgekit/fixtures/")]
    # An x86-64 device's edgekit carries the Int4Layout op's library (it needs libc alone, no Python ABI).
    assert edgekit_wheel.name.endswith("-py3-none-linux_x86_64.whl"), edgekit_wheel.name
    assert "edgekit/kernels/libedgekit_int4.so" in packaged


@pytest.mark.slow
def test_an_aarch64_wheelhouse_carries_a_pure_python_edgekit(arm64_wheels: Path) -> None:  # noqa: F811
    """Built on x86 for a Pi: no x86 library, a wheel any platform installs (the lane installs it)."""
    (edgekit_wheel,) = arm64_wheels.glob("edgekit-*.whl")
    assert edgekit_wheel.name.endswith("-py3-none-any.whl"), edgekit_wheel.name
    assert not [name for name in zipfile.ZipFile(edgekit_wheel).namelist() if name.endswith(".so")]
