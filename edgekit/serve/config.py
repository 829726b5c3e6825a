"""Daemon configuration: a YAML file (e.g. /etc/edgekit/daemon.yaml), then environment, then CLI flags.

:class:`DaemonConfig` both parses the file (:func:`load`) and writes it (:meth:`DaemonConfig.to_yaml`,
which provisioning uses), so the two cannot drift apart. Secrets (the broker password) come from a
file or the environment and are never logged or written into the config. An invalid file fails at
start with the field named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgekit.errors import EdgekitError
from edgekit.mqtt import settings as broker_settings
from edgekit.mqtt.settings import BrokerSettings
from edgekit.mqtt.topics import check_level, check_prefix
from edgekit.validation import Fields

# Environment variables that override the file's daemon fields; broker fields have their own
# (edgekit.mqtt.settings.ENVIRONMENT). The CLI's flags override both.
ENVIRONMENT = {
    "EDGEKIT_BUNDLE": "bundle",
    "EDGEKIT_DEVICE_ID": "device_id",
}


@dataclass(frozen=True)
class DaemonConfig:
    """Everything the daemon needs to know."""

    bundle: Path
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    device_id: str | None = None  # None: the device's hostname when the daemon starts
    pools: tuple[str, ...] = ()
    queue_size: int = 4
    telemetry_interval: float = 10.0
    session_memory_mb: int = 256
    session_idle_s: float = 900.0
    min_available_mb: int = 150
    threads: int | None = None
    prefill_chunk: int | None = None  # tokens per prefill step (None: the engine's default; edgekit tune sets it)
    trusted_keys: tuple[Path, ...] = ()  # when set, only bundles signed by one of these keys are served
    # Serve even when the quality check on this device falls below the bundle's gate (the status says so).
    serve_below_quality_gate: bool = False
    # Draft with the bundle's MTP head where it has one (requests may opt out).
    speculative: bool = True
    # Where the quality check's result is kept between starts; None: systemd's CacheDirectory
    # ($CACHE_DIRECTORY), else ~/.cache/edgekit.
    cache_dir: Path | None = None
    # Serve Prometheus metrics on 127.0.0.1 at this port (None: off; a device otherwise only dials out).
    metrics_port: int | None = None
    # Home Assistant MQTT discovery (docs/home-assistant.md): on, under this topic prefix.
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    # Images (bundles with a vision encoder; docs/vision.md): each at most this many bytes as sent and
    # this many pixels as its header declares, this many per request; the encoder is unloaded after
    # this long without an image.
    max_image_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_images: int = 4
    vision_idle_s: float = 300.0
    # Uploaded images (serve/uploads.py): kept this long after their last use, this much in all and
    # per client.
    upload_ttl_s: float = 600.0
    upload_memory_mb: int = 64
    upload_client_mb: int = 16

    def __post_init__(self) -> None:
        if self.device_id is not None:
            check_level(self.device_id, "device id")
        for pool in self.pools:
            check_level(pool, "pool name")
        check_prefix(self.discovery_prefix, "discovery prefix")
        if self.pools and self.broker.protocol is broker_settings.MqttVersion.V311:
            raise EdgekitError("device pools need MQTT 5 (shared subscriptions); set broker.protocol to 5")

    def to_yaml(self) -> str:
        """The config file for this config: what :func:`load` reads back as an equal config. Fields at
        their defaults are left out, so a later release's defaults apply to them."""
        defaults = DaemonConfig(bundle=self.bundle)
        data: dict[str, Any] = {"bundle": str(self.bundle)}
        if self.device_id is not None:
            data["device_id"] = self.device_id
        if self.broker.prefix != defaults.broker.prefix:
            data["prefix"] = self.broker.prefix
        if self.pools:
            data["pools"] = list(self.pools)
        for name in ("queue_size", "telemetry_interval", "min_available_mb", "threads", "prefill_chunk", "metrics_port"):
            if getattr(self, name) != getattr(defaults, name):
                data[name] = getattr(self, name)
        if self.trusted_keys:
            data["trusted_keys"] = [str(k) for k in self.trusted_keys]
        if self.serve_below_quality_gate:
            data["serve_below_quality_gate"] = True
        if not self.speculative:
            data["speculative"] = False
        if (self.discovery, self.discovery_prefix) != (defaults.discovery, defaults.discovery_prefix):
            data["home_assistant"] = {"discovery": self.discovery, "prefix": self.discovery_prefix}
        if self.cache_dir is not None:
            data["cache_dir"] = str(self.cache_dir)
        data["broker"] = broker_settings.dump_section(self.broker)
        sessions = {key: getattr(self, name) for key, name in (("memory_mb", "session_memory_mb"), ("idle_s", "session_idle_s"))
                    if getattr(self, name) != getattr(defaults, name)}
        if sessions:
            data["sessions"] = sessions
        images = {key: getattr(self, name) for key, name in _IMAGE_FIELDS.items() if getattr(self, name) != getattr(defaults, name)}
        if images:
            data["images"] = images
        return yaml.safe_dump(data, sort_keys=False)


