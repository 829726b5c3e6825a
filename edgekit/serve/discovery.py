"""Home Assistant MQTT discovery for a daemon: one device-based config that declares its sensors, a
prompt entity and the last answer (docs/home-assistant.md).

Every entity reads topics the daemon already publishes (the retained status for availability, the
retained telemetry for sensors), plus two for automations: ``<prefix>/v1/<device>/prompt`` takes a
plain-text prompt (Home Assistant's MQTT ``notify`` platform publishes one from
``notify.send_message``) and ``<prefix>/v1/<device>/answer`` holds the last answer, retained.
"""

from __future__ import annotations

import re
from typing import Any

from edgekit import __version__
from edgekit.mqtt.topics import DeviceTopics, HomeAssistantTopics, object_id

# A prompt from Home Assistant is plain text up to this many bytes (a chat request's history does not come this way).
PROMPT_MAX = 16 * 1024
# Home Assistant caps a state at 255 characters: the answer's state is a short form, the whole text an attribute.
STATE_MAX = 255


# (key, name, telemetry path, unit, device class, state class, icon)
_SENSORS: tuple[tuple[str, str, str, str | None, str | None, str | None, str], ...] = (
    ("decode", "Decode speed", "inference.decode_tokens_per_s", "tok/s", None, "measurement", "mdi:speedometer"),
    ("ttft", "Time to first token", "inference.ttft_p50_s", "s", "duration", "measurement", "mdi:timer-outline"),
    ("cpu", "CPU", "cpu.percent", "%", None, "measurement", "mdi:cpu-64-bit"),
    ("memory", "Daemon memory", "memory.process_rss_mb", "MiB", "data_size", "measurement", "mdi:memory"),
    ("queue", "Queue depth", "inference.queue_depth", None, None, "measurement", "mdi:tray-full"),
    ("served", "Requests served", "inference.completed", None, None, "total_increasing", "mdi:counter"),
)
_TEMPERATURE = ("temperature", "Temperature", "temperature_c", "°C", "temperature", "measurement", "mdi:thermometer")


def config(prefix: str, discovery_prefix: str, device_id: str, model: str, profile: str, bundle: str,
           has_temperature: bool) -> dict[str, Any]:
    """The device-based discovery payload (full key names; Home Assistant also takes its abbreviations)."""
    topics, ha = DeviceTopics.of(prefix, device_id), HomeAssistantTopics.of(prefix, discovery_prefix, device_id)
    ident = object_id(device_id)
    components: dict[str, Any] = {}
    for key, name, path, unit, device_class, state_class, icon in (*_SENSORS, *((_TEMPERATURE,) if has_temperature else ())):
        entry: dict[str, Any] = {"platform": "sensor", "unique_id": f"{ident}_{key}", "name": name,
                                 "state_topic": topics.telemetry, "value_template": f"{{{{ value_json.{path} }}}}",
                                 "state_class": state_class, "icon": icon, "entity_category": "diagnostic"}
        if unit:
            entry["unit_of_measurement"] = unit
        if device_class:
            entry["device_class"] = device_class
        components[key] = entry
    components["prompt"] = {"platform": "notify", "unique_id": f"{ident}_prompt", "name": "Prompt",
                            "command_topic": ha.prompt, "icon": "mdi:message-text"}
    components["answer"] = {"platform": "sensor", "unique_id": f"{ident}_answer", "name": "Last answer",
                            "state_topic": ha.answer, "value_template": "{{ value_json.short }}",
                            "json_attributes_topic": ha.answer, "icon": "mdi:message-reply-text"}
    return {
        "device": {"identifiers": [ident], "name": device_id, "manufacturer": "edgekit", "model": model,
                   "model_id": profile, "sw_version": __version__, "hw_version": bundle},
        "origin": {"name": "edgekit", "sw_version": __version__, "support_url": "https://github.com/edgekit/edgekit"},
        "availability": [{"topic": topics.status, "value_template": "{{ value_json.state }}"}],
        "components": components,
    }


def answer(request_id: str, text: str, finish_reason: str, tokens: int, error: str | None = None) -> dict[str, Any]:
    """The retained last answer: a state of at most 255 characters, the whole text as an attribute."""
    short = f"error: {error}" if error else text.strip()
    if len(short) > STATE_MAX:
        short = short[:STATE_MAX - 1] + "…"
    return {"short": short, "text": text, "finish_reason": finish_reason, "tokens": tokens, "request_id": request_id,
            **({"error": error} if error else {})}


def public_model_name(model_id: str, revision: str | None) -> str:
    """What a device announces as its model: a hub id (the build pinned a revision of it) as it is, a
    local checkpoint by its folder's name, never the build machine's path."""
    if revision:
        return model_id
    return re.split(r"[\\/]", model_id.rstrip("/\\"))[-1] or model_id
