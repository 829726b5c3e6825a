"""A throwaway MQTT broker for demos: Mosquitto where installed, else amqtt (pure Python, MQTT 3.1.1).

``make run`` needs a broker without asking a newcomer to install one. Production and the tests use
Mosquitto; amqtt refuses MQTT 5 connections, so with it the daemon and client speak 3.1.1.

``python -m edgekit.serve.embedded_broker PORT`` runs the amqtt broker in the foreground.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.mqtt.settings import BrokerSettings, MqttVersion


@dataclass
class EmbeddedBroker:
    """A running broker process on a loopback port, and the MQTT version to speak to it."""

    process: subprocess.Popen
    port: int
    protocol: MqttVersion
    kind: str

    @property
    def settings(self) -> BrokerSettings:
        return BrokerSettings(port=self.port, protocol=self.protocol)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_path() -> str | None:
    """The mosquitto binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 15.0) -> bool:
    """Wait until ``process`` accepts connections on ``port``; False if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def start(prefer: str = "auto") -> EmbeddedBroker:
    """Start a broker on a free loopback port; ``prefer`` is auto, mosquitto or amqtt."""
    port = free_port()
    mosquitto = mosquitto_path()
    if prefer in ("auto", "mosquitto") and mosquitto:
        config = Path(tempfile.mkdtemp(prefix="edgekit-broker-")) / "mosquitto.conf"
        # As root, mosquitto would switch to its own user; nothing here needs that.
        config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n" + ("user root\n" if os.geteuid() == 0 else ""))
        broker = EmbeddedBroker(subprocess.Popen([mosquitto, "-c", str(config)], stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL), port, MqttVersion.V5, "mosquitto")
    elif prefer in ("auto", "amqtt"):
        broker = EmbeddedBroker(subprocess.Popen([sys.executable, "-m", "edgekit.serve.embedded_broker", str(port)],
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, MqttVersion.V311, "amqtt")
    else:
        raise EdgekitError("no MQTT broker available: install mosquitto, or amqtt (pip install amqtt)")
    if not wait_for_port(port, broker.process):
        broker.stop()
        raise EdgekitError(f"the embedded {broker.kind} broker did not start on port {port}")
    return broker


def _serve_amqtt(port: int) -> None:
    try:
        from amqtt.broker import Broker
    except ImportError:
        sys.exit("amqtt is not installed: pip install amqtt")

    async def run() -> None:
        broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                         "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}})
        await broker.start()
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    _serve_amqtt(int(sys.argv[1]))
