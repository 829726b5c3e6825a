"""The typed contracts that cross module lines: the bundle manifest, broker settings, the daemon's
config file, topics and protocol messages."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from edgekit import signing
from edgekit.bundle import FORMAT_VERSION, MANIFEST, Manifest
from edgekit.cli import main
from edgekit.client import DeviceClient
from edgekit.errors import EdgekitError
from edgekit.mqtt import protocol
from edgekit.mqtt.settings import BrokerSettings, MqttVersion
from edgekit.mqtt.topics import DeviceTopics, check_prefix
from edgekit.serve import config as daemon_config
from edgekit.serve.config import DaemonConfig

from .conftest import broker_at, start_daemon

SCHEMAS = Path(__file__).parent.parent / "docs" / "schema" / "v1"


# --- the manifest -----------------------------------------------------------------------------


def _rewrite(bundle: Path, change: dict) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    data.update(change)
    (bundle / MANIFEST).write_text(json.dumps(data))


def test_manifest_reads_back_what_the_build_wrote(host_bundle: Path) -> None:
    manifest = Manifest.read(host_bundle)
    assert manifest.to_dict() == json.loads((host_bundle / MANIFEST).read_text())
    assert manifest.format_version == FORMAT_VERSION and manifest.extra == {}
    assert manifest.size_bytes == sum(f.size for f in manifest.files) > 0


def test_manifest_fields_a_newer_build_adds_are_accepted_and_kept(bundle_copy: Path) -> None:
    """v1 policy: unknown fields are additive; a device serves a bundle from a newer build."""
    data = json.loads((bundle_copy / MANIFEST).read_text())
    data["audio"] = {"encoder": "audio.onnx"}
    data["vision"]["video"] = True
    data["profile"]["cpu"]["dotprod"] = True
    _rewrite(bundle_copy, data)
    manifest = signing.verify(bundle_copy)
    assert manifest.extra == {"audio": {"encoder": "audio.onnx"}}
    assert manifest.to_dict()["audio"] == {"encoder": "audio.onnx"}
    assert manifest.vision is not None and manifest.vision.precision == "int8"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 2}, "bundle format version 2 is newer than this edgekit reads \\(1\\)"),
        ({"format_version": "1"}, "field 'format_version' must be an integer"),
        ({"recipe": {"threads": "four"}}, "field 'recipe.precision' must be a string \\(missing\\)"),
        ({"name": 3}, "field 'name' must be a string \\(got 3\\)"),
        ({"files": [{"path": "a", "size": -1, "sha256": "x"}]}, "field 'files\\[0\\].size' must be an integer from 0"),
        ({"estimated_ram": {"weights": 1}}, "field 'estimated_ram.total'"),
        ({"quality": {}}, "field 'quality.prompts'"),
    ],
)
def test_a_malformed_manifest_names_the_field(bundle_copy: Path, change: dict, message: str) -> None:
    _rewrite(bundle_copy, change)
    with pytest.raises(EdgekitError, match=message):
        Manifest.read(bundle_copy)
    assert str(bundle_copy / MANIFEST) in _error(lambda: Manifest.read(bundle_copy))


def _error(call) -> str:
    try:
        call()
    except EdgekitError as exc:
        return str(exc)
    raise AssertionError("no error")


def test_verify_never_rewrites_the_manifest(bundle_copy: Path) -> None:
    """manifest.sig signs the file's exact bytes: reading and verifying leave them untouched."""
    before = (bundle_copy / MANIFEST).read_bytes()
    manifest = signing.verify(bundle_copy)
    assert (bundle_copy / MANIFEST).read_bytes() == before
    assert json.loads(before) == manifest.to_dict()


# --- broker settings and the daemon's config file ---------------------------------------------


def test_broker_settings_never_show_the_password() -> None:
    settings = BrokerSettings(username="pi", password="correct horse battery")
    config = DaemonConfig(bundle=Path("/b"), broker=settings)
    for text in (repr(settings), str(settings), repr(config)):
        assert "correct horse battery" not in text and "pi" in text


def test_broker_settings_layers_and_environment(tmp_path: Path) -> None:
    from edgekit.mqtt.settings import environment

    env = environment({"EDGEKIT_BROKER_HOST": "hub", "EDGEKIT_BROKER_PORT": "8883", "EDGEKIT_MQTT_VERSION": "auto"})
    settings = BrokerSettings.from_layers({"host": "file", "port": 1}, env, {"port": 1884, "host": None})
    assert (settings.host, settings.port, settings.protocol) == ("hub", 1884, MqttVersion.AUTO)
    with pytest.raises(EdgekitError, match="EDGEKIT_BROKER_PORT must be a port number"):
        environment({"EDGEKIT_BROKER_PORT": "http"})
    with pytest.raises(EdgekitError, match="MQTT version must be one of 5, 3.1.1, auto"):
        BrokerSettings.from_layers({"protocol": "4"})


