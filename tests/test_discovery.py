"""Home Assistant discovery: payloads checked against Home Assistant's own schema (as read from its
source by tests/ha_contract.py), and a real daemon on a real Mosquitto announcing itself, answering a
prompt from the notify entity, and rendering its sensors' templates."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path

import jinja2
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from edgekit.cli import main
from edgekit.client import DeviceClient
from edgekit.mqtt.topics import DeviceTopics, HomeAssistantTopics, object_id
from edgekit.serve.config import DaemonConfig
from edgekit.serve.discovery import STATE_MAX, answer, config, public_model_name

from .conftest import broker_at, start_daemon
from .ha_contract import CONTRACT

HA = json.loads(CONTRACT.read_text())


def check_against_home_assistant(topic: str, payload: dict) -> None:
    """What Home Assistant's DEVICE_DISCOVERY_SCHEMA and its platforms' schemas would say (keys, required
    keys, enumerations); value types and template rendering are checked separately below."""
    match = re.fullmatch(HA["topic_matcher"], topic.split("/", 1)[1])
    assert match and match["component"] == "device", topic

    def keys_fit(data: dict, schema: dict, where: str, extra: set[str] = frozenset()) -> None:
        allowed = set(schema["required"]) | set(schema["optional"]) | extra
        assert set(data) <= allowed, f"{where}: keys Home Assistant does not know: {set(data) - allowed}"
        assert set(schema["required"]) <= set(data), f"{where}: missing {set(schema['required']) - set(data)}"

    keys_fit(payload, HA["device_discovery"], "device discovery")
    keys_fit(payload["device"], HA["device"], "device")
    assert payload["device"].get("identifiers") or payload["device"].get("connections")  # validate_device_has_at_least_one_identifier
    keys_fit(payload["origin"], HA["origin"], "origin")
    for entry in payload.get("availability", []):
        assert set(entry) <= {"topic", "payload_available", "payload_not_available", "value_template"} and "topic" in entry
    for name, component in payload["components"].items():
        platform = component["platform"]
        assert platform in HA["supported_components"] and platform in HA["platforms"], platform
        keys_fit(component, HA["platforms"][platform], f"component {name}", extra={"platform"})
        assert component.get("unique_id")  # check_unique_id: every entity of a device config needs one
        if "device_class" in component:
            assert component["device_class"] in HA["sensor_device_classes"], component
        if "state_class" in component:
            assert component["state_class"] in HA["sensor_state_classes"], component
        if "entity_category" in component:
            assert component["entity_category"] in HA["entity_categories"], component


def render(template: str, payload: bytes) -> str:
    """A value template as Home Assistant renders it: Jinja with the payload parsed as ``value_json``."""
    return jinja2.Environment().from_string(template).render(value_json=json.loads(payload), value=payload.decode())


def test_payload_fits_home_assistants_schema() -> None:
    for temperature in (True, False):
        payload = config("edgekit", "homeassistant", "kitchen.2", "Qwen3.5-0.8B", "raspberry-pi-5", "qwen3.5-0.8b-pi5-int4",
                         has_temperature=temperature)
        check_against_home_assistant(HomeAssistantTopics.of("edgekit", "homeassistant", "kitchen.2").config, payload)
        assert ("temperature" in payload["components"]) is temperature
    assert object_id("kitchen.2") == "edgekit_kitchen_2"
    assert HA["source"].startswith("homeassistant 2026.")


def test_answer_state_fits_in_255_characters() -> None:
    long = answer("r1", "word " * 200, "length", 200)
    assert len(long["short"]) == STATE_MAX and long["text"] == "word " * 200
    assert answer("r2", "", "error", 0, error="busy: queue full")["short"] == "error: busy: queue full"


def test_model_name_keeps_build_paths_out() -> None:
    assert public_model_name("/tmp/pytest-of-root/tiny0/qwen3.5-tiny", None) == "qwen3.5-tiny"
    assert public_model_name("fixtures/qwen3.5-0.8b/", None) == "qwen3.5-0.8b"
    assert public_model_name("Qwen/Qwen3.5-0.8B", "a1b2c3") == "Qwen/Qwen3.5-0.8B"


class Listener:
    """A plain MQTT subscriber that keeps every message on a topic, retained or live."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[bytes] = []
        self._news = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        with self._news:
            self.messages.append(message.payload)
            self._news.notify_all()

    def wait(self, match=lambda payload: True, timeout: float = 10.0) -> bytes:
        with self._news:
            assert self._news.wait_for(lambda: any(match(m) for m in self.messages), timeout), f"no match in {self.messages[-3:]}"
            return [m for m in self.messages if match(m)][-1]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _retained(port: int, topic: str) -> bytes:
    listener = Listener(port, topic)
    try:
        return listener.wait()
    finally:
        listener.close()


