"""Daemon configuration: a YAML file (e.g. /etc/edgekit/daemon.yaml), then environment, then CLI flags.

Secrets (the broker password) come from a file or the environment and are never logged. An invalid
file fails at start with the field named.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from edgekit.errors import EdgekitError
from edgekit.validation import Fields

# Environment variables that override the file; the CLI's flags override both.
ENVIRONMENT = {
    "EDGEKIT_BUNDLE": "bundle",
    "EDGEKIT_DEVICE_ID": "device_id",
    "EDGEKIT_BROKER_HOST": "host",
    "EDGEKIT_BROKER_PORT": "port",
    "EDGEKIT_MQTT_USERNAME": "username",
    "EDGEKIT_MQTT_PASSWORD": "password",
}


@dataclass
class DaemonConfig:
    """Everything the daemon needs to know."""

    bundle: Path
    device_id: str = field(default_factory=socket.gethostname)
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"  # "5", "3.1.1", or "auto" (5, falling back to 3.1.1 when the broker refuses it)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    prefix: str = "edgekit"
    reply_prefix: str = "edgekit/v1/replies/"
    pools: tuple[str, ...] = ()
    queue_size: int = 4
    telemetry_interval: float = 10.0
    session_memory_mb: int = 256
    session_idle_s: float = 900.0
    min_available_mb: int = 150
    threads: int | None = None
    trusted_keys: tuple[Path, ...] = ()  # when set, only bundles signed by one of these keys are served


def load(path: Path | None, overrides: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """Build the config from ``path`` (optional), the environment, then ``overrides`` (None values skipped)."""
    values: dict[str, Any] = _read_file(path) if path else {}
    env = os.environ if environ is None else environ
    for variable, name in ENVIRONMENT.items():
        if variable in env:
            values[name] = int(env[variable]) if name == "port" and env[variable].isdigit() else env[variable]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if "bundle" not in values:
        raise EdgekitError(f"no bundle to serve: give BUNDLE, 'bundle' in {path or 'the config file'}, or EDGEKIT_BUNDLE")
    known = {f.name for f in fields(DaemonConfig)}
    config = DaemonConfig(**{k: v for k, v in values.items() if k in known})
    for name in ("bundle", "tls_ca", "tls_cert", "tls_key"):
        value = getattr(config, name)
        if value is not None:
            config = replace(config, **{name: Path(value)})
    config = replace(config, trusted_keys=tuple(Path(k) for k in config.trusted_keys))
    if config.tls_cert and not config.tls_key:
        raise EdgekitError("tls client certificate given without its key (tls.key)")
    if config.pools and config.protocol != "5":
        raise EdgekitError("device pools need MQTT 5 (shared subscriptions); set broker.protocol to 5")
    return config


def read_secret(path: Path | str, what: str) -> str:
    """The secret stored in ``path`` (surrounding whitespace dropped); ``what`` names it in errors."""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise EdgekitError(f"{what}: cannot read {path} ({exc.strerror})") from exc


def _read_file(path: Path) -> dict[str, Any]:
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise EdgekitError(f"cannot read daemon config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise EdgekitError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from exc
    top = Fields(data or {}, where)
    broker = top.nested("broker", optional=True)
    tls = broker.nested("tls", optional=True)
    sessions = top.nested("sessions", optional=True)
    values: dict[str, Any] = {}

    def put(name: str, value: Any) -> None:
        if value is not None:
            values[name] = value

    put("bundle", top.get("bundle", str, "a bundle folder path", None))
    put("device_id", top.get("device_id", str, "a device id", None))
    put("prefix", top.get("prefix", str, "a topic prefix", None))
    put("reply_prefix", top.get("reply_prefix", str, "a topic prefix", None))
    pools = top.get("pools", list, "a list of pool names", None)
    if pools is not None:
        if not all(isinstance(p, str) and p for p in pools):
            raise EdgekitError(f"{where}: field 'pools' must be a list of pool names (got {pools!r})")
        values["pools"] = tuple(pools)
    put("queue_size", top.number("queue_size", 1, 1024, integer=True) if "queue_size" in top.data else None)
    if "telemetry_interval" in top.data:
        values["telemetry_interval"] = float(top.number("telemetry_interval", 0.1, 86400))
    if "min_available_mb" in top.data:
        values["min_available_mb"] = top.number("min_available_mb", 0, 1_000_000, integer=True)
    if "threads" in top.data:
        values["threads"] = top.number("threads", 1, 256, integer=True)
    keys = top.get("trusted_keys", list, "a list of paths to ed25519 public keys (PEM)", None)
    if keys is not None:
        if not all(isinstance(k, str) and k for k in keys):
            raise EdgekitError(f"{where}: field 'trusted_keys' must be a list of paths to public keys (got {keys!r})")
        values["trusted_keys"] = tuple(keys)
    put("host", broker.get("host", str, "a host name", None))
    if "port" in broker.data:
        values["port"] = broker.number("port", 1, 65535, integer=True)
    if "protocol" in broker.data:
        values["protocol"] = str(broker.choice("protocol", ("5", "3.1.1", "auto", 5)))
    put("username", broker.get("username", str, "a user name", None))
    password_file = broker.get("password_file", str, "a path to a file holding the password", None)
    if password_file:
        values["password"] = read_secret(password_file, f"{where}: field 'broker.password_file'")
    for name in ("ca", "cert", "key"):
        put(f"tls_{name}", tls.get(name, str, "a path to a PEM file", None))
    if "memory_mb" in sessions.data:
        values["session_memory_mb"] = sessions.number("memory_mb", 0, 1_000_000, integer=True)
    if "idle_s" in sessions.data:
        values["session_idle_s"] = float(sessions.number("idle_s", 1, 10_000_000))
    for part in (top, broker, tls, sessions):
        part.check_unknown()
    return values
