"""Ollama's ``/api/chat`` and ``/api/tags`` shapes, for clients that speak Ollama: Home Assistant's
core Ollama integration among them (docs/gateway.md has what its source sends).

Ollama streams by default (NDJSON lines), sends tool-call arguments as objects, and reports its
errors as ``{"error": "..."}``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
from typing import Any

from edgekit.client import image_part
from edgekit.errors import EdgekitError
from edgekit.gateway.errors import bad_param, chat_basics

# Options that tune Ollama's own runtime and change nothing in a reply: the device's context length
# and threads are fixed by its bundle and config (Home Assistant sends num_ctx with every request).
_RUNTIME_HINTS = {"num_ctx", "num_keep", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "num_thread", "numa",
                  "low_vram", "vocab_only"}
# Sampling options the device does not have, with their neutral values.
_NEUTRAL = {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0, "typical_p": 1.0,
            "mirostat": 0, "tfs_z": 1.0, "repeat_last_n": 64, "penalize_newline": False}
_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop"}
# The protocol's finish reasons as Ollama's done_reason.
_DONE = {"stop": "stop", "tool_calls": "stop", "length": "length", "context": "length", "shutdown": "length", "cancelled": "stop"}


def parse_chat(body: Any, max_messages: int, max_tokens_cap: int) -> tuple[str, bool, dict[str, Any]]:
    """Validate a ``POST /api/chat`` body: (model, stream, protocol request); raise 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_param("body", "must be a JSON object")
    unknown = set(body) - {"model", "messages", "tools", "stream", "format", "options", "keep_alive", "think"}
    if unknown:
        raise bad_param(sorted(unknown)[0], "is not an /api/chat field edgekit knows")
    model, messages, stream = chat_basics(body, "GET /api/tags", max_messages, stream_default=True)
    request: dict[str, Any] = {"messages": [_message(m, i) for i, m in enumerate(messages)]}
    if body.get("tools"):
        request["tools"] = body["tools"]
    fmt = body.get("format")
    if fmt == "json":
        request["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        request["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise bad_param("format", "must be \"json\" or a JSON Schema object")
    think = body.get("think")
    if think is not None:
        if not isinstance(think, bool | str):
            raise bad_param("think", "must be true, false, or a level (low, medium, high)")
        request["thinking"] = bool(think)
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad_param("options", "must be an object")
    for name, value in options.items():
        if name in _OPTIONS:
            request[_OPTIONS[name]] = value
        elif name == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool) or value == 0 or value < -2:
                raise bad_param("options.num_predict", "must be a positive integer, -1 (no limit) or -2 (fill the context)")
            if value > max_tokens_cap:
                raise bad_param("options.num_predict", f"is {value}; this gateway allows at most {max_tokens_cap}")
            if value > 0:
                request["max_tokens"] = value
        elif name in _NEUTRAL:
            if value != _NEUTRAL[name]:
                raise bad_param(f"options.{name}", f"is not supported by edgekit devices (only {_NEUTRAL[name]!r})")
        elif name not in _RUNTIME_HINTS:
            raise bad_param(f"options.{name}", "is not an option edgekit knows")
    return model, stream, request


def _message(message: Any, i: int) -> dict[str, Any]:
    """One Ollama message in the protocol's form (``thinking`` is the protocol's ``reasoning_content``)."""
    if not isinstance(message, dict):
        raise bad_param(f"messages[{i}]", "must be an object")
    out = {k: v for k, v in message.items() if k not in ("images", "thinking", "tool_name") and v is not None}
    images = message.get("images")
    if images:
        # Ollama sends images as bare base64; the protocol takes OpenAI's image parts (data URLs).
        if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
            raise bad_param(f"messages[{i}].images", "must be a list of base64-encoded images")
        parts = []
        for j, encoded in enumerate(images):
            try:
                parts.append(image_part(base64.b64decode(encoded, validate=True)))
            except (binascii.Error, EdgekitError) as exc:
                raise bad_param(f"messages[{i}].images[{j}]", f"is not a base64 JPEG, PNG or WebP image ({exc})") from None
        text = out.get("content") or ""
        out["content"] = parts + ([{"type": "text", "text": text}] if text else [])
    if message.get("thinking"):
        out["reasoning_content"] = message["thinking"]
    if message.get("tool_name"):
        out["name"] = message["tool_name"]
    out.setdefault("content", "")
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def chunk(model: str, text: str, thinking: bool = False) -> dict[str, Any]:
    """One streamed piece: the thinking block's text goes in ``thinking``, as Ollama sends it."""
    message = {"role": "assistant", "content": "", "thinking": text} if thinking else {"role": "assistant", "content": text}
    return {"model": model, "created_at": _now(), "message": message, "done": False}


def calls_message(model: str, final: dict[str, Any]) -> dict[str, Any] | None:
    """The streamed message that carries a reply's tool calls (Ollama sends them whole), or None."""
    calls = final.get("tool_calls") or []
    if not calls:
        return None
    return {"model": model, "created_at": _now(), "done": False,
            "message": {"role": "assistant", "content": "", "tool_calls": _calls(calls)}}


def _calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"] or {}}} for c in calls]


def done(model: str, final: dict[str, Any], elapsed_s: float, text: str | None = None, thinking: str = "") -> dict[str, Any]:
    """The last line of a stream (``text`` None), or the whole non-streaming reply."""
    timings, used = final.get("timings", {}), final["usage"]
    ns = 1_000_000_000
    decode_tps = timings.get("decode_tokens_per_s") or 0.0
    message: dict[str, Any] = {"role": "assistant", "content": text or ""}
    if text is not None and final.get("tool_calls"):
        message["tool_calls"] = _calls(final["tool_calls"])
    if thinking:
        message["thinking"] = thinking
    return {"model": model, "created_at": _now(), "message": message, "done": True,
            "done_reason": _DONE.get(final["finish_reason"], "stop"),
            "total_duration": int(elapsed_s * ns), "load_duration": 0,
            "prompt_eval_count": used["prompt_tokens"],
            "prompt_eval_duration": int((timings.get("time_to_first_token_s") or 0.0) * ns),
            "eval_count": used["completion_tokens"],
            "eval_duration": int(used["completion_tokens"] / decode_tps * ns) if decode_tps else 0}


def tags(models: list[Any]) -> dict[str, Any]:
    """``GET /api/tags``: the online devices and pools as Ollama's local models."""
    return {"models": [{
        "name": m.name, "model": m.name,
        "modified_at": datetime.datetime.fromtimestamp(m.since, datetime.timezone.utc).isoformat().replace("+00:00", "Z"),
        "size": 0, "digest": hashlib.sha256(m.bundle.encode()).hexdigest(),
        "details": {"parent_model": "", "format": "onnx", "family": "qwen3_5", "families": ["qwen3_5"],
                    "parameter_size": "", "quantization_level": m.bundle.rsplit("-", 1)[-1]},
    } for m in models]}
