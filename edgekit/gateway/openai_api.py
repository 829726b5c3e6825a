"""OpenAI's chat-completions shape, translated to and from edgekit's protocol (docs/gateway.md).

A parameter edgekit supports maps onto the protocol. One it does not support is ignored at its
default value and refused, by name, at any other: a client that asks for ``n: 3`` or logprobs must
not silently get less than it asked for.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from edgekit.gateway.errors import bad_param, chat_basics

# Parameters without an equivalent on the device, with the values that ask for nothing special.
_IGNORED_AT_DEFAULT: dict[str, tuple[Any, ...]] = {
    "n": (1, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logprobs": (False, None),
    "top_logprobs": (0, None),
    "logit_bias": (None, {}),
    "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (False, None),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "audio": (None,),
    "web_search_options": (None,),
    "functions": (None,),
    "function_call": (None,),
}
# Accepted and not forwarded: they identify the end user to OpenAI, and mean nothing to a device.
_ACCEPTED = {"user", "safety_identifier", "prompt_cache_key"}
# Passed to the protocol unchanged (it validates them and names the field if one is wrong).
_FORWARDED = ("temperature", "top_p", "seed", "stop", "tools", "tool_choice", "parallel_tool_calls", "response_format",
              "thinking", "top_k")
_OWN = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "session", "new_session"}
# The protocol's finish reasons in OpenAI's vocabulary: "context" and "shutdown" cut the reply short.
FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "context": "length",
                  "shutdown": "length", "cancelled": "stop"}


@dataclass
class ChatRequest:
    """A validated chat-completions request: where it goes and the protocol request to send there."""

    model: str
    stream: bool
    include_usage: bool
    session: str | None
    request: dict[str, Any]


def parse_chat(body: Any, max_messages: int, max_tokens_cap: int) -> ChatRequest:
    """Validate a ``POST /v1/chat/completions`` body; raise 400 naming the first parameter at fault."""
    if not isinstance(body, dict):
        raise bad_param("body", "must be a JSON object")
    for name in sorted(body):
        if name in _IGNORED_AT_DEFAULT:
            if body[name] not in _IGNORED_AT_DEFAULT[name]:
                raise bad_param(name, f"is not supported by edgekit devices (only {_IGNORED_AT_DEFAULT[name][0]!r})")
        elif name not in _ACCEPTED and name not in _OWN and name not in _FORWARDED:
            raise bad_param(name, "is not a chat-completions parameter edgekit knows")
    model, messages, stream = chat_basics(body, "GET /v1/models", max_messages, stream_default=False)
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage", "include_obfuscation"}):
        raise bad_param("stream_options", "takes only include_usage")
    request: dict[str, Any] = {"messages": [_message(m, i) for i, m in enumerate(messages)]}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        which = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise bad_param(which, "must be a positive integer")
        if limit > max_tokens_cap:
            raise bad_param(which, f"is {limit}; this gateway allows at most {max_tokens_cap}")
        request["max_tokens"] = limit
    for name in _FORWARDED:
        if body.get(name) is not None:
            request[name] = body[name]
    session = body.get("session")
    if session is not None and not (isinstance(session, str) and 0 < len(session) <= 64):
        raise bad_param("session", "must be a string of 1-64 characters")
    if body.get("new_session") is not None:
        request["new_session"] = body["new_session"]
    return ChatRequest(model, stream, bool(options and options.get("include_usage")), session, request)


def _message(message: Any, i: int) -> dict[str, Any]:
    """One message in the protocol's form: text parts joined unless images come with them, images
    passed on as data URLs (the gateway fetches no remote URL), ``developer`` read as ``system``."""
    if not isinstance(message, dict):
        raise bad_param(f"messages[{i}]", "must be an object")
    out = dict(message)
    if out.get("role") == "developer":
        out["role"] = "system"
    content = out.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url" and isinstance(part.get("image_url"), dict) and isinstance(part["image_url"].get("url"), str):
                url = part["image_url"]["url"]
                if not url.startswith("data:"):
                    raise bad_param(f"messages[{i}].content[{j}].image_url.url",
                                    "must be a data: URL (base64 JPEG, PNG or WebP); this gateway fetches no remote image")
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                raise bad_param(f"messages[{i}].content[{j}]", f"only text and image_url parts are supported (got {kind!r})")
        has_image = any(part["type"] == "image_url" for part in parts)
        out["content"] = parts if has_image else "".join(part["text"] for part in parts)
    for echoed in ("refusal", "annotations", "audio", "function_call"):
        # An assistant message that a client echoes back carries these, empty for an edgekit reply.
        if not out.get(echoed):
            out.pop(echoed, None)
    return out


def tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The final message's tool calls as OpenAI's: arguments as JSON text. A call the device could not
    read keeps its ``error`` beside empty arguments, so that it is reported, never dropped."""
    out = []
    for call in calls:
        arguments = call["function"]["arguments"]
        entry: dict[str, Any] = {"id": call["id"], "type": "function",
                                 "function": {"name": call["function"]["name"],
                                              "arguments": json.dumps(arguments if arguments is not None else {})}}
        if call.get("error"):
            entry["error"] = call["error"]
        out.append(entry)
    return out


