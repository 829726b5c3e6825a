"""The quality check a device runs on its own kernels against the reference shipped in the bundle:
`edgekit verify --run`, and the daemon's gate at start (cached between starts)."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgekit.bundle import Manifest
from edgekit.errors import BelowQualityGate
from edgekit.runtime.agreement import kl
from edgekit.runtime.quality_check import DEVICE_POSITIONS, DEVICE_PROMPTS, REFERENCE, TOP_K, Reference, top_k_kl
from edgekit.serve.daemon import Daemon, DaemonConfig
from tests.conftest import broker_at, start_daemon
from tests.test_deploy import edgekit

SCHEMAS = Path(__file__).parent.parent / "docs" / "schema" / "v1"


def test_top_k_kl_is_the_full_kl_with_every_id_and_never_more_with_fewer() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        reference, candidate = rng.normal(0, 3, 64), rng.normal(0, 3, 64)
        logprobs = reference - np.log(np.exp(reference).sum())
        order = np.argsort(-logprobs)
        full = kl(reference, candidate)
        assert top_k_kl(order, logprobs[order], candidate) == pytest.approx(full, rel=1e-9, abs=1e-12)
        # Lumping the rest into one bucket can only lose information (the data-processing inequality).
        assert top_k_kl(order[:8], logprobs[order[:8]], candidate) <= full + 1e-12


def test_a_build_ships_the_reference_its_manifest_covers(host_bundle: Path) -> None:
    reference = Reference.read(host_bundle)
    assert reference is not None and reference.k == TOP_K
    assert len(reference.sequences) == len(DEVICE_PROMPTS)
    assert reference.positions == len(DEVICE_PROMPTS) * DEVICE_POSITIONS
    assert REFERENCE in {f.path for f in Manifest.read(host_bundle).files}
    assert (host_bundle / REFERENCE).stat().st_size < 64 * 1024  # small: it rides along to every device


def test_verify_run_passes_a_fresh_build(host_bundle: Path) -> None:
    done = edgekit("verify", str(host_bundle), "--run", "--json")
    assert done.returncode == 0, done.stderr
    quality = json.loads(done.stdout)["device_quality"]
    gate = Manifest.read(host_bundle).profile.quality
    assert quality["passed"] and quality["positions"] == len(DEVICE_PROMPTS) * DEVICE_POSITIONS
    assert quality["mean_kl"] <= gate.max_mean_kl and quality["onnxruntime"]
    human = edgekit("verify", str(host_bundle), "--run")
    assert human.returncode == 0 and "passed" in human.stdout and "top-1 agreement" in human.stdout, human.stdout


def _altered(bundle: Path) -> Path:
    """The bundle with a reference that disagrees with its graph, sealed again so that its files still
    verify: only the check can tell. The reference now claims 90 % for its most likely token at every
    position. (Merely reordering the top-k would not do on random weights: their near-flat
    distributions put almost all of the mass, and of the KL, in the tail bucket.)"""
    path = bundle / REFERENCE
    data = json.loads(path.read_text())
    for sequence in data["sequences"]:
        sequence["top_logprobs"] = [[math.log(0.9), *row[1:]] for row in sequence["top_logprobs"]]
    path.write_text(json.dumps(data))
    Manifest.read(bundle).write(bundle)
    return bundle


def test_an_altered_reference_fails_the_check_with_its_figure(bundle_copy: Path) -> None:
    altered = _altered(bundle_copy)
    assert edgekit("verify", str(altered)).returncode == 0  # the files match the manifest
    done = edgekit("verify", str(altered), "--run")
    assert done.returncode == BelowQualityGate.exit_code, done.stdout + done.stderr
    assert "below its quality gate" in done.stderr and "mean KL" in done.stderr, done.stderr


def test_the_daemon_refuses_a_bundle_below_its_gate_unless_told(bundle_copy: Path, broker: int, tmp_path: Path) -> None:
    altered = _altered(bundle_copy)
    config = DaemonConfig(bundle=altered, broker=broker_at(broker), device_id=f"dev-{uuid.uuid4().hex[:8]}",
                          cache_dir=tmp_path / "cache")
    with pytest.raises(BelowQualityGate, match=r"mean KL \d+\.\d+ > .*serve_below_quality_gate"):
        Daemon(config)
    daemon, thread = start_daemon(replace(config, serve_below_quality_gate=True))
    try:
        quality = daemon.status.quality
        assert quality is not None and not quality["passed"] and quality["serving_below_gate"]
        assert quality["cached"]  # measured by the refused start above, same bundle, CPU and runtime
        jsonschema.validate(json.loads(daemon.status.with_state("online").encode()),
                            json.loads((SCHEMAS / "status.json").read_text()))
    finally:
        daemon.stop()
        thread.join(timeout=30)


def test_the_daemon_reports_its_check_and_caches_it(host_bundle: Path, broker: int, tmp_path: Path) -> None:
    config = DaemonConfig(bundle=host_bundle, broker=broker_at(broker), device_id=f"dev-{uuid.uuid4().hex[:8]}",
                          cache_dir=tmp_path / "cache")
    seen = []
    for threads in (1, 1, 2):
        daemon, thread = start_daemon(replace(config, threads=threads))
        daemon.stop()
        thread.join(timeout=30)
        seen.append(daemon.status.quality)
    first, again, other_threads = seen
    assert first is not None and first["passed"] and not first["cached"] and not first["serving_below_gate"]
    assert again is not None and again["cached"] and again["mean_kl"] == first["mean_kl"]
    assert other_threads is not None and not other_threads["cached"]  # another thread count is another measurement
    assert len(list((tmp_path / "cache").glob("quality-*.json"))) == 2
