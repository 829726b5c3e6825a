"""The MQTT wire protocol: topics, request validation, and the messages a device sends back.

Version 1 of the contract, documented in docs/protocol.md. Every reply carries the request ``id``;
a stream is chunks numbered from 0, then exactly one ``final`` or one ``error``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgekit.agent.grammar import ReplyFormat, grammar_problem
from edgekit.agent.tools import ToolCall, ToolError, parse_tool_choice, parse_tools
from edgekit.mqtt.topics import VERSION, publish_topic_problem
from edgekit.runtime.images import ImageError, ImageLimits, data_url_bytes, open_image
from edgekit.runtime.sampling import Sampling

__all__ = ["VERSION", "ERROR_CODES", "ProtocolError", "Request", "Status", "parse_request", "parse_cancel", "reply_topic",
           "queued", "chunk", "tool_call", "final", "error", "telemetry"]
MAX_PAYLOAD = 256 * 1024  # bytes; a 4k-token conversation is far below this
MAX_IMAGES = 4  # per request, by default
# An image part's URL naming an image uploaded before (edgekit.serve.uploads): sha256:<64 hex digits>.
UPLOAD_REF = "sha256:"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_PART_TYPES = ("text", "image_url")

# Error codes: the complete list a client may receive.
ERROR_CODES = {
    "bad_request": "payload is not valid JSON, or a field is missing, unknown or of the wrong type",
    "too_large": "payload exceeds the size limit",
    "context_exceeded": "prompt plus history does not fit the bundle's context length",
    "busy": "the request queue is full; retry later",
    "expired": "the request's deadline or message expiry passed before it could run",
    "cancelled": "a cancel message stopped the request",
    "session_evicted": "the named session is no longer held on the device; resend the history",
    "resources": "the device is short of memory; new work is refused until it recovers",
    "shutting_down": "the daemon is stopping and takes no new work",
    "internal": "an unexpected error on the device",
}

_REQUEST_FIELDS = {
    "id", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "session",
    "thinking", "reply_to", "deadline", "new_session", "speculative",
    "tools", "tool_choice", "parallel_tool_calls", "response_format",
}
_MESSAGE_FIELDS = {"role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content"}


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold on this device. ``images`` None: the device takes no images (its
    bundle is text-only). A request with images may be larger than :data:`MAX_PAYLOAD` by the
    base64 of ``max_images`` images of the largest size."""

    images: ImageLimits | None = None
    max_images: int = MAX_IMAGES

    @property
    def max_payload(self) -> int:
        if self.images is None:
            return MAX_PAYLOAD
        return MAX_PAYLOAD + self.max_images * (self.images.max_bytes * 4 // 3 + 64)


class ProtocolError(Exception):
    """A request the device refuses; ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.request_id = code, message, request_id
        # The refused payload's own ``reply_to``, when it parsed far enough to have one.
        self.reply_to: str | None = None


@dataclass
class Request:
    """A validated generation request."""

    id: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    session: str | None = None
    new_session: bool = False
    thinking: bool = False
    speculative: bool = True
    fmt: ReplyFormat = field(default_factory=ReplyFormat)  # tools, tool_choice, response_format
    # The images of ``messages`` in order of appearance: encoded as sent (header checked), or the
    # ``sha256:<hex>`` reference of an upload (edgekit.serve.uploads), which the daemon resolves. Each
    # part that held one is ``{"type": "image"}`` in ``messages``, as chat templates expect.
    images: list[bytes | str] = field(default_factory=list)
    reply_to: str | None = None
    deadline: float | None = None
    received_at: float = field(default_factory=time.time)


def _check(condition: bool, message: str, request_id: str | None) -> None:
    if not condition:
        raise ProtocolError("bad_request", message, request_id)


def parse_request(payload: bytes | bytearray, limits: RequestLimits = RequestLimits()) -> Request:
    """Validate a request payload; raise :class:`ProtocolError` naming the offending field."""
    if len(payload) > limits.max_payload:
        raise ProtocolError("too_large", f"payload of {len(payload)} bytes exceeds {limits.max_payload}")
    try:
        data = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_request", f"payload is not valid JSON: {exc}") from exc
    _check(isinstance(data, dict), "payload must be a JSON object", None)
    try:
        return _validate(data, limits)
    except ProtocolError as exc:
        reply_to = data.get("reply_to")
        exc.reply_to = reply_to if isinstance(reply_to, str) else None
        raise


def _validate(data: dict[str, Any], limits: RequestLimits) -> Request:
    rid = data.get("id")
    if not (isinstance(rid, str) and 0 < len(rid) <= 128):
        raise ProtocolError("bad_request", "field 'id' must be a string of 1-128 characters", rid if isinstance(rid, str) else None)
    unknown = sorted(set(data) - _REQUEST_FIELDS)
    _check(not unknown, f"unknown field '{unknown[0] if unknown else ''}'", rid)
    messages, prompt = data.get("messages"), data.get("prompt")
    _check((messages is None) != (prompt is None), "give exactly one of 'messages' or 'prompt'", rid)
    images: list[bytes | str] = []
    if messages is not None:
        _check(isinstance(messages, list) and len(messages) > 0, "field 'messages' must be a non-empty list", rid)
        messages = [_message(m, i, rid, images, limits) for i, m in enumerate(messages)]
    if prompt is not None:
        _check(isinstance(prompt, str) and prompt != "", "field 'prompt' must be a non-empty string", rid)

    def number(name: str, kind: type, low: float, high: float, default: Any) -> Any:
        value: Any = data.get(name, default)
        ok = isinstance(value, kind) and isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = low <= value <= high, float(value)
        _check(ok, f"field '{name}' must be {'an integer' if kind is int else 'a number'} from {low} to {high}", rid)
        return value

    stop = data.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    _check(isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= 8,
           "field 'stop' must be a string or a list of up to 8 non-empty strings", rid)
    session = data.get("session")
    _check(session is None or (isinstance(session, str) and 0 < len(session) <= 128),
           "field 'session' must be a string of 1-128 characters", rid)
    for flag in ("thinking", "new_session", "speculative"):
        _check(isinstance(data.get(flag, False), bool), f"field '{flag}' must be true or false", rid)
    reply_to = data.get("reply_to")
    _check(reply_to is None or (isinstance(reply_to, str) and publish_topic_problem(reply_to) is None),
           "field 'reply_to' must be a topic one can publish to (no wildcards, no empty levels)", rid)
    deadline = data.get("deadline")
    _check(deadline is None or (isinstance(deadline, int | float) and not isinstance(deadline, bool)),
           "field 'deadline' must be a Unix time in seconds", rid)
    seed = data.get("seed")
    _check(seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63),
           "field 'seed' must be a non-negative integer", rid)
    fmt = _reply_format(data, rid)
    return Request(
        id=rid,
        messages=messages,
        prompt=prompt,
        max_tokens=number("max_tokens", int, 1, 32768, 256),
        sampling=Sampling(
            temperature=number("temperature", float, 0.0, 5.0, 0.0),
            top_p=number("top_p", float, 0.0, 1.0, 1.0),
            top_k=number("top_k", int, 0, 1000, 0),
            seed=seed,
        ),
        stop=stop,
        session=session,
        new_session=data.get("new_session", False),
        thinking=data.get("thinking", False),
        speculative=data.get("speculative", True),
        fmt=fmt,
        images=images,
        reply_to=reply_to,
        deadline=float(deadline) if deadline is not None else None,
    )


def _message(message: Any, i: int, rid: str, images: list[bytes | str], limits: RequestLimits) -> dict[str, Any]:
    """One chat message, normalised for the chat template: tool-call arguments become objects, and
    image parts ``{"type": "image"}`` with their bytes appended to ``images``."""
    at = f"messages[{i}]"
    _check(isinstance(message, dict) and isinstance(message.get("role"), str), f"field '{at}' must be an object with a string 'role'", rid)
    role = message["role"]
    _check(role in ("system", "user", "assistant", "tool"), f"field '{at}.role' must be system, user, assistant or tool", rid)
    unknown = sorted(set(message) - _MESSAGE_FIELDS)
    _check(not unknown, f"unknown field '{at}.{unknown[0] if unknown else ''}'", rid)
    calls = message.get("tool_calls")
    content = message.get("content")
    if isinstance(content, list):
        message = {**message, "content": _parts(content, f"{at}.content", role, rid, images, limits)}
    else:
        # OpenAI's assistant message that only calls tools has a null (or no) content.
        _check(isinstance(content, str) or (role == "assistant" and calls and content is None),
               f"field '{at}.content' must be a string or a list of parts", rid)
    for key in ("tool_call_id", "name", "reasoning_content"):
        _check(key not in message or isinstance(message[key], str), f"field '{at}.{key}' must be a string", rid)
    if calls is None:
        return dict(message)
    _check(role == "assistant" and isinstance(calls, list), f"field '{at}.tool_calls' must be a list on an assistant message", rid)
    normalised = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", {}) if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                arguments = None
        _check(isinstance(name, str) and isinstance(arguments, dict),
               f"field '{at}.tool_calls[{j}]' must be {{\"function\": {{\"name\": ..., \"arguments\": object or JSON object text}}}}", rid)
        normalised.append({**call, "function": {"name": name, "arguments": arguments}})
    return {**message, "content": message.get("content") or "", "tool_calls": normalised}


def _parts(parts: list[Any], at: str, role: str, rid: str, images: list[bytes | str],
           limits: RequestLimits) -> list[dict[str, Any]]:
    """OpenAI's content parts: text, and images as data URLs (checked up to their headers here; the
    device decodes them when the request runs) or as ``sha256:<hex>`` references to uploads."""
    _check(len(parts) > 0, f"field '{at}' must be a non-empty list of parts", rid)
    normalised: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        where = f"{at}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        _check(kind in _PART_TYPES, f"field '{where}.type' must be one of {', '.join(_PART_TYPES)}", rid)
        if kind == "text":
            _check(set(part) == {"type", "text"} and isinstance(part["text"], str),
                   f"field '{where}' must be {{\"type\": \"text\", \"text\": string}}", rid)
            normalised.append({"type": "text", "text": part["text"]})
            continue
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else None
        _check(set(part) == {"type", "image_url"} and isinstance(url, str),
               f"field '{where}' must be {{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:image/...;base64,...\"}}}}", rid)
        _check(role in ("user", "tool"), f"field '{where}': images may come in user and tool messages only", rid)
        if limits.images is None:
            raise ProtocolError("bad_request", f"field '{where}': this device's bundle is text-only (built without "
                                "its vision encoder) and takes no images", rid)
        _check(len(images) < limits.max_images, f"field '{where}': more than {limits.max_images} images in one request", rid)
        assert isinstance(url, str)  # checked just above
        try:
            if url.startswith(UPLOAD_REF):
                if upload_digest(url) is None:
                    raise ImageError(f"field '{where}.image_url.url': an uploaded image is named sha256:<64 lowercase hex digits>")
                images.append(url)  # an upload, checked when it arrived
            else:
                data = data_url_bytes(url, f"field '{where}.image_url.url'")
                open_image(data, limits.images, f"field '{where}.image_url.url'")
                images.append(data)
        except ImageError as exc:
            raise ProtocolError("bad_request", str(exc), rid) from None
        normalised.append({"type": "image"})
    return normalised


def _reply_format(data: dict[str, Any], rid: str) -> ReplyFormat:
    """``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``response_format``; a schema the
    grammar engine cannot compile is refused here, naming the feature, before the request queues."""
    try:
        tools = parse_tools(data["tools"]) if data.get("tools") is not None else []
        # A session's later turn may force a call without resending the tools its first turn sent:
        # the choice is checked against those when the turn runs.
        later_turn = bool(data.get("session")) and not data.get("new_session") and not tools
        choice = parse_tool_choice(data.get("tool_choice"), None if later_turn else tools)
    except ToolError as exc:
        raise ProtocolError("bad_request", str(exc), rid) from None
    _check(isinstance(data.get("parallel_tool_calls", True), bool), "field 'parallel_tool_calls' must be true or false", rid)
    response_format = data.get("response_format")
    schema = None
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        _check(kind in ("text", "json_object", "json_schema"),
               "field 'response_format.type' must be text, json_object or json_schema", rid)
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            _check(isinstance(spec, dict) and isinstance(spec.get("schema"), dict),
                   "field 'response_format.json_schema.schema' must be a JSON Schema object", rid)
            schema = spec["schema"]
    fmt = ReplyFormat(json_schema=schema, tools=tuple(tools), choice=choice,
                      parallel_tool_calls=data.get("parallel_tool_calls", True))
    _check(not (schema is not None and fmt.tool_choice.forced),
           "fields 'response_format' and a 'tool_choice' that forces a call cannot be combined", rid)
    if (tools or not fmt.tool_choice.forced) and (problem := grammar_problem(fmt)):
        raise ProtocolError("bad_request", f"field '{'response_format' if schema is not None else 'tools'}': {problem}", rid)
    return fmt


def upload_reference(data: bytes) -> str:
    """The URL of an uploaded image: ``sha256:`` and its digest."""
    return UPLOAD_REF + hashlib.sha256(data).hexdigest()


def upload_digest(url: str) -> str | None:
    """The digest a ``sha256:<hex>`` URL names; None when it is not one."""
    digest = url[len(UPLOAD_REF):] if url.startswith(UPLOAD_REF) else ""
    return digest if _DIGEST.fullmatch(digest) else None


def parse_cancel(payload: bytes | bytearray) -> str | None:
    """The request id a cancel message names, or None for a payload that is not ``{"id": "..."}``."""
    try:
        request_id = json.loads(payload).get("id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return request_id if isinstance(request_id, str) else None


def reply_topic(response_topic: str | None, reply_to: str | None, allowed_prefix: str) -> tuple[str | None, str]:
    """Where to answer a request: its MQTT 5 ResponseTopic, else its payload's ``reply_to``.

    Returns ``(topic, "")``, or ``(None, why)`` when there is none or it may not be used: outside
    ``allowed_prefix`` (a device is no relay for arbitrary topics) or not a valid publish topic.
    """
    topic = response_topic or reply_to
    if not topic:
        return None, "no reply topic (MQTT 5 ResponseTopic or 'reply_to')"
    if not topic.startswith(allowed_prefix):
        return None, f"reply topic {topic[:200]!r} is outside {allowed_prefix}"
    if problem := publish_topic_problem(topic):
        return None, f"reply topic {topic[:200]!r} cannot be published to: {problem}"
    return topic, ""


def queued(request_id: str, position: int) -> bytes:
    """The first reply to an accepted request: its place in the queue (1 = next to run)."""
    return _dump({"id": request_id, "type": "queued", "position": position})


def chunk(request_id: str, seq: int, text: str, reasoning: bool = False) -> bytes:
    """Streamed text; ``reasoning`` marks the thinking block's (``thinking: true``), which is not the answer."""
    body: dict[str, Any] = {"id": request_id, "type": "chunk", "seq": seq, "text": text}
    if reasoning:
        body["reasoning"] = True
    return _dump(body)


