"""Topic names and the checks that keep configuration and requests from reaching other devices' topics.

A device id, pool or prefix level containing ``/``, ``+`` or ``#`` would widen the daemon's
subscriptions to other devices' requests; a reply topic with a wildcard or an empty level cannot be
published at all. Both are refused here, once, for the daemon, the client and provisioning alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgekit.errors import EdgekitError

VERSION = "v1"
# MQTT's own limit on a topic name (a 16-bit length prefix on the wire).
MAX_TOPIC_BYTES = 65535
_FORBIDDEN = ("/", "+", "#", "\0")


def check_level(value: object, what: str) -> str:
    """``value`` as one topic level (a device id or pool name); raise naming ``what`` otherwise."""
    if not isinstance(value, str) or not value:
        raise EdgekitError(f"{what} must be a non-empty string (got {value!r})")
    if bad := [c for c in _FORBIDDEN if c in value]:
        shown = ", ".join(repr(c) for c in bad)
        raise EdgekitError(f"{what} {value!r} must be one MQTT topic level: no {shown} (they would match other devices' topics)")
    if value.startswith("$"):
        raise EdgekitError(f"{what} {value!r} must not start with '$' (reserved for broker topics)")
    return value


def check_prefix(prefix: object, what: str = "topic prefix") -> str:
    """``prefix`` as one or more topic levels (``edgekit``, ``site-a/edgekit``)."""
    if not isinstance(prefix, str) or not prefix:
        raise EdgekitError(f"{what} must be a non-empty string (got {prefix!r})")
    for level in prefix.split("/"):
        if not level:
            raise EdgekitError(f"{what} {prefix!r} has an empty level (a leading, trailing or doubled '/')")
        check_level(level, f"{what} level")
    return prefix


def publish_topic_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be published to (a wildcard, an empty level, NUL, too long), or None."""
    if not topic:
        return "it is empty"
    if "+" in topic or "#" in topic:
        return "it contains a wildcard ('+' or '#')"
    if "\0" in topic:
        return "it contains a NUL character"
    if "" in topic.split("/"):
        return "it has an empty level"
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        return f"it is longer than {MAX_TOPIC_BYTES} bytes"
    return None


def reply_prefix(prefix: str) -> str:
    """Where replies may go: every reply topic a device publishes to starts with this."""
    return f"{prefix}/{VERSION}/replies/"


@dataclass(frozen=True)
class DeviceTopics:
    """One device's topics under a prefix."""

    request: str
    cancel: str
    status: str
    telemetry: str
    images: str  # uploads go below it: <images>/<client scope>/<sha256> (serve/uploads.py)

    @classmethod
    def of(cls, prefix: str, device_id: str) -> DeviceTopics:
        base = f"{check_prefix(prefix)}/{VERSION}/{check_level(device_id, 'device id')}"
        return cls(f"{base}/request", f"{base}/cancel", f"{base}/status", f"{base}/telemetry", f"{base}/images")


@dataclass(frozen=True)
class PoolTopics:
    """A device pool's topics: a request reaches one member (MQTT 5 shared subscription), a cancel all."""

    request: str
    cancel: str
    shared_request: str

    @classmethod
    def of(cls, prefix: str, pool: str) -> PoolTopics:
        base = f"{check_prefix(prefix)}/{VERSION}/pool/{check_level(pool, 'pool name')}"
        return cls(f"{base}/request", f"{base}/cancel", f"$share/{pool}/{base}/request")


# A Home Assistant discovery topic's object id: letters, digits, '_' and '-' only.
_OBJECT_ID = re.compile(r"[^a-zA-Z0-9_-]")


@dataclass(frozen=True)
class HomeAssistantTopics:
    """Where a device's discovery config, prompts and answers live."""

    config: str
    prompt: str
    answer: str

    @classmethod
    def of(cls, prefix: str, discovery_prefix: str, device_id: str) -> HomeAssistantTopics:
        base = f"{check_prefix(prefix)}/{VERSION}/{check_level(device_id, 'device id')}"
        return cls(f"{check_prefix(discovery_prefix, 'discovery prefix')}/device/{object_id(device_id)}/config",
                   f"{base}/prompt", f"{base}/answer")


def object_id(device_id: str) -> str:
    """The device's id in Home Assistant: ``edgekit_`` and the device id with other characters as ``_``."""
    return "edgekit_" + _OBJECT_ID.sub("_", device_id)


def all_devices(prefix: str, kind: str) -> str:
    """The wildcard subscription to one kind of message (``status``, ``telemetry``) from every device."""
    return f"{prefix}/{VERSION}/+/{kind}"
