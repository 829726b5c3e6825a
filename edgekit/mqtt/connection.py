"""The paho-mqtt connection shared by the daemon and the client: credentials, TLS, version negotiation."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import paho.mqtt.client as mqtt

from edgekit.errors import EdgekitError
from edgekit.mqtt.settings import BrokerSettings, MqttVersion


def configure_transport(client: mqtt.Client, settings: BrokerSettings) -> None:
    """Credentials and TLS for a paho client."""
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        ca, cert, key = settings.tls_ca, settings.tls_cert, settings.tls_key
        try:
            client.tls_set(ca_certs=str(ca) if ca else None, certfile=str(cert) if cert else None,
                           keyfile=str(key) if key else None)
        except (OSError, ValueError) as exc:
            raise EdgekitError(f"cannot set up TLS with ca={ca} cert={cert}: {exc}") from exc


def new_client(settings: BrokerSettings, client_id: str, **kwargs: Any) -> mqtt.Client:
    """A paho client for ``settings`` (whose version is already negotiated: 5 or 3.1.1)."""
    if settings.protocol is MqttVersion.AUTO:
        raise EdgekitError("negotiate the MQTT version before connecting (negotiate_protocol)")
    protocol = mqtt.MQTTv5 if settings.protocol is MqttVersion.V5 else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs)
    configure_transport(client, settings)
    return client


def negotiate_protocol(settings: BrokerSettings, timeout: float = 5.0) -> BrokerSettings:
    """``settings`` with ``auto`` resolved: 5 if the broker accepts an MQTT 5 connection, else 3.1.1 if
    it accepts that. Some brokers (amqtt, older appliances) only speak 3.1.1 and drop an MQTT 5 CONNECT.
    Settings with a fixed version come back unchanged."""
    if settings.protocol is not MqttVersion.AUTO:
        return settings
    for version in (MqttVersion.V5, MqttVersion.V311):
        accepted = threading.Event()
        probe = new_client(replace(settings, protocol=version), client_id="")
        probe.on_connect = lambda c, u, f, reason, p, done=accepted: done.set() if not reason.is_failure else None
        try:
            probe.connect(settings.host, settings.port, keepalive=10)
        except OSError as exc:
            raise EdgekitError(f"cannot reach the MQTT broker at {settings.address} ({exc})") from exc
        probe.loop_start()
        ok = accepted.wait(timeout)
        probe.disconnect()
        probe.loop_stop()
        if ok:
            return replace(settings, protocol=version)
    raise EdgekitError(f"the MQTT broker at {settings.address} accepted neither MQTT 5 nor 3.1.1 (credentials?)")
