"""`edgekit tune`: each thread count measured on the real engine, the winner kept in the daemon's
config without touching anything else in it. Over SSH, `edgekit deploy --tune` (tests/test_deploy.py)
runs it on a device with its daemon paused and started again."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from click.testing import CliRunner

from edgekit.cli import main
from edgekit.mqtt.settings import BrokerSettings
from edgekit.serve import config as daemon_config
from edgekit.serve.config import DaemonConfig
from edgekit.serve.tune import Trial, choose, thread_counts


def test_tune_measures_each_count_and_keeps_the_fastest_in_the_config(host_bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "daemon.yaml"
    before = DaemonConfig(bundle=host_bundle, device_id="kitchen", queue_size=7,
                          broker=BrokerSettings.from_layers({"host": "hub.local", "port": 1884}))
    path.write_text(before.to_yaml())
    path.chmod(0o600)
    result = CliRunner().invoke(main, ["tune", "--config", str(path), "--threads", "1,2", "--runs", "2",
                                       "--prompt-tokens", "16", "--new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    trials = [Trial(**t) for t in report["trials"]]
    assert [t.threads for t in trials] == [1, 2] and all(t.decode_tps > 0 and t.prefill_tps > 0 for t in trials)
    assert report["chosen"] == choose(trials).threads and report["written"] and not report["daemon_paused"]
    after = daemon_config.load(path, environ={})
    assert after == replace(before, threads=report["chosen"])
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["daemon.yaml"]  # no temporary file left


def test_dry_run_writes_nothing_and_bad_input_is_named(host_bundle: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    path = tmp_path / "daemon.yaml"
    path.write_text(DaemonConfig(bundle=host_bundle).to_yaml())
    text = path.read_text()
    dry = runner.invoke(main, ["tune", "--config", str(path), "--threads", "1", "--runs", "1", "--prompt-tokens", "8",
                               "--new-tokens", "4", "--dry-run"])
    assert dry.exit_code == 0 and "nothing written" in dry.output and path.read_text() == text
    zero = runner.invoke(main, ["tune", str(host_bundle), "--threads", "0,2"])
    assert zero.exit_code == 2 and "--threads" in zero.output
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
