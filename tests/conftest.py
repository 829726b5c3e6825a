"""Shared fixtures: random-weight Qwen3.5 checkpoints and bundles built from them, once per session."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from edgekit.builder.pipeline import BuildRequest, build
from edgekit.client import DeviceClient
from edgekit.deploy import wheelhouse
from edgekit.fixtures.checkpoint import write_checkpoint
from edgekit.mqtt.settings import BrokerSettings
from edgekit.profiles import Quality, load_profile
from edgekit.runtime.engine import Engine
from edgekit.runtime.tokenizer import ChatTokenizer
from edgekit.serve.daemon import Daemon, DaemonConfig
from edgekit.serve.embedded_broker import free_port, mosquitto_path, wait_for_port
from tests.sshhost import SSHD, SSHHost

# Random weights cannot meet real-model quality thresholds (their logits are near-flat, so top-1
# among 248k tokens is a coin toss); the KL bound still separates sound exports from broken ones.
RANDOM_WEIGHT_GATE = Quality(min_top1_agreement=0.0, max_mean_kl=0.2)


def _edgekit_processes() -> list[psutil.Process]:
    """Processes running edgekit (a daemon, a client) other than this test process."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if process.pid != os.getpid() and ("edgekit serve" in cmdline or "edgekit.cli" in cmdline):
            found.append(process)
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_outlives_the_tests() -> Iterator[None]:
    """Every test stops what it starts: an edgekit process still running once the session's own
    fixtures are torn down fails the run (on a reused machine they would pile up and skew later runs)."""
    before = {p.pid for p in _edgekit_processes()}
    yield
    deadline = time.monotonic() + 15
    while (left := [p for p in _edgekit_processes() if p.pid not in before]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        described = "; ".join(f"pid {p.pid}: {' '.join(p.info['cmdline'] or ())}" for p in left)
        for process in left:
            process.kill()
        pytest.fail(f"edgekit processes outlived the tests (killed now): {described}")


@pytest.fixture(scope="session", autouse=True)
def quality_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Daemons started by the tests cache their quality checks in the session's temporary folder
    (as under systemd's CacheDirectory=), not in this machine's ~/.cache."""
    previous = os.environ.get("CACHE_DIRECTORY")
    os.environ["CACHE_DIRECTORY"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        del os.environ["CACHE_DIRECTORY"]
    else:
        os.environ["CACHE_DIRECTORY"] = previous


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


@pytest.fixture(scope="module")
def engine(host_bundle: Path) -> Engine:
    """An engine over the host bundle, shared by a test module."""
    return Engine(host_bundle)


@pytest.fixture(scope="module")
def tokenizer(host_bundle: Path) -> ChatTokenizer:
    return ChatTokenizer(host_bundle)


def write_profile(folder: Path, name: str, base: str = "x86-64", **quantization: object) -> Path:
    """A user profile file based on the bundled ``base`` with ``quantization`` fields replaced."""
    import yaml

    data = yaml.safe_load(Path(load_profile(base).path).read_text())
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


MOSQUITTO = mosquitto_path() or "/usr/sbin/mosquitto"


def start_mosquitto(config: Path, port: int) -> subprocess.Popen:
    """Run mosquitto with ``config`` and wait until it listens on ``port``."""
    process = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_port(port, process, timeout=10), f"mosquitto refused {config}"
    return process


class Mosquitto:
    """A private Mosquitto with persistence on a free loopback port; can be restarted in place."""

    def __init__(self, folder: Path) -> None:
        if not os.path.exists(MOSQUITTO):
            pytest.fail("mosquitto is not installed (make test installs it)")
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {folder}/\nmax_queued_messages 1000\n"
            # Run as root (CI does), mosquitto would switch to its own user and lose access to our temp files.
            "user root\n"
        )
        self.start()

    def start(self) -> None:
        self.process = start_mosquitto(self.config, self.port)

    def stop(self) -> None:
        self.process.terminate()  # mosquitto saves its persistence database on SIGTERM
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    instance = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield instance.port
    instance.stop()


def broker_at(port: int, **fields: object) -> BrokerSettings:
    """Settings for the test broker on ``port`` (``protocol`` may be given as "5", "3.1.1" or "auto")."""
    return BrokerSettings.from_layers({"port": port, **fields})


def start_daemon(config: DaemonConfig) -> tuple[Daemon, threading.Thread]:
    """Serve ``config`` in a thread of this process; return once its status is online."""
    instance = Daemon(config)
    thread = threading.Thread(target=instance.serve, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    with DeviceClient(instance.config.broker) as probe:
        probe.wait_for_state(config.device_id, "online", timeout=10)
    return instance, thread


@pytest.fixture
def daemon(host_bundle: Path, broker: int) -> Iterator[Daemon]:
    """A daemon serving the host bundle with a unique device id and a queue of one."""
    instance, thread = start_daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(broker), device_id=f"dev-{uuid.uuid4().hex[:8]}",
                                           queue_size=1, telemetry_interval=0.5))
    yield instance
    instance.stop()
    thread.join(timeout=30)


@pytest.fixture(scope="session")
def ssh_host() -> Iterator[SSHHost]:
    """The deploy tests' SSH "device" host (sshd on loopback, a sudo user, the systemctl stand-in)."""
    if not os.path.exists(SSHD):
        pytest.fail(f"{SSHD} is missing: openssh-server is needed for the deploy tests (make test installs it)")
    host = SSHHost()
    yield host
    host.close()


@pytest.fixture
def fresh_device(ssh_host: SSHHost) -> Iterator[Path]:
    """A new, empty device root on the SSH host; its daemon is stopped afterwards."""
    root = ssh_host.device()
    yield root
    ssh_host.stop_service()


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime's wheels for this machine, as `edgekit wheelhouse` makes them for a device."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    wheelhouse.build(folder, platform.machine(), "3.11")
    return folder


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def secure_broker(tmp_path_factory: pytest.TempPathFactory):
    """Mosquitto with TLS (client certificates required) and a password file, anonymous access off."""
    folder = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=edgekit test CA", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={'localhost' if name == 'server' else 'edgekit-device'}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=folder)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(folder / "passwd"), "device", "correct horse"], check=True)
    port = free_port()
    (folder / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\ncafile {folder}/ca.crt\ncertfile {folder}/server.crt\nkeyfile {folder}/server.key\n"
        f"require_certificate true\nallow_anonymous false\npassword_file {folder}/passwd\n"
        # Run as root (CI does), mosquitto would switch to its own user and lose access to our temp files.
        "user root\n"
    )
    process = start_mosquitto(folder / "mosquitto.conf", port)
    yield port, folder
    process.terminate()
    process.wait(timeout=10)
