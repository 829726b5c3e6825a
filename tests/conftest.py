"""Shared fixtures: random-weight Qwen3.5 checkpoints and bundles built from them, once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgekit.build.pipeline import BuildRequest, build
from edgekit.fixtures.checkpoint import write_checkpoint
from edgekit.profiles import Quality, load_profile

# Random weights cannot meet real-model quality thresholds (their logits are near-flat, so top-1
# among 248k tokens is a coin toss); the KL bound still separates sound exports from broken ones.
RANDOM_WEIGHT_GATE = Quality(min_top1_agreement=0.0, max_mean_kl=0.2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3.5 checkpoint with an MTP head, as real checkpoints have."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3.5-tiny", "tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint_no_mtp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3.5-tiny-nomtp", "tiny", seed=1, mtp=False)


@pytest.fixture(scope="session")
def host_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An int4 bundle of the tiny checkpoint for this machine; treat as read-only (copy to modify)."""
    request = BuildRequest(profile=load_profile("host"), model=str(tiny_checkpoint),
                           output=tmp_path_factory.mktemp("dist"), quality=RANDOM_WEIGHT_GATE)
    return build(request).path


@pytest.fixture(scope="session")
def fp32_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    profile = load_profile(str(write_profile(tmp_path_factory.mktemp("prof"), "fp32-host", precision="fp32")))
    request = BuildRequest(profile=profile, model=str(tiny_checkpoint), output=tmp_path_factory.mktemp("dist"))
    return build(request).path


def write_profile(folder: Path, name: str, **quantization: object) -> Path:
    """A user profile file based on x86-64 with ``quantization`` fields replaced."""
    import yaml

    data = yaml.safe_load(Path(load_profile("x86-64").path).read_text())
    data["name"] = name
    data["threads"] = 2
    data["quantization"].update(quantization)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def bundle_copy(host_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the host bundle that a test may damage."""
    return Path(shutil.copytree(host_bundle, tmp_path / host_bundle.name))
