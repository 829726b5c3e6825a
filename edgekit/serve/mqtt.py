"""Shared paho-mqtt setup for the daemon and the command-line client."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt

from edgekit.errors import EdgekitError


def configure_transport(client: mqtt.Client, username: str | None, password: str | None, ca: Path | None,
                        cert: Path | None, key: Path | None) -> None:
    """Credentials and TLS for a paho client (the daemon's and the command-line client's)."""
    if username:
        client.username_pw_set(username, password)
    if ca or cert:
        try:
            client.tls_set(ca_certs=str(ca) if ca else None, certfile=str(cert) if cert else None,
                           keyfile=str(key) if key else None)
        except (OSError, ValueError) as exc:
            raise EdgekitError(f"cannot set up TLS with ca={ca} cert={cert}: {exc}") from exc


def negotiate_protocol(host: str, port: int, username: str | None = None, password: str | None = None,
                       ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
                       timeout: float = 5.0) -> str:
    """"5" if the broker accepts an MQTT 5 connection, else "3.1.1" if it accepts that.

    Some brokers (amqtt, older appliances) only speak 3.1.1 and refuse or drop an MQTT 5 CONNECT.
    """
    for version, protocol in (("5", mqtt.MQTTv5), ("3.1.1", mqtt.MQTTv311)):
        accepted = threading.Event()
        probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
        configure_transport(probe, username, password, ca, cert, key)
        probe.on_connect = lambda c, u, f, reason, p, done=accepted: done.set() if not reason.is_failure else None
        try:
            probe.connect(host, port, keepalive=10)
        except OSError as exc:
            raise EdgekitError(f"cannot reach the MQTT broker at {host}:{port} ({exc})") from exc
        probe.loop_start()
        ok = accepted.wait(timeout)
        probe.disconnect()
        probe.loop_stop()
        if ok:
            return version
    raise EdgekitError(f"the MQTT broker at {host}:{port} accepted neither MQTT 5 nor 3.1.1 (credentials?)")
