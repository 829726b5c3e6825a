"""The published JSON Schemas (docs/schema/v1) describe what the daemon really sends and accepts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import paho.mqtt.client as mqtt
import pytest

from edgekit.client import DeviceClient
from edgekit.mqtt import protocol
from edgekit.serve.daemon import Daemon
from tests.conftest import broker_at

SCHEMAS = Path(__file__).parent.parent / "docs" / "schema" / "v1"


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def test_error_codes_match_the_implementation() -> None:
    assert set(schema("error")["properties"]["code"]["enum"]) == set(protocol.ERROR_CODES)
    documented = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    for code in protocol.ERROR_CODES:
        assert f"| `{code}` |" in documented, code


@pytest.mark.parametrize(
    "payload",
    [
        {"id": "a", "prompt": "x"},
        {"id": "a", "messages": [{"role": "user", "content": "hi"}], "stop": "\n", "seed": 3, "session": "s"},
        {"id": "a", "prompt": "x", "colour": 1},
        {"id": "a"},
        {"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "a", "prompt": "x", "max_tokens": 0},
        {"id": "a", "messages": [{"role": "robot", "content": "hi"}]},
        {"id": "a", "prompt": "x", "reply_to": "a/#"},
        {"id": "a", "prompt": "x", "reply_to": "edgekit/v1/replies//a"},
        {"id": "a", "prompt": "x", "reply_to": "edgekit/v1/replies/c/a"},
        {"id": "", "prompt": "x"},
        {"id": "a", "prompt": "x", "speculative": False},
        {"id": "a", "prompt": "x", "speculative": "no"},
        {"id": "a", "prompt": "x", "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
         "tool_choice": "required", "parallel_tool_calls": False},
        {"id": "a", "prompt": "x", "tools": [{"type": "function", "function": {"name": "f", "colour": 1}}]},
        {"id": "a", "prompt": "x", "tool_choice": "sometimes"},
        {"id": "a", "prompt": "x", "response_format": {"type": "json_object"}},
        {"id": "a", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}},
        {"id": "a", "prompt": "x", "response_format": {"type": "yaml"}},
        {"id": "a", "messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": None, "tool_calls": [
                                     {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
                                 {"role": "tool", "tool_call_id": "c", "content": "ok"}]},
        {"id": "a", "messages": [{"role": "user", "content": None}]},
        {"id": "a", "messages": [{"role": "user", "content": "hi", "mood": "ok"}]},
    ],
)
def test_request_schema_agrees_with_the_parser(payload: dict) -> None:
    valid_by_schema = jsonschema.Draft202012Validator(schema("request")).is_valid(payload)
    try:
        protocol.parse_request(json.dumps(payload).encode())
        valid_by_parser = True
    except protocol.ProtocolError:
        valid_by_parser = False
    assert valid_by_schema == valid_by_parser


def test_every_message_the_daemon_sends_matches_its_schema(daemon: Daemon, broker: int) -> None:
    seen: list[tuple[str, dict]] = []
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    watcher.on_message = lambda c, u, m: seen.append((m.topic, json.loads(m.payload)))
    watcher.connect("127.0.0.1", broker)
    watcher.loop_start()
    watcher.subscribe("edgekit/v1/#", qos=1)
    time.sleep(0.3)
    with DeviceClient(broker_at(broker)) as client:
        client.ask(daemon.config.device_id, {"prompt": "hi", "max_tokens": 4, "session": "schema"})
        client.publish(f"edgekit/v1/{daemon.config.device_id}/request",
                       json.dumps({"id": "bad", "prompt": 3, "reply_to": f"{client.reply_base}/x"}))
        time.sleep(1.5)  # a telemetry interval
    watcher.loop_stop()
    watcher.disconnect()
    kinds = set()
    for topic, message in seen:
        if topic.endswith(("/request", "/cancel")):
            continue
        name = message.get("type") or topic.rsplit("/", 1)[-1]
        jsonschema.validate(message, schema(name))
        kinds.add(name)
    assert {"queued", "chunk", "final", "error", "status", "telemetry"} <= kinds