def test_daemon_announces_itself_and_answers_prompts(host_bundle: Path, broker: int, tiny_checkpoint: Path) -> None:
    device = f"ha-{uuid.uuid4().hex[:6]}"
    topics, ha = DeviceTopics.of("edgekit", device), HomeAssistantTopics.of("edgekit", "homeassistant", device)
    samples = Listener(broker, topics.telemetry)
    daemon, thread = start_daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(broker), device_id=device, telemetry_interval=0.3))
    try:
        announced = json.loads(_retained(broker, ha.config))
        check_against_home_assistant(ha.config, announced)
        status = _retained(broker, topics.status)
        assert render(announced["availability"][0]["value_template"], status) == "online"
        assert json.loads(status)["model"] == tiny_checkpoint.name  # the folder's name, not the build machine's path
        assert announced["device"]["model"] == tiny_checkpoint.name
        # every sensor renders from the telemetry: a number, or None (unknown) before the first request
        telemetry = samples.wait()
        first = json.loads(samples.messages[0])
        samples.close()
        assert first["cpu"]["percent"] > 0.0  # primed: the first sample is not psutil's first-call 0.0
        for component in announced["components"].values():
            if component["platform"] == "sensor" and component["state_topic"] == topics.telemetry:
                value = render(component["value_template"], telemetry)
                assert value == "None" or float(value) >= 0, (component["name"], value)
        # the notify entity publishes plain text to its command topic; the answer comes back retained
        prompt = announced["components"]["prompt"]
        answers = Listener(broker, ha.answer)
        with DeviceClient(broker_at(broker)) as client:
            client.publish(prompt["command_topic"], "Is the front door locked?")
            body = answers.wait(lambda p: b'"finish_reason": "error"' not in p, timeout=60)
            client.publish(prompt["command_topic"], b"\xff\xfe not text")
            refused = answers.wait(lambda p: b'"error": "bad_request' in p, timeout=30)
        answers.close()
        last = announced["components"]["answer"]
        state = render(last["value_template"], body)
        assert len(state) <= STATE_MAX and json.loads(body)["text"].strip().startswith(state[:20])
        assert "bad_request" in json.loads(refused)["error"]
        assert daemon.metrics.snapshot()["completed"] >= 1
    finally:
        daemon.stop()
        thread.join(timeout=30)
    # switched off, the daemon removes what it announced: an empty retained config
    configs = Listener(broker, ha.config)
    quiet, thread = start_daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(broker), device_id=device, discovery=False))
    try:
        configs.wait(lambda p: p == b"")
    finally:
        configs.close()
        quiet.stop()
        thread.join(timeout=30)
    after = Listener(broker, ha.config)
    time.sleep(0.5)
    after.close()
    assert after.messages == []  # nothing retained any more


@pytest.mark.parametrize("prefix", ["", "home/#", "a//b"])
def test_bad_discovery_prefix_is_refused(host_bundle: Path, prefix: str) -> None:
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match="discovery prefix"):
        DaemonConfig(bundle=host_bundle, discovery_prefix=prefix)


def test_forget_clears_what_a_gone_device_left_retained(host_bundle: Path, broker: int) -> None:
    device = f"gone-{uuid.uuid4().hex[:6]}"
    topics, ha = DeviceTopics.of("edgekit", device), HomeAssistantTopics.of("edgekit", "homeassistant", device)
    daemon, thread = start_daemon(DaemonConfig(bundle=host_bundle, broker=broker_at(broker), device_id=device, telemetry_interval=0.3))
    try:
        _retained(broker, topics.telemetry)
        forget = CliRunner().invoke(main, ["forget", device, "--port", str(broker)])
        assert forget.exit_code != 0 and "is online" in forget.output  # a live daemon would announce itself again
    finally:
        daemon.stop()
        thread.join(timeout=30)
    assert _retained(broker, ha.config)  # still announced after a stop
    forget = CliRunner().invoke(main, ["forget", device, "--port", str(broker), "--json"])
    assert forget.exit_code == 0, forget.output
    assert set(json.loads(forget.output)["cleared"]) == {topics.status, topics.telemetry, ha.answer, ha.config}
    for topic in (topics.status, topics.telemetry, ha.config):
        after = Listener(broker, topic)
        time.sleep(0.5)
        after.close()
        assert after.messages == [], topic