def tool_call(request_id: str, seq: int, index: int, call: ToolCall) -> bytes:
    """A call forming in the stream: announced once its function name is known (the arguments come in ``final``)."""
    return _dump({"id": request_id, "type": "tool_call", "seq": seq, "index": index, "call_id": call.id, "name": call.name})


def final(request_id: str, seq: int, finish_reason: str, usage: dict[str, int], timings: dict[str, float | None],
          session: str | None = None, device_id: str | None = None, tool_calls: list[ToolCall] | None = None) -> bytes:
    body: dict[str, Any] = {"id": request_id, "type": "final", "seq": seq, "finish_reason": finish_reason, "usage": usage,
                            "timings": timings, "session": session, "device_id": device_id}
    if tool_calls:
        body["tool_calls"] = [call.as_dict() for call in tool_calls]
    return _dump(body)


def telemetry(sample: dict[str, Any]) -> bytes:
    """A telemetry message from a resource sample (``edgekit.serve.telemetry.collect``)."""
    return _dump(sample)


def error(request_id: str | None, code: str, message: str, seq: int | None = None) -> bytes:
    assert code in ERROR_CODES, code
    body: dict[str, Any] = {"id": request_id, "type": "error", "code": code, "message": message}
    if seq is not None:
        body["seq"] = seq
    return _dump(body)


@dataclass(frozen=True)
class Status:
    """A device's retained status: what it serves and whether it is online."""

    device_id: str
    state: str  # online or offline
    version: str
    bundle: str
    model: str
    profile: str
    context_length: int
    capabilities: dict[str, bool]
    since: float
    quality: dict[str, Any] | None = None  # the quality check on this device (docs/schema/v1/status.json)
    pools: tuple[str, ...] = ()  # the pools it serves, so that a gateway can list and route to them
    # The Int4Layout kernel its int4 matmuls run on (avx512-vnni, avx2); None: ONNX Runtime's own.
    int4_layout: str | None = None

    def with_state(self, state: str) -> Status:
        return replace(self, state=state)

    def encode(self) -> bytes:
        return _dump(asdict(self))


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
