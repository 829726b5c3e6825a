"""A small MQTT client for edgekit devices, used by ``edgekit ask`` / ``edgekit status`` and by programs.

Example::

    from edgekit.client import DeviceClient
    from edgekit.mqtt.settings import BrokerSettings

    with DeviceClient(BrokerSettings(host="broker.local")) as client:
        final = client.ask("kitchen", {"messages": [{"role": "user", "content": "Is the oven on?"}]},
                           on_text=lambda text: print(text, end=""))
        # An image goes as a content part (image_part reads a file or takes bytes):
        question = [image_part("door.jpg"), {"type": "text", "text": "Is anyone at the door?"}]
        answer = client.chat("porch", {"messages": [{"role": "user", "content": question}]})
"""

from __future__ import annotations

import base64
import json
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgekit.agent.tools import ToolCall
from edgekit.errors import EdgekitError
from edgekit.mqtt import protocol
from edgekit.mqtt.connection import negotiate_protocol, new_client
from edgekit.mqtt.protocol import UPLOAD_REF, upload_reference
from edgekit.mqtt.settings import BrokerSettings, MqttVersion
from edgekit.mqtt.topics import DeviceTopics, HomeAssistantTopics, PoolTopics, all_devices


class PoolFull(EdgekitError):
    """The broker had no subscriber for a pool request: every member is full (members leave their
    pools while their queue is full) or none is online. Retry later, as for ``busy``."""



_IMAGE_TYPES = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png"}


def image_part(image: str | Path | bytes) -> dict[str, Any]:
    """An OpenAI-style image content part for a request: a JPEG, PNG or WebP file (or its bytes) as a
    data URL. Devices check the image themselves; this only refuses what is none of those formats."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    mime = next((kind for magic, kind in _IMAGE_TYPES.items() if data.startswith(magic)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None:
        where = "the image bytes" if isinstance(image, bytes) else str(image)
        raise EdgekitError(f"{where}: not a JPEG, PNG or WebP image")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}

@dataclass
class Answer:
    """A finished reply: its text, tool calls, why it ended, and the final message as sent."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    final: dict[str, Any] = field(default_factory=dict)
    reasoning: str = ""  # the thinking block's text (requests with ``thinking: true``)