def test_daemon_yaml_round_trips_through_the_type_that_parses_it(tmp_path: Path) -> None:
    """Provisioning writes daemon.yaml with DaemonConfig.to_yaml; the daemon reads it with load()."""
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    broker = BrokerSettings(host="hub.lan", port=8883, protocol=MqttVersion.AUTO, prefix="site-a/edgekit", username="pi",
                            password="s3cret", password_file=secret, tls_ca=tmp_path / "ca.pem",
                            tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
    config = DaemonConfig(bundle=Path("/opt/edgekit/current"), broker=broker, device_id="kitchen", pools=("house", "lab"),
                          queue_size=2, telemetry_interval=2.5, session_memory_mb=64, session_idle_s=60.0,
                          min_available_mb=100, threads=3, trusted_keys=(Path("/etc/edgekit/trusted-keys"),),
                          serve_below_quality_gate=True, cache_dir=Path("/var/cache/edgekit"), metrics_port=9100,
                          discovery=False, discovery_prefix="ha/discovery", max_image_bytes=2**20, max_image_pixels=10**7,
                          max_images=2, vision_idle_s=30.0, upload_ttl_s=60.0, upload_memory_mb=8, upload_client_mb=2)
    path = tmp_path / "daemon.yaml"
    path.write_text(config.to_yaml())
    assert "s3cret" not in path.read_text()
    assert daemon_config.load(path, environ={}) == config
    minimal = DaemonConfig(bundle=Path("/b"))
    path.write_text(minimal.to_yaml())
    assert daemon_config.load(path, environ={}) == minimal
    with pytest.raises(EdgekitError, match="names a password file, never the password"):
        DaemonConfig(bundle=Path("/b"), broker=BrokerSettings(password="x")).to_yaml()


@pytest.mark.parametrize("bad", ["#", "+", "kitchen/oven", "", "$SYS", "a\0b"])
def test_topic_levels_from_configuration_are_validated(tmp_path: Path, bad: str) -> None:
    """A device id or pool of `#` would subscribe the daemon to every device's requests."""
    with pytest.raises(EdgekitError, match="device id"):
        DaemonConfig(bundle=Path("/b"), device_id=bad)
    with pytest.raises(EdgekitError, match="pool name"):
        DaemonConfig(bundle=Path("/b"), pools=(bad,))
    path = tmp_path / "daemon.yaml"
    path.write_text(json.dumps({"bundle": "/b", "device_id": bad}))
    if bad:  # an empty string is the type check's (a non-empty string)
        with pytest.raises(EdgekitError, match=f"{path}: field 'device_id'"):
            daemon_config.load(path, environ={})
    path.write_text(json.dumps({"bundle": "/b", "pools": ["ok", bad]}))
    with pytest.raises(EdgekitError, match="field 'pools"):
        daemon_config.load(path, environ={})


@pytest.mark.parametrize("bad", ["#", "a//b", "/edgekit", "edgekit/", "site/+"])
def test_prefixes_are_validated_and_the_reply_prefix_follows_them(bad: str) -> None:
    with pytest.raises(EdgekitError, match="prefix"):
        BrokerSettings(prefix=bad)
    assert check_prefix("site-a/edgekit") == "site-a/edgekit"
    assert BrokerSettings(prefix="site-a/edgekit").reply_prefix == "site-a/edgekit/v1/replies/"


def test_a_daemon_under_another_prefix_answers_under_its_reply_prefix(host_bundle: Path, broker: int) -> None:
    settings = broker_at(broker, prefix="site-a/edgekit")
    instance, thread = start_daemon(DaemonConfig(bundle=host_bundle, broker=settings, device_id="kitchen"))
    try:
        assert instance.topics == DeviceTopics.of("site-a/edgekit", "kitchen")
        with DeviceClient(settings) as client:
            assert client.reply_base.startswith("site-a/edgekit/v1/replies/")
            assert client.ask("kitchen", {"prompt": "hi", "max_tokens": 2})["type"] == "final"
        with DeviceClient(broker_at(broker)) as other:  # the default prefix does not see this device
            assert other.device_status("kitchen", wait_s=0.5) is None
    finally:
        instance.stop()
        thread.join(timeout=30)


# --- protocol messages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response_topic", "reply_to", "expected"),
    [
        ("edgekit/v1/replies/c/1", None, "edgekit/v1/replies/c/1"),
        (None, "edgekit/v1/replies/c/2", "edgekit/v1/replies/c/2"),
        (None, None, None),
        (None, "home/alarm", None),
        (None, "edgekit/v1/replies/c/#", None),
        (None, "edgekit/v1/replies/+/x", None),
        (None, "edgekit/v1/replies//x", None),
        (None, "edgekit/v1/replies/" + "x" * 70_000, None),
    ],
)
def test_reply_topics_are_validated_once(response_topic: str | None, reply_to: str | None, expected: str | None) -> None:
    topic, why = protocol.reply_topic(response_topic, reply_to, "edgekit/v1/replies/")
    assert topic == expected and (bool(why) == (expected is None))


