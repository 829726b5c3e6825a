"""Broker settings: one type for where and how the daemon, the client and provisioning connect.

Settings come in layers, later ones winning: defaults, a daemon config file's ``broker:`` section,
the environment (:data:`ENVIRONMENT`), then command-line flags. Each layer is a mapping of field
names; a layer that names a password file carries the password read from it, so a later layer's
password wins whichever way the earlier one gave it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgekit.errors import EdgekitError
from edgekit.mqtt.topics import check_prefix, reply_prefix
from edgekit.validation import Fields


class MqttVersion(str, enum.Enum):
    """The MQTT protocol version to speak; ``auto`` tries 5 and falls back to 3.1.1."""

    V5 = "5"
    V311 = "3.1.1"
    AUTO = "auto"

    def __str__(self) -> str:
        return self.value


# Environment variables that set broker fields (above a config file, below flags).
ENVIRONMENT = {
    "EDGEKIT_BROKER_HOST": "host",
    "EDGEKIT_BROKER_PORT": "port",
    "EDGEKIT_MQTT_VERSION": "protocol",
    "EDGEKIT_MQTT_PREFIX": "prefix",
    "EDGEKIT_MQTT_USERNAME": "username",
    "EDGEKIT_MQTT_PASSWORD": "password",
}
_PATHS = ("password_file", "tls_ca", "tls_cert", "tls_key")


@dataclass(frozen=True)
class BrokerSettings:
    """A broker connection. The password never appears in ``repr`` (nor in logs that print this)."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: MqttVersion = MqttVersion.V5
    prefix: str = "edgekit"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: Path | None = None  # where the password came from: what a config file names
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise EdgekitError("broker host must not be empty")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise EdgekitError(f"broker port must be an integer from 1 to 65535 (got {self.port!r})")
        if not isinstance(self.protocol, MqttVersion):
            raise EdgekitError(f"MQTT version must be a MqttVersion (got {self.protocol!r})")
        check_prefix(self.prefix)
        if self.tls_cert and not self.tls_key:
            raise EdgekitError("TLS client certificate given without its key (tls.key)")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def tls(self) -> bool:
        """Whether the connection uses TLS (a CA or a client certificate is configured)."""
        return bool(self.tls_ca or self.tls_cert)

    @property
    def reply_prefix(self) -> str:
        """The topics replies may be published under, derived from :attr:`prefix`."""
        return reply_prefix(self.prefix)

    @classmethod
    def from_layers(cls, *layers: Mapping[str, Any]) -> BrokerSettings:
        """Settings from layers of field values, later layers winning; None values are skipped."""
        values: dict[str, Any] = {}
        for layer in layers:
            values.update({k: v for k, v in layer.items() if v is not None})
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(values) - known):
            raise EdgekitError(f"unknown broker setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        if "protocol" in values:
            values["protocol"] = parse_version(values["protocol"], "MQTT version")
        for name in _PATHS:
            if name in values:
                values[name] = Path(values[name])
        return cls(**values)

    @classmethod
    def from_url(cls, url: str, **values: Any) -> BrokerSettings:
        """Settings from ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]`` (mqtts needs ``tls_ca``)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise EdgekitError(f"--broker {url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
        tls = parts.scheme == "mqtts"
        if tls and not values.get("tls_ca"):
            raise EdgekitError(f"--broker {url}: mqtts needs the broker's CA certificate (--tls-ca)")
        if not tls and (values.get("tls_ca") or values.get("tls_cert")):
            raise EdgekitError(f"--broker {url}: TLS files given for a plain mqtt:// broker; use mqtts://")
        return cls.from_layers(values, {"host": parts.hostname, "port": parts.port or (8883 if tls else 1883)})


def parse_version(value: Any, what: str) -> MqttVersion:
    """An MqttVersion from ``"5"``, ``5``, ``"3.1.1"`` or ``"auto"``."""
    try:
        return MqttVersion(str(value))
    except ValueError:
        raise EdgekitError(f"{what} must be one of 5, 3.1.1, auto (got {value!r})") from None


def environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The broker fields set by :data:`ENVIRONMENT` variables in ``environ``."""
    values: dict[str, Any] = {}
    for variable, name in ENVIRONMENT.items():
        if variable in environ:
            values[name] = environ[variable]
    if "port" in values:
        if not values["port"].isdigit():
            raise EdgekitError(f"EDGEKIT_BROKER_PORT must be a port number (got {values['port']!r})")
        values["port"] = int(values["port"])
    return values


def read_secret(path: Path | str, what: str) -> str:
    """The secret stored in ``path`` (surrounding whitespace dropped); ``what`` names it in errors."""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise EdgekitError(f"{what}: cannot read {path} ({exc.strerror})") from exc


def with_password(values: dict[str, Any], what: str) -> dict[str, Any]:
    """``values`` plus the password read from its ``password_file``, when it names one."""
    if values.get("password_file"):
        values["password"] = read_secret(values["password_file"], what)
    return values


def parse_section(broker: Fields, prefix: Any) -> dict[str, Any]:
    """The broker fields of a daemon config file: its ``broker:`` section and the top-level ``prefix``."""
    tls = broker.nested("tls", optional=True)
    values: dict[str, Any] = {
        "host": broker.get("host", str, "a host name", None),
        "username": broker.get("username", str, "a user name", None),
        "password_file": broker.get("password_file", str, "a path to a file holding the password", None),
        "prefix": prefix,
    }
    if "port" in broker.data:
        values["port"] = broker.number("port", 1, 65535, integer=True)
    if "protocol" in broker.data:
        values["protocol"] = parse_version(broker.choice("protocol", ("5", "3.1.1", "auto", 5)), "")
    for name in ("ca", "cert", "key"):
        values[f"tls_{name}"] = tls.get(name, str, "a path to a PEM file", None)
    tls.check_unknown()
    return with_password(values, f"{broker.where}: field 'broker.password_file'")


def dump_section(settings: BrokerSettings) -> dict[str, Any]:
    """The ``broker:`` section of a daemon config file for ``settings`` (inverse of :func:`parse_section`).

    A config file names the password's file, never the password itself.
    """
    if settings.password is not None and settings.password_file is None:
        raise EdgekitError("a daemon config file names a password file, never the password: set password_file")
    section: dict[str, Any] = {"host": settings.host, "port": settings.port, "protocol": settings.protocol.value}
    if settings.username:
        section["username"] = settings.username
    if settings.password_file:
        section["password_file"] = str(settings.password_file)
    tls = {name: str(path) for name, path in (("ca", settings.tls_ca), ("cert", settings.tls_cert),
                                              ("key", settings.tls_key)) if path}
    if tls:
        section["tls"] = tls
    return section