def usage(final: dict[str, Any]) -> dict[str, int]:
    """OpenAI's usage; in a session also ``session_tokens``, the tokens the device holds for it after this turn."""
    used = final["usage"]
    prompt, completion = used["prompt_tokens"], used["completion_tokens"]
    body = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if final.get("session") is not None and used.get("session_tokens") is not None:
        body["session_tokens"] = used["session_tokens"]
    return body


def completion(completion_id: str, model: str, text: str, final: dict[str, Any], reasoning: str = "") -> dict[str, Any]:
    """The non-streaming response body; the thinking block goes in ``reasoning_content`` (as llama.cpp's
    server and vLLM put it), never in ``content``."""
    calls = tool_calls(final.get("tool_calls") or [])
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH_REASONS.get(final["finish_reason"], "stop")}],
            "usage": usage(final), "system_fingerprint": final.get("device_id")}


class ChunkWriter:
    """Builds the stream's ``chat.completion.chunk`` objects for one request."""

    def __init__(self, completion_id: str, model: str) -> None:
        self.id, self.model, self.created = completion_id, model, int(time.time())

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def from_reply(self, reply: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks one device reply becomes (none for ``queued``)."""
        kind = reply["type"]
        if kind == "chunk":
            return [self.chunk({"reasoning_content" if reply.get("reasoning") else "content": reply["text"]})]
        if kind == "tool_call":
            return [self.chunk({"tool_calls": [{"index": reply["index"], "id": reply["call_id"], "type": "function",
                                                "function": {"name": reply["name"], "arguments": ""}}]})]
        if kind == "final":
            # The arguments come whole in the final message: one delta per call completes it.
            deltas = [self.chunk({"tool_calls": [{"index": i, "function": {"arguments": call["function"]["arguments"]},
                                                  **({"error": call["error"]} if "error" in call else {})}]})
                      for i, call in enumerate(tool_calls(reply.get("tool_calls") or []))]
            return [*deltas, self.chunk({}, FINISH_REASONS.get(reply["finish_reason"], "stop"))]
        return []

    def usage(self, final: dict[str, Any]) -> dict[str, Any]:
        """The extra last chunk that ``stream_options.include_usage`` asks for."""
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(final)}


def models_list(models: list[Any]) -> dict[str, Any]:
    """``GET /v1/models``: OpenAI's list, with edgekit's fields beside the standard ones."""
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": int(m.since), "owned_by": "edgekit", "kind": m.kind,
         "bundle": m.bundle, "base_model": m.model, "profile": m.profile, "context_length": m.context_length,
         **({"members": list(m.members)} if m.members else {})} for m in models]}