@pytest.mark.parametrize(("payload", "expected"), [(b'{"id": "r1"}', "r1"), (b"{not json", None), (b'["r1"]', None),
                                                 (b'{"id": 7}', None), (b"\xff", None), (b"{}", None)])
def test_cancel_payloads(payload: bytes, expected: str | None) -> None:
    assert protocol.parse_cancel(payload) == expected


def test_queued_and_status_messages_match_their_schemas() -> None:
    def schema(name: str) -> dict:
        return json.loads((SCHEMAS / f"{name}.json").read_text())

    jsonschema.validate(json.loads(protocol.queued("r1", 2)), schema("queued"))
    status = protocol.Status(device_id="kitchen", state="offline", version="0.1.0", bundle="b", model="m", profile="p",
                             context_length=4096, capabilities={"sessions": True}, since=1.0)
    for state in ("offline", "online"):
        jsonschema.validate(json.loads(status.with_state(state).encode()), schema("status"))


# --- clients ------------------------------------------------------------------------------------


def test_ask_says_at_once_that_a_device_is_unknown_or_offline(broker: int) -> None:
    offline = protocol.Status("gone", "offline", "0.1.0", "b", "m", "p", 256, {}, 1.0)
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    raw.connect("127.0.0.1", broker)
    raw.loop_start()
    raw.publish(DeviceTopics.of("edgekit", "gone").status, offline.encode(), qos=1, retain=True).wait_for_publish(5)
    raw.loop_stop()
    raw.disconnect()
    runner = CliRunner()
    for device, said in (("ghost", "device ghost is unknown to the broker at 127.0.0.1"), ("gone", "device gone is offline")):
        started = time.monotonic()
        result = runner.invoke(main, ["ask", "hello", "--device", device, "--port", str(broker), "--timeout", "300"])
        assert result.exit_code == 1 and said in result.output, result.output
        assert time.monotonic() - started < 15  # not the 300 s timeout


def test_tables_never_truncate_names_at_80_columns(broker: int) -> None:
    from edgekit.profiles import known_profiles

    runner = CliRunner(env={"COLUMNS": "80"})
    result = runner.invoke(main, ["profiles"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.output
    for name in known_profiles():
        assert any(line.split() and line.split()[0] == name for line in lines), name
    shown = runner.invoke(main, ["profiles", "show", "raspberry-pi-4"])
    assert shown.exit_code == 0 and "…" not in shown.output and "default_model " in shown.output
    assert max(len(line) for line in shown.output.splitlines()) <= 80
    long_bundle = "qwen3.5-0.8b-raspberry-pi-5-int4-block32-kvint8"
    status = protocol.Status("greenhouse-sensor-07", "online", "0.1.0", long_bundle, "Qwen/Qwen3.5-0.8B",
                             "raspberry-pi-5", 4096, {}, 1.0)
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    raw.connect("127.0.0.1", broker)
    raw.loop_start()
    raw.publish(DeviceTopics.of("edgekit", status.device_id).status, status.encode(), qos=1, retain=True).wait_for_publish(5)
    raw.loop_stop()
    raw.disconnect()
    listed = runner.invoke(main, ["status", "--port", str(broker), "--wait", "0.5"])
    assert listed.exit_code == 0, listed.output
    assert "…" not in listed.output and max(len(line) for line in listed.output.splitlines()) <= 80
    for name in (status.device_id, long_bundle, "raspberry-pi-5"):
        assert name in listed.output, listed.output
