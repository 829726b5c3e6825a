"""Daemon configuration files and a broker with TLS, client certificates and password auth."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgekit.client import DeviceClient
from edgekit.errors import EdgekitError
from edgekit.serve import config as daemon_config
from edgekit.serve.daemon import Daemon

from .conftest import broker_at, free_port


def test_yaml_env_and_flags_layer(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    path = tmp_path / "daemon.yaml"
    path.write_text(f"""
bundle: /opt/edgekit/bundles/current
device_id: kitchen
pools: [house]
queue_size: 2
broker: {{host: broker.local, port: 8883, username: pi, password_file: {secret}, tls: {{ca: /etc/ca.pem}}}}
sessions: {{memory_mb: 64, idle_s: 120}}
images: {{max_bytes: 1048576, max_per_request: 2, idle_unload_s: 30, upload_ttl_s: 60}}
""")
    config = daemon_config.load(path, {"queue_size": 3}, {"host": None}, environ={"EDGEKIT_DEVICE_ID": "pantry"})
    broker = config.broker
    assert (config.device_id, broker.host, broker.port, config.queue_size) == ("pantry", "broker.local", 8883, 3)
    assert broker.password == "s3cret" and "s3cret" not in repr(config)
    assert broker.tls_ca == Path("/etc/ca.pem") and config.pools == ("house",) and config.session_memory_mb == 64
    assert (config.max_image_bytes, config.max_images, config.vision_idle_s, config.upload_ttl_s) == (1048576, 2, 30.0, 60.0)
    assert config.max_image_pixels == daemon_config.DaemonConfig(bundle=Path("x")).max_image_pixels  # left at its default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bundle: x\nbroker: {port: 70000}\n", "field 'broker.port' must be an integer from 1 to 65535"),
        ("bundle: x\nqueue_size: many\n", "field 'queue_size' must be an integer"),
        ("bundle: x\nbroker: {protocol: 4}\n", "field 'broker.protocol' must be one of 5, 3.1.1"),
        ("bundle: x\nbrokr: {}\n", "unknown field 'brokr'"),
        ("bundle: x\nbroker: {password_file: /nonexistent}\n", "field 'broker.password_file': cannot read"),
        ("bundle: x\npools: [a]\nbroker: {protocol: '3.1.1'}\n", "device pools need MQTT 5"),
        ("device_id: x\n", "no bundle to serve"),
        ("bundle: [unclosed\n", "not valid YAML"),
        ("bundle: x\nhome_assistant: {prefix: 'ha/#'}\n", "field 'home_assistant.prefix'"),
        ("bundle: x\nhome_assistant: {discovery: maybe}\n", "field 'home_assistant.discovery' must be true or false"),
        ("bundle: x\nmetrics_port: 0\n", "field 'metrics_port' must be an integer from 1 to 65535"),
        ("bundle: x\nimages: {max_bytes: 10}\n", "field 'images.max_bytes' must be an integer from 1024"),
        ("bundle: x\nimages: {max_pixel: 10}\n", "unknown field 'images.max_pixel'"),
    ],
)
def test_invalid_config_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "daemon.yaml"
    path.write_text(text)
    with pytest.raises(EdgekitError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        daemon_config.load(path, environ={})


@pytest.mark.slow
def test_tls_and_password(secure_broker, host_bundle: Path) -> None:
    port, folder = secure_broker
    tls = {"tls_ca": folder / "ca.crt", "tls_cert": folder / "client.crt", "tls_key": folder / "client.key"}
    secret = folder / "secret"
    secret.write_text("correct horse")
    yaml_file = folder / "daemon.yaml"
    yaml_file.write_text(
        f"bundle: {host_bundle}\ndevice_id: vault\nbroker: {{port: {port}, username: device, password_file: {secret}, "
        f"tls: {{ca: {tls['tls_ca']}, cert: {tls['tls_cert']}, key: {tls['tls_key']}}}}}\n"
    )
    daemon = Daemon(daemon_config.load(yaml_file, environ={}))
    thread = threading.Thread(target=daemon.serve, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    try:
        with DeviceClient(broker_at(port, username="device", password="correct horse", **tls)) as client:
            client.wait_for_state("vault", "online", timeout=15)
            assert client.ask("vault", {"prompt": "secure hello", "max_tokens": 2})["type"] == "final"
        with pytest.raises(EdgekitError, match="did not accept the connection \\(refused"):
            DeviceClient(broker_at(port, username="device", password="wrong", **tls))
        with pytest.raises(EdgekitError, match="cannot reach the MQTT broker|did not accept"):
            DeviceClient(broker_at(port, username="device", password="correct horse"))  # plain TCP to a TLS listener
    finally:
        daemon.stop()
        thread.join(timeout=30)


@pytest.mark.slow
def test_the_daemon_never_logs_its_secrets(secure_broker, host_bundle: Path) -> None:
    port, folder = secure_broker
    yaml_file = folder / "daemon-verbose.yaml"
    secret = folder / "secret-verbose"
    secret.write_text("correct horse")
    yaml_file.write_text(
        f"bundle: {host_bundle}\ndevice_id: chatty\nbroker: {{port: {port}, username: device, password_file: {secret}, "
        f"tls: {{ca: {folder}/ca.crt, cert: {folder}/client.crt, key: {folder}/client.key}}}}\n"
    )
    tls = {"tls_ca": folder / "ca.crt", "tls_cert": folder / "client.crt", "tls_key": folder / "client.key"}
    process = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "serve", "--config", str(yaml_file), "-v"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with DeviceClient(broker_at(port, username="device", password="correct horse", **tls)) as client:
            client.wait_for_state("chatty", "online", timeout=30, alive=lambda: process.poll() is None)
            assert client.ask("chatty", {"prompt": "hello", "max_tokens": 2})["type"] == "final"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "connected to" in output  # the log is there, and verbose
    assert "correct horse" not in output


def test_the_daemon_refuses_a_tampered_bundle_at_start(bundle_copy: Path) -> None:
    weights = max(bundle_copy.glob("*.onnx*"), key=lambda p: p.stat().st_size)
    with weights.open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff\xfe")
    done = subprocess.run([sys.executable, "-m", "edgekit.cli", "serve", str(bundle_copy), "--device-id", "t",
                           "--port", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3  # a damaged bundle (README: exit statuses)
    assert weights.name in done.stderr and "tampered" in done.stderr and "Traceback" not in done.stderr


def test_a_bundle_that_cannot_generate_fails_the_self_test_before_going_online(bundle_copy: Path) -> None:
    """What makes a deploy roll back: the daemon exits instead of announcing a device that cannot answer."""
    import json

    from edgekit.bundle import Manifest

    genai = bundle_copy / "genai_config.json"
    config = json.loads(genai.read_text())
    config["model"]["context_length"] = 1  # no prompt fits: generation fails, the files stay consistent
    genai.write_text(json.dumps(config))
    Manifest.read(bundle_copy).write(bundle_copy)  # a new manifest for the changed file, as a build would write
    with pytest.raises(EdgekitError, match="self-test failed: cannot generate"):
        Daemon(daemon_config.load(None, {"bundle": bundle_copy}, {"port": free_port()}, environ={}))
