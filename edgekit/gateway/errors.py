"""What the gateway answers when it cannot serve a request: an HTTP status and an error body; and
the checks both API shapes make on a chat request before anything reaches a device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A device's protocol error code -> (HTTP status, OpenAI error type, OpenAI error code).
_DEVICE_ERRORS: dict[str, tuple[int, str, str]] = {
    "bad_request": (400, "invalid_request_error", "bad_request"),
    "too_large": (413, "invalid_request_error", "too_large"),
    # OpenAI's own code for the same condition, which clients already handle.
    "context_exceeded": (400, "invalid_request_error", "context_length_exceeded"),
    "busy": (429, "rate_limit_error", "busy"),
    "expired": (504, "timeout_error", "expired"),
    "cancelled": (503, "server_error", "cancelled"),
    "session_evicted": (409, "invalid_request_error", "session_evicted"),
    "resources": (503, "server_error", "resources"),
    "shutting_down": (503, "server_error", "shutting_down"),
    "internal": (502, "server_error", "device_error"),
}


@dataclass
class GatewayError(Exception):
    """A refusal with its HTTP status; ``retry_after`` (seconds) becomes a Retry-After header."""

    status: int
    message: str
    code: str
    kind: str = "invalid_request_error"
    param: str | None = None
    retry_after: int | None = None

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_device(cls, code: str, message: str, retry_after: int) -> GatewayError:
        """The HTTP form of a device's ``error`` reply (docs/gateway.md has the table)."""
        status, kind, openai_code = _DEVICE_ERRORS.get(code, (502, "server_error", "device_error"))
        again = retry_after if status in (429, 503) else None
        return cls(status, message, openai_code, kind, retry_after=again)

    def openai_body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_param(name: str, why: str) -> GatewayError:
    """A 400 that names the request field at fault."""
    return GatewayError(400, f"parameter '{name}': {why}", "invalid_parameter", param=name)


def chat_basics(body: dict[str, Any], listing: str, max_messages: int, stream_default: bool) -> tuple[str, list[Any], bool]:
    """A chat body's ``model``, ``messages`` and ``stream``, checked; ``listing`` names where models are listed."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_param("model", f"must name a device or pool ({listing})")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "must be a non-empty list")
    if len(messages) > max_messages:
        raise bad_param("messages", f"holds {len(messages)} messages; this gateway takes at most {max_messages}")
    stream = body.get("stream", stream_default)
    if not isinstance(stream, bool):
        raise bad_param("stream", "must be true or false")
    return model, messages, stream