# The config file's ``images`` section: its keys and the DaemonConfig fields they set, with bounds.
_IMAGE_FIELDS = {"max_bytes": "max_image_bytes", "max_pixels": "max_image_pixels", "max_per_request": "max_images",
                 "idle_unload_s": "vision_idle_s", "upload_ttl_s": "upload_ttl_s", "upload_memory_mb": "upload_memory_mb",
                 "upload_client_mb": "upload_client_mb"}
_IMAGE_BOUNDS: dict[str, tuple[int, int, bool]] = {"max_bytes": (1024, 64 * 1024**2, True),
                                                    "max_pixels": (1024, 400_000_000, True),
                                                    "max_per_request": (1, 64, True),
                                                    "idle_unload_s": (1, 10_000_000, False),
                                                    "upload_ttl_s": (1, 10_000_000, False),
                                                    "upload_memory_mb": (0, 1_000_000, True),
                                                    "upload_client_mb": (0, 1_000_000, True)}


def load(path: Path | None, overrides: Mapping[str, Any] | None = None, broker: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """Build the config from ``path`` (optional), the environment, then the flags: ``overrides`` for
    daemon fields and ``broker`` for broker fields (None values skipped in both)."""
    values, broker_file = _read_file(path) if path else ({}, {})
    env = os.environ if environ is None else environ
    values.update({name: env[variable] for variable, name in ENVIRONMENT.items() if variable in env})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if "bundle" not in values:
        raise EdgekitError(f"no bundle to serve: give BUNDLE, 'bundle' in {path or 'the config file'}, or EDGEKIT_BUNDLE")
    settings = BrokerSettings.from_layers(broker_file, broker_settings.environment(env), broker or {})
    return DaemonConfig(
        bundle=Path(values.pop("bundle")), broker=settings,
        pools=tuple(values.pop("pools", ())), trusted_keys=tuple(Path(k) for k in values.pop("trusted_keys", ())),
        cache_dir=Path(values.pop("cache_dir")) if values.get("cache_dir") else None,
        **values,
    )


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The daemon fields and the broker fields a config file sets."""
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise EdgekitError(f"cannot read daemon config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise EdgekitError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from exc
    top = Fields(data or {}, where)
    broker = top.nested("broker", optional=True)
    sessions = top.nested("sessions", optional=True)
    home_assistant = top.nested("home_assistant", optional=True)
    images = top.nested("images", optional=True)
    values: dict[str, Any] = {
        "bundle": top.get("bundle", str, "a bundle folder path", None),
        "device_id": top.get("device_id", str, "a device id", None),
        "pools": top.get("pools", list, "a list of pool names", None),
        "trusted_keys": top.get("trusted_keys", list, "a list of paths to ed25519 public keys (PEM)", None),
        "serve_below_quality_gate": top.get("serve_below_quality_gate", bool, "true or false", None),
        "speculative": top.get("speculative", bool, "true or false", None),
        "cache_dir": top.get("cache_dir", str, "a folder path", None),
    }
    for name in ("pools", "trusted_keys"):
        if values[name] is not None and not all(isinstance(item, str) and item for item in values[name]):
            raise EdgekitError(f"{where}: field '{name}' must be a list of non-empty strings (got {values[name]!r})")
    # Topic levels are checked again by DaemonConfig; here the error can name the file's field.
    if values["device_id"] is not None:
        check_level(values["device_id"], f"{where}: field 'device_id'")
    for i, pool in enumerate(values["pools"] or ()):
        check_level(pool, f"{where}: field 'pools[{i}]'")
    prefix = top.get("prefix", str, "a topic prefix", None)
    if prefix is not None:
        check_prefix(prefix, f"{where}: field 'prefix'")
    limits = {"queue_size": (1, 1024, True), "telemetry_interval": (0.1, 86400, False),
              "min_available_mb": (0, 1_000_000, True), "threads": (1, 256, True), "prefill_chunk": (16, 4096, True),
              "metrics_port": (1, 65535, True)}
    for name, (low, high, integer) in limits.items():
        if name in top.data:
            values[name] = top.number(name, low, high, integer=integer)
    if "memory_mb" in sessions.data:
        values["session_memory_mb"] = sessions.number("memory_mb", 0, 1_000_000, integer=True)
    if "idle_s" in sessions.data:
        values["session_idle_s"] = sessions.number("idle_s", 1, 10_000_000)
    values["discovery"] = home_assistant.get("discovery", bool, "true or false", None)
    values["discovery_prefix"] = home_assistant.get("prefix", str, "a topic prefix (homeassistant)", None)
    if values["discovery_prefix"] is not None:
        check_prefix(values["discovery_prefix"], f"{where}: field 'home_assistant.prefix'")
    for key, (low, high, integer) in _IMAGE_BOUNDS.items():
        if key in images.data:
            values[_IMAGE_FIELDS[key]] = images.number(key, low, high, integer=integer)
    broker_values = broker_settings.parse_section(broker, prefix)
    for part in (top, broker, sessions, home_assistant, images):
        part.check_unknown()
    for name in ("telemetry_interval", "session_idle_s", "vision_idle_s", "upload_ttl_s"):
        if name in values:
            values[name] = float(values[name])
    return {k: v for k, v in values.items() if v is not None}, broker_values
