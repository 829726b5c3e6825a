"""The quality fixture: a small Qwen3.5 trained here whose predictions mean something (its held-out
figures against the targets), and what the build's and the device's quality checks see on it."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from edgekit.builder.pipeline import BuildRequest, build
from edgekit.fixtures import trained
from edgekit.profiles import load_profile
from edgekit.runtime.quality_check import Reference
from tests.conftest import write_profile
from tests.test_deploy import edgekit

pytestmark = pytest.mark.slow
# Where `make test` trains it (the Makefile's fixtures/qwen3.5-trained target).
FIXTURE = Path(__file__).parent.parent / "fixtures" / "qwen3.5-trained"


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cached fixture when it matches the current recipe, else trained now (ten minutes)."""
    expected = trained.Recipe(corpus_sha256=trained.Corpus.load().sha256).digest()
    report = FIXTURE / trained.REPORT
    if report.is_file() and json.loads(report.read_text())["recipe_hash"] == expected:
        return FIXTURE
    folder = tmp_path_factory.mktemp("trained") / "qwen3.5-trained"
    trained.train(folder)
    return folder


def test_held_out_predictions_are_learned_not_just_sharp(trained_checkpoint: Path) -> None:
    report = json.loads((trained_checkpoint / trained.REPORT).read_text())
    held = report["held_out"]
    print(json.dumps(report, indent=1))
    assert held["positions"] >= 16000
    assert held["median_top1_probability"] >= 0.3 and held["accuracy"] >= 0.3, held
    assert held["perplexity"] <= held["unigram_perplexity"] / 4, held
    assert held["mass_outside_corpus_ids"] < 0.01, held
    # Every matmul input a multiple of 256: int4 blocks of 32-128 and llama.cpp's k-quants apply.
    config = json.loads((trained_checkpoint / "config.json").read_text())["text_config"]
    widths = [config["hidden_size"], config["intermediate_size"], config["num_attention_heads"] * config["head_dim"],
              config["linear_num_value_heads"] * config["linear_value_head_dim"], 2 * config["hidden_size"]]
    assert all(w % 256 == 0 for w in widths), widths
    assert config["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] and config["mtp_num_hidden_layers"] == 1


@pytest.fixture(scope="session")
def trained_bundle(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained checkpoint as the Raspberry Pi 5 profile builds it, with the profile's own gate."""
    return build(BuildRequest(profile=load_profile("raspberry-pi-5"), model=str(trained_checkpoint),
                              output=tmp_path_factory.mktemp("dist"))).path


def test_its_int4_bundle_passes_the_profile_gate_with_figures_that_mean_something(trained_bundle: Path) -> None:
    manifest = json.loads((trained_bundle / "manifest.json").read_text())
    quality = manifest["quality"]
    print(json.dumps(quality, indent=1))
    # Random weights reach top-1 ~0.03-0.2 here; a trained model's int4 export keeps most of its choices.
    assert quality["passed"] and quality["top1_agreement"] >= 0.8, quality
    reference = Reference.read(trained_bundle)
    assert reference is not None
    # Peaked distributions: the reference's top 16 hold a real share of the mass (median 0.40 measured
    # on these chat prompts, which a model trained on code finds foreign; random weights: ~1e-4), so
    # the device check's KL (top 16 plus a tail bucket) sees the divergence.
    top_mass = [sum(math.exp(v) for v in row) for s in reference.sequences for row in s.top_logprobs]
    assert sorted(top_mass)[len(top_mass) // 2] >= 0.2, top_mass


def test_the_device_check_on_it_agrees_with_the_build(trained_bundle: Path) -> None:
    done = edgekit("verify", str(trained_bundle), "--run", "--json")
    assert done.returncode == 0, done.stderr
    device = json.loads(done.stdout)["device_quality"]
    build_quality = json.loads((trained_bundle / "manifest.json").read_text())["quality"]
    print(device, build_quality)
    assert device["passed"] and device["top1_agreement"] >= 0.8, device
    # The same graph on the same machine: the check's KL (top 16 + tail, 24 of the 72 positions) is of
    # the build's order, not orders of magnitude below it as on random weights.
    assert device["mean_kl"] >= build_quality["mean_kl"] / 20, (device, build_quality)
    assert os.path.getsize(trained_bundle / "quality_reference.json") < 64 * 1024


def test_a_damaging_recipe_fails_the_build_naming_the_figure_the_threshold_and_a_recipe(trained_checkpoint: Path,
                                                                                       tmp_path: Path) -> None:
    """The Raspberry Pi 5's own gate against 2-bit weights, the damage docs/quality.md measured on
    this model; the recipes the profiles offer pass the same gate (above)."""
    pi5 = load_profile("raspberry-pi-5")
    profile = write_profile(tmp_path, pi5.name, base=pi5.name, precision="int2")
    output = tmp_path / "dist"
    done = edgekit("build", "--profile", str(profile), "--model", str(trained_checkpoint), "-o", str(output))
    print(done.stderr[-2000:])
    assert done.returncode != 0
    assert re.search(rf"quality gate failed for profile raspberry-pi-5: .*mean KL [\d.]+ > {pi5.quality.max_mean_kl}",
                     done.stderr), done.stderr[-2000:]
    assert "no bundle written; try quantization precision: int4" in done.stderr
    assert not output.exists() or not any(output.iterdir())