class DeviceClient:
    """Connects to a broker; sends requests to devices and collects their streamed replies.

    Statuses and telemetry of the devices under the prefix are kept up to date as they arrive, once
    asked for (:meth:`statuses`, :meth:`device_status`).
    """

    def __init__(self, settings: BrokerSettings | None = None, timeout: float = 10.0) -> None:
        self.settings = settings = negotiate_protocol(settings or BrokerSettings(), timeout)
        self.prefix, self.v5 = settings.prefix, settings.protocol is MqttVersion.V5
        self.client_id = f"edgekit-client-{uuid.uuid4().hex[:12]}"
        # Under the user name when there is one, so a broker ACL can give each client user its own replies.
        owner = f"{settings.username}/" if settings.username else ""
        self.reply_base = f"{settings.reply_prefix}{owner}{self.client_id}"
        self._inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._held: dict[str, list[dict[str, Any]]] = {}  # replies read while waiting for another request
        self._connected = threading.Event()
        self._subscriptions: list[str] = []
        self._status: dict[str, dict[str, Any]] = {}  # device id -> latest status
        self._telemetry: dict[str, dict[str, Any]] = {}  # device id -> latest telemetry
        self._news = threading.Condition()
        # request id -> callback that takes its replies as they arrive, on paho's thread (the gateway's way
        # of serving many requests at once); replies to other requests queue for :meth:`replies`.
        self._listeners: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._client = new_client(settings, self.client_id)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._acks: dict[int, Any] = {}  # message id -> the broker's PUBACK reason (MQTT 5)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._refusal: str | None = None
        properties = None
        if self.v5:
            # Replies published while a broker restarts wait in this session for a few minutes.
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 300
        try:
            self._client.connect(settings.host, settings.port, keepalive=30, properties=properties)
        except (OSError, ssl.SSLError) as exc:
            raise EdgekitError(f"cannot reach the MQTT broker at {settings.address} ({exc})") from exc
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            why = f"refused: {self._refusal}" if self._refusal else f"no answer within {timeout:g} s"
            raise EdgekitError(f"the MQTT broker at {settings.address} did not accept the connection ({why})")
        self._subscribe(f"{self.reply_base}/#")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refusal = str(reason)
            client.disconnect()  # a refusal (bad credentials) does not get better by retrying
            return
        for topic in self._subscriptions:  # after a reconnect to a broker that lost our session
            client.subscribe(topic, qos=1)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        levels = message.topic.split("/")
        kind = levels[-1]
        # <prefix>/v1/<device>/status|telemetry; replies have more levels below replies/.
        if kind in ("status", "telemetry") and "/".join(levels[:-2]) == f"{self.prefix}/{protocol.VERSION}":
            seen = self._status if kind == "status" else self._telemetry
            if not message.payload:  # an empty retained message: the device was removed from the fleet
                with self._news:
                    seen.pop(levels[-2], None)
                return
            try:
                data = json.loads(message.payload)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return
            with self._news:
                seen[levels[-2]] = data
                self._news.notify_all()
            return
        if self._listeners:
            try:
                reply = json.loads(message.payload)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return
            listener = self._listeners.get(str(reply.get("id"))) if isinstance(reply, dict) else None
            if listener:
                listener(reply)
                return
        self._inbox.put(message)

    def _subscribe(self, topic: str) -> None:
        # Remember each topic once, for resubscribing after a reconnect.
        if topic in self._subscriptions:
            return
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

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._acks[mid] = reason  # called before wait_for_publish returns

    def publish(self, topic: str, payload: str | bytes, properties: Properties | None = None, retain: bool = False) -> bool:
        """Publish at QoS 1 and wait until the broker has it; False when an MQTT 5 broker said that
        nobody subscribes to the topic (reason 0x10, "no matching subscribers")."""
        info = self._client.publish(topic, payload, qos=1, properties=properties, retain=retain)
        info.wait_for_publish(5)
        reason = self._acks.pop(info.mid, None)
        return getattr(reason, "value", 0) != 0x10

    def upload_image(self, device_id: str, image: str | Path | bytes) -> dict[str, Any]:
        """Upload an image (a JPEG, PNG or WebP file, or its bytes) to a device once, raw; return the
        image part that names it in later requests to that device (``sha256:<hex>``). The device keeps
        it for its requests only for a while (docs/protocol.md, "Images")."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        image_part(data)  # the same check as an inline image: JPEG, PNG or WebP
        url = upload_reference(data)
        scope = self.reply_base[len(self.settings.reply_prefix):]
        topic = f"{DeviceTopics.of(self.prefix, device_id).images}/{scope}/{url[len(UPLOAD_REF):]}"
        if not self.publish(topic, data):
            raise EdgekitError(f"device {device_id} takes no image uploads (offline, or its bundle is text-only)")
        return {"type": "image_url", "image_url": {"url": url}}

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
            topic = PoolTopics.of(self.prefix, pool).request
        elif device_id:
            topic = DeviceTopics.of(self.prefix, device_id).request
        else:
            raise EdgekitError("name a device or a pool to send the request to")
        if not self.publish(topic, json.dumps(request), properties) and pool:
            raise PoolFull(f"pool {pool}: no member took the request (all are full, or none is online); retry later")
        return str(request["id"])

    def cancel(self, device_id: str | None, request_id: str, pool: str | None = None) -> None:
        """Stop a request on the device, or on whichever member of ``pool`` holds it."""
        topic = PoolTopics.of(self.prefix, pool).cancel if pool else DeviceTopics.of(self.prefix, str(device_id)).cancel
        self.publish(topic, json.dumps({"id": request_id}))

    def listen(self, request_id: str, callback: Callable[[dict[str, Any]], None] | None) -> None:
        """Hand ``request_id``'s replies to ``callback`` (on the MQTT thread) as they arrive; None stops.
        Listen before :meth:`send` with the same id, so that no reply arrives unheard."""
        if callback is None:
            self._listeners.pop(request_id, None)
        else:
            self._listeners[request_id] = callback

    def replies(self, request_id: str, timeout: float = 120.0) -> Iterator[dict[str, Any]]:
        """Yield reply messages (dicts) for ``request_id`` until its final or error message."""
        deadline = time.monotonic() + timeout
        while True:
            # Replies another generator read while this one waited are held for it: look each time.
            held = self._held.get(request_id)
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
                try:
                    reply = json.loads(message.payload)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if reply.get("id") != request_id:
                    self._held.setdefault(reply.get("id"), []).append(reply)
                    continue
            yield reply
            if reply.get("type") in ("final", "error"):
                self._held.pop(request_id, None)
                return

    def ask(self, device_id: str | None, request: dict[str, Any], on_text: Callable[[str], None] | None = None,
            timeout: float = 120.0, pool: str | None = None,
            on_call: Callable[[dict[str, Any]], None] | None = None,
            on_reasoning: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Send a request (to a device or a pool) and wait for its final message; raise on an error reply,
        and at once for a device that is unknown to the broker or offline. ``on_call`` hears each
        tool call as it forms (``{"index", "call_id", "name"}``); the calls themselves are in the final.
        ``on_reasoning`` hears the thinking block's text (without it, ``on_text`` does)."""
        if device_id and not pool:
            self.require_online(device_id)
        request_id = self.send(device_id, request, pool=pool)
        for reply in self.replies(request_id, timeout):
            if reply["type"] == "chunk" and reply.get("reasoning") and on_reasoning:
                on_reasoning(reply["text"])
            elif reply["type"] == "chunk" and on_text:
                on_text(reply["text"])
            elif reply["type"] == "tool_call" and on_call:
                on_call(reply)
            elif reply["type"] == "error":
                target = f"device {device_id}" if device_id else f"pool {pool}"
                raise EdgekitError(f"{target}: {reply['code']}: {reply['message']}")
            elif reply["type"] == "final":
                return reply
        raise AssertionError("unreachable")

    def chat(self, device_id: str | None, request: dict[str, Any], on_text: Callable[[str], None] | None = None,
             timeout: float = 120.0, pool: str | None = None) -> Answer:
        """:meth:`ask`, returning the answer's text and its tool calls as objects."""
        pieces: list[str] = []
        thoughts: list[str] = []

        def collect(text: str) -> None:
            pieces.append(text)
            if on_text:
                on_text(text)

        final = self.ask(device_id, request, collect, timeout, pool, on_reasoning=thoughts.append)
        calls = [ToolCall.from_dict(call) for call in final.get("tool_calls", [])]
        return Answer("".join(pieces), calls, final["finish_reason"], final, "".join(thoughts))

    def wait_for_state(self, device_id: str, state: str, timeout: float = 30.0,
                       alive: Callable[[], bool] = lambda: True,
                       match: Callable[[dict[str, Any]], bool] = lambda status: True) -> dict[str, Any]:
        """Wait until ``device_id`` reports ``state`` (and ``match`` accepts the status); raise after
        ``timeout`` or once ``alive()`` turns false (e.g. the daemon process exited)."""
        self._subscribe(DeviceTopics.of(self.prefix, device_id).status)
        deadline = time.monotonic() + timeout
        with self._news:
            while True:
                last = self._status.get(device_id, {})
                if last.get("state") == state and match(last):
                    return dict(last)
                if not alive() or time.monotonic() > deadline:
                    seen = f"last status: {last.get('state')}, bundle {last.get('bundle')}" if last else "no status seen"
                    raise EdgekitError(f"device {device_id} did not become {state} within {timeout:g} s ({seen})")
                self._news.wait(0.2)

    def device_status(self, device_id: str, wait_s: float = 2.0) -> dict[str, Any] | None:
        """The device's retained status (None if the broker has none within ``wait_s``)."""
        self._subscribe(DeviceTopics.of(self.prefix, device_id).status)
        with self._news:
            self._news.wait_for(lambda: device_id in self._status, wait_s)
            status = self._status.get(device_id)
        return dict(status) if status else None

    def require_online(self, device_id: str, wait_s: float = 2.0) -> dict[str, Any]:
        """The device's status if it is online; else an error naming the device and the broker."""
        status = self.device_status(device_id, wait_s)
        where = f"the broker at {self.settings.address} (prefix {self.prefix})"
        if status is None:
            raise EdgekitError(f"device {device_id} is unknown to {where}: it has no retained status; "
                               f"check the device id and prefix, and that its daemon has connected once")
        if status.get("state") != "online":
            raise EdgekitError(f"device {device_id} is {status.get('state', 'not online')} on {where}")
        return status

    def forget(self, device_id: str, discovery_prefix: str = "homeassistant") -> list[str]:
        """Clear what a device left retained (status, telemetry, last answer, Home Assistant discovery
        config), so that dashboards, Home Assistant and gateways forget it; refuses an online device.
        Returns the topics cleared."""
        status = self.device_status(device_id)
        if status is not None and status.get("state") == "online":
            raise EdgekitError(f"device {device_id} is online on {self.settings.address}: stop its daemon first, "
                               "or it announces itself again")
        device, ha = DeviceTopics.of(self.prefix, device_id), HomeAssistantTopics.of(self.prefix, discovery_prefix, device_id)
        topics = [device.status, device.telemetry, ha.answer, ha.config]
        for topic in topics:
            self.publish(topic, b"", retain=True)
        return topics

    def statuses(self, wait_s: float = 1.0) -> dict[str, dict[str, Any]]:
        """The status of every device under the prefix, with its latest telemetry under "telemetry".

        The first call waits ``wait_s`` for the broker's retained messages; later ones return at once.
        """
        topics = [all_devices(self.prefix, "status"), all_devices(self.prefix, "telemetry")]
        if not all(topic in self._subscriptions for topic in topics):
            for topic in topics:
                self._subscribe(topic)
            time.sleep(wait_s)
        with self._news:
            return {device: {**status, **({"telemetry": self._telemetry[device]} if device in self._telemetry else {})}
                    for device, status in self._status.items()}
