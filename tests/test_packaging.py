"""What a device install pulls in: the runtime wheels, and edgekit's own wheel."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest

from edgekit.deploy.wheelhouse import runtime_requirements

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
