"""Device profiles load, validate with messages that name file and field, and print from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgekit.cli import main
from edgekit.errors import EdgekitError
from edgekit.profiles import host_profile, known_profiles, load_profile

REQUIRED = {"raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "x86-64", "arm64-generic"}


def test_bundled_profiles_load() -> None:
    assert set(known_profiles()) >= REQUIRED
    for name in known_profiles():
        profile = load_profile(name)
        assert profile.name == name
        assert profile.threads >= 1 and 256 <= profile.context_length <= 262144
        assert profile.default_model in ("Qwen/Qwen3.5-0.8B", "Qwen/Qwen3.5-2B")
        # Hardware we cannot measure is marked as estimated, with a source.
        assert profile.estimated and profile.source
    assert load_profile("jetson-orin-nano").execution_provider == "cuda"
    assert load_profile("raspberry-pi-5").arch == "aarch64"


def test_kv_cache_is_int8_on_cpu_fp16_on_cuda_and_fp32_for_the_fp32_reference(tmp_path: Path) -> None:
    assert load_profile("raspberry-pi-5").quantization.kv_cache == "int8"
    assert load_profile("host").quantization.kv_cache == "int8"
    assert load_profile("jetson-orin-nano").quantization.kv_cache == "fp16"
    fp32 = _write(tmp_path, lambda d: d["quantization"].update(precision="fp32"))
    assert load_profile(str(fp32)).quantization.kv_cache == "fp32"
    chosen = _write(tmp_path, lambda d: d["quantization"].update(kv_cache="fp16"))
    assert load_profile(str(chosen)).quantization.kv_cache == "fp16"


def test_host_profile_measures_this_machine() -> None:
    import psutil

    host = host_profile()
    assert host.cores == psutil.cpu_count(logical=False)
    assert host.threads <= host.cores
    assert abs(host.ram_gb - psutil.virtual_memory().total / 1024**3) < 0.1
    assert not host.estimated


def _write(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(Path(load_profile("raspberry-pi-5").path).read_text())
    edit(data)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("edit", "field", "expected"),
    [
        (lambda d: d.pop("context_length"), "context_length", "an integer"),
        (lambda d: d.update(threads="four"), "threads", "an integer"),
        (lambda d: d.update(threads=True), "threads", "an integer"),
        (lambda d: d.update(ram_share=1.5), "ram_share", "from 0.05 to 1.0"),
        (lambda d: d["quantization"].update(precision="int3"), "quantization.precision", "one of int2, int4, int8, fp16, fp32"),
        (lambda d: d["quantization"].update(block_size=48), "quantization.block_size", "one of 16, 32, 64, 128, 256"),
        (lambda d: d["quantization"].update(kv_cache="int4"), "quantization.kv_cache", "one of int8, fp16, fp32"),
        (lambda d: d["cpu"].update(arch="armv7l"), "cpu.arch", "one of aarch64, x86_64"),
        (lambda d: d.update(execution_provider="tpu"), "execution_provider", "one of cpu, cuda"),
        (lambda d: d.update(colour="red"), "colour", "unknown field"),
        (lambda d: d.pop("quality"), "quality", "a mapping"),
    ],
)
def test_invalid_profile_names_file_and_field(tmp_path: Path, edit, field: str, expected: str) -> None:
    path = _write(tmp_path, edit)
    with pytest.raises(EdgekitError) as caught:
        load_profile(str(path))
    message = str(caught.value)
    assert str(path) in message and f"'{field}'" in message and expected in message


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(EdgekitError, match="bad.yaml: not valid YAML"):
        load_profile(str(bad))
    with pytest.raises(EdgekitError, match="does not exist"):
        load_profile(str(tmp_path / "absent.yaml"))


def test_unknown_profile_lists_known_ones() -> None:
    result = CliRunner().invoke(main, ["profiles", "show", "raspberry-pi-9"])
    assert result.exit_code == 1
    assert "unknown profile 'raspberry-pi-9'" in result.output
    assert "raspberry-pi-5" in result.output and "jetson-orin-nano" in result.output


def test_profiles_cli_table_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich sizes tables to the terminal
    runner = CliRunner()
    table = runner.invoke(main, ["profiles"])
    assert table.exit_code == 0
    for name in REQUIRED:
        assert name in table.output
    listed = json.loads(runner.invoke(main, ["profiles", "--json"]).output)
    assert {p["name"] for p in listed} == {*known_profiles(), "host"}
    shown = json.loads(runner.invoke(main, ["profiles", "show", "raspberry-pi-4", "--json"]).output)
    assert shown["cpu"]["arch"] == "aarch64" and shown["quantization"]["block_size"] == 32
    own = _write(tmp_path, lambda d: d.update(name="my-board", threads=3))
    shown = json.loads(runner.invoke(main, ["profiles", "show", str(own), "--json"]).output)
    assert shown["name"] == "my-board" and shown["threads"] == 3


def test_every_command_has_help_with_example() -> None:
    runner = CliRunner()
    for command in (["profiles"], ["profiles", "show"], ["build"], ["generate"], ["verify"]):
        result = runner.invoke(main, [*command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output, command
