"""Shared paho-mqtt setup for the daemon and the command-line client."""

from __future__ import annotations

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
