"""`edgekit tune`: each thread count measured on the real engine, the winner kept in the daemon's
config without touching anything else in it. Over SSH, `edgekit deploy --tune` (tests/test_deploy.py)
runs it on a device with its daemon paused and started again."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit.cli import main
from edgekit.errors import EdgekitError
from edgekit.mqtt.settings import BrokerSettings
from edgekit.runtime.engine import Engine
from edgekit.serve import config as daemon_config
from edgekit.serve.config import DaemonConfig
from edgekit.serve.tune import ChunkTrial, Trial, choose, choose_chunk, thread_counts


def test_tune_measures_each_count_and_keeps_the_fastest_in_the_config(host_bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "daemon.yaml"
    before = DaemonConfig(bundle=host_bundle, device_id="kitchen", queue_size=7,
                          broker=BrokerSettings.from_layers({"host": "hub.local", "port": 1884}))
    path.write_text(before.to_yaml())
    path.chmod(0o600)
    result = CliRunner().invoke(main, ["tune", "--config", str(path), "--threads", "1,2", "--runs", "2",
                                       "--prompt-tokens", "16", "--new-tokens", "8", "--prefill-chunks", "16,64",
                                       "--chunk-prompt-tokens", "96", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    trials = [Trial(**t) for t in report["trials"]]
    assert [t.threads for t in trials] == [1, 2] and all(t.decode_tps > 0 and t.prefill_tps > 0 for t in trials)
    assert report["chosen"] == choose(trials).threads and report["written"] and not report["daemon_paused"]
    chunks = [ChunkTrial(**t) for t in report["chunk_trials"]]
    assert [t.chunk for t in chunks] == [16, 64] and all(t.prefill_min <= t.prefill_tps <= t.prefill_max for t in chunks)
    assert report["chosen_chunk"] == choose_chunk(chunks).chunk and report["chunk_prompt_tokens"] == 96
    after = daemon_config.load(path, environ={})
    assert after == replace(before, threads=report["chosen"], prefill_chunk=report["chosen_chunk"])
    # The daemon's engine takes the chunk from the config.
    assert Engine(host_bundle, prefill_chunk=after.prefill_chunk).prefill_chunk == report["chosen_chunk"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["daemon.yaml"]  # no temporary file left


def test_dry_run_writes_nothing_and_bad_input_is_named(host_bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    path = tmp_path / "daemon.yaml"
    path.write_text(DaemonConfig(bundle=host_bundle).to_yaml())
    text = path.read_text()
    dry = runner.invoke(main, ["tune", "--config", str(path), "--threads", "1", "--runs", "1", "--prompt-tokens", "8",
                               "--new-tokens", "4", "--prefill-chunks", "", "--dry-run"])
    assert dry.exit_code == 0 and "nothing written" in dry.output and path.read_text() == text
    assert "prefill chunk" not in dry.output  # '' measures no chunk
    zero = runner.invoke(main, ["tune", str(host_bundle), "--threads", "0,2"])
    assert zero.exit_code == 2 and "--threads" in zero.output
    small = runner.invoke(main, ["tune", str(host_bundle), "--prefill-chunks", "8,64"])
    assert small.exit_code == 2 and "--prefill-chunks" in small.output and "16 or more" in small.output
    not_bundle = runner.invoke(main, ["tune", str(tmp_path), "--threads", "1"])
    assert not_bundle.exit_code == 1 and "no genai_config.json" in not_bundle.output
    path.write_text("bundle: [oops\n")
    broken = runner.invoke(main, ["tune", "--config", str(path)])
    assert broken.exit_code == 1 and str(path) in broken.output and "not valid YAML" in broken.output


def test_the_rule_prefers_decode_then_prefill_then_fewer_threads() -> None:
    def trial(threads: int, prefill: float, decode: float) -> Trial:
        return Trial(threads, prefill, decode, decode, decode)

    assert choose([trial(1, 50, 20), trial(2, 90, 30), trial(4, 120, 25)]).threads == 2
    # Within 3 % on decode, prefill decides; equal on both, fewer threads.
    assert choose([trial(2, 90, 30), trial(4, 120, 29.5)]).threads == 4
    assert choose([trial(2, 90, 30), trial(4, 90, 30)]).threads == 2
    assert thread_counts(2) == (1, 2) and thread_counts(4) == (1, 2, 3, 4) and thread_counts(16) == (1, 2, 3, 4, 8, 16)
    assert thread_counts(6) == (1, 2, 3, 4, 6)


def test_the_chunk_rule_takes_the_smallest_within_3_percent_of_the_fastest() -> None:
    def trial(chunk: int, prefill: float) -> ChunkTrial:
        return ChunkTrial(chunk, prefill, prefill, prefill)

    assert choose_chunk([trial(32, 80), trial(64, 97.5), trial(128, 99), trial(256, 100)]).chunk == 64
    assert choose_chunk([trial(32, 80), trial(64, 90), trial(128, 100)]).chunk == 128


def test_a_config_names_a_bad_prefill_chunk(host_bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "daemon.yaml"
    path.write_text(f"bundle: {host_bundle}\nprefill_chunk: 8\n")
    with pytest.raises(EdgekitError, match="prefill_chunk"):
        daemon_config.load(path, environ={})
