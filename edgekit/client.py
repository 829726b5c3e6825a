"""A small MQTT client for edgekit devices, used by ``edgekit ask`` / ``edgekit status`` and by programs."""

from __future__ import annotations

import json
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgekit.errors import EdgekitError
from edgekit.serve import protocol
from edgekit.serve.mqtt import configure_transport, negotiate_protocol


class DeviceClient:
    """Connects to a broker; sends requests to devices and collects their streamed replies."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, prefix: str = "edgekit", mqtt_version: str = "5",
                 timeout: float = 10.0, username: str | None = None, password: str | None = None,
                 tls_ca: Path | None = None, tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
        if mqtt_version == "auto":
            mqtt_version = negotiate_protocol(host, port, username, password, tls_ca, tls_cert, tls_key, timeout)
        self.prefix, self.v5 = prefix, mqtt_version == "5"
        self.client_id = f"edgekit-client-{uuid.uuid4().hex[:12]}"
        # Under the user name when there is one, so a broker ACL can give each client user its own replies.
        owner = f"{username}/" if username else ""
        self.reply_base = f"{prefix}/{protocol.VERSION}/replies/{owner}{self.client_id}"
        self._inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._held: dict[str, list[dict[str, Any]]] = {}  # replies read while waiting for another request
        self._connected = threading.Event()
        self._subscriptions: list[str] = []
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                   protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311)
        self._client.on_connect = self._on_connect
        self._client.on_message = lambda c, u, message: self._inbox.put(message)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._refusal: str | None = None
        configure_transport(self._client, username, password, tls_ca, tls_cert, tls_key)
        properties = None
        if self.v5:
            # Replies published while a broker restarts wait in this session for a few minutes.
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 300
        try:
            self._client.connect(host, port, keepalive=30, properties=properties)
        except (OSError, ssl.SSLError) as exc:
            raise EdgekitError(f"cannot reach the MQTT broker at {host}:{port} ({exc})") from exc
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            why = f"refused: {self._refusal}" if self._refusal else f"no answer within {timeout:g} s"
            raise EdgekitError(f"the MQTT broker at {host}:{port} did not accept the connection ({why})")
        self._subscribe(f"{self.reply_base}/#")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refusal = str(reason)
            client.disconnect()  # a refusal (bad credentials) does not get better by retrying
            return
        for topic in self._subscriptions:  # after a reconnect to a broker that lost our session
            client.subscribe(topic, qos=1)
        self._connected.set()

    def _subscribe(self, topic: str) -> None:
        # Subscribing again is how statuses() gets the retained messages anew; remember each topic
        # once for resubscribing after a reconnect.
        if topic not in self._subscriptions:
            self._subscriptions.append(topic)
        done = threading.Event()
        self._client.on_subscribe = lambda *args: done.set()
        self._client.subscribe(topic, qos=1)
        done.wait(5)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(self, topic: str, payload: str | bytes, properties: Properties | None = None) -> None:
        """Publish at QoS 1 and wait until the broker has it."""
        self._client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(5)

    def send(self, device_id: str | None, request: dict[str, Any], expiry_s: int | None = None,
             pool: str | None = None) -> str:
        """Publish a request (QoS 1) to a device, or to one member of ``pool``; return the request id."""
        request = {"id": uuid.uuid4().hex, **request}
        reply_topic = f"{self.reply_base}/{request['id']}"
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = reply_topic
            properties.CorrelationData = request["id"].encode()
            if expiry_s is not None:
                properties.MessageExpiryInterval = expiry_s
        else:
            request["reply_to"] = reply_topic
        if pool:
            topic = protocol.pool_topics(self.prefix, pool)["request"]
        elif device_id:
            topic = protocol.topics(self.prefix, device_id)["request"]
        else:
            raise EdgekitError("name a device or a pool to send the request to")
        self.publish(topic, json.dumps(request), properties)
        return request["id"]

    def cancel(self, device_id: str, request_id: str) -> None:
        self.publish(protocol.topics(self.prefix, device_id)["cancel"], json.dumps({"id": request_id}))

    def replies(self, request_id: str, timeout: float = 120.0) -> Any:
        """Yield reply messages (dicts) for ``request_id`` until its final or error message."""
        deadline = time.monotonic() + timeout
        held = self._held.pop(request_id, [])
        while True:
            if held:
                reply = held.pop(0)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EdgekitError(f"no final reply to request {request_id} within {timeout:g} s")
                try:
                    message = self._inbox.get(timeout=remaining)
                except queue.Empty:
                    continue
                if message.topic.endswith("/status"):
                    continue
                reply = json.loads(message.payload)
                if reply.get("id") != request_id:
                    self._held.setdefault(reply.get("id"), []).append(reply)
                    continue
            yield reply
            if reply.get("type") in ("final", "error"):
                return

    def ask(self, device_id: str | None, request: dict[str, Any], on_text: Callable[[str], None] | None = None,
            timeout: float = 120.0, pool: str | None = None) -> dict[str, Any]:
        """Send a request (to a device or a pool) and wait for its final message; raise on an error reply."""
        request_id = self.send(device_id, request, pool=pool)
        for reply in self.replies(request_id, timeout):
            if reply["type"] == "chunk" and on_text:
                on_text(reply["text"])
            elif reply["type"] == "error":
                target = f"device {device_id}" if device_id else f"pool {pool}"
                raise EdgekitError(f"{target}: {reply['code']}: {reply['message']}")
            elif reply["type"] == "final":
                return reply
        raise AssertionError("unreachable")

    def wait_for_state(self, device_id: str, state: str, timeout: float = 30.0,
                       alive: Callable[[], bool] = lambda: True,
                       match: Callable[[dict[str, Any]], bool] = lambda status: True) -> dict[str, Any]:
        """Poll retained statuses until ``device_id`` reports ``state`` (and ``match`` accepts the status);
        raise after ``timeout`` or once ``alive()`` turns false (e.g. the daemon process exited)."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while True:
            last = self.statuses(0.3).get(device_id, last)
            if last.get("state") == state and match(last):
                return last
            if not alive() or time.monotonic() > deadline:
                seen = f"last status: {last.get('state')}, bundle {last.get('bundle')}" if last else "no status seen"
                raise EdgekitError(f"device {device_id} did not become {state} within {timeout:g} s ({seen})")

    def statuses(self, wait_s: float = 1.0) -> dict[str, dict[str, Any]]:
        """The retained status of every device under the prefix, with its latest telemetry under "telemetry"."""
        self._subscribe(f"{self.prefix}/{protocol.VERSION}/+/status")
        self._subscribe(f"{self.prefix}/{protocol.VERSION}/+/telemetry")
        found: dict[str, dict[str, Any]] = {}
        telemetry: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + wait_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = self._inbox.get(timeout=remaining)
            except queue.Empty:
                break
            kind = message.topic.rsplit("/", 1)[-1]
            if kind not in ("status", "telemetry"):
                continue
            try:
                data = json.loads(message.payload)
            except json.JSONDecodeError:
                continue
            device = message.topic.split("/")[-2]
            (found if kind == "status" else telemetry)[device] = data
        for device, status in found.items():
            if device in telemetry:
                status["telemetry"] = telemetry[device]
        return found
