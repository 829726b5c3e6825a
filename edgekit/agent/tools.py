"""Tool definitions, tool choice, and Qwen3.5's tool-call markup turned into structured calls.

Qwen3.5 calls tools in an XML-like form (its published chat template teaches it)::

    <tool_call>
    <function=set_light>
    <parameter=room>
    kitchen
    </parameter>
    <parameter=on>
    true
    </parameter>
    </function>
    </tool_call>

String values are bare text; other values are JSON (the template writes mappings and lists with
``tojson`` and scalars with ``string``, so ``True`` and ``False`` are accepted for booleans too).
Each value is converted to the type the tool's parameter schema declares.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgekit.errors import EdgekitError

# jsonschema is imported where a request first brings tools: the daemon imports this module at start,
# and a device that never sees tools keeps its memory (docs/agent.md).

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
THINK_CLOSE = "</think>"  # ends Qwen3.5's thinking block (one token)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FUNCTION = re.compile(r"^\s*<function=([^>\n]*)>\n?(.*?)\n?</function>\s*$", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>\n?(.*?)\n?</parameter>", re.S)


class ToolError(EdgekitError):
    """A tool definition or tool choice the device refuses; the message names the field."""


@dataclass(frozen=True)
class Tool:
    """One function the model may call: OpenAI's ``{"type": "function", "function": {...}}``."""

    name: str
    parameters: dict[str, Any]
    description: str = ""
    strict: bool = False

    def as_openai(self) -> dict[str, Any]:
        """The definition as the chat template renders it."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """``auto``, ``none``, ``required``, or one named function (``mode == "function"``)."""

    mode: str = "auto"
    name: str | None = None

    @property
    def forced(self) -> bool:
        """Whether the reply must be tool calls and nothing else."""
        return self.mode in ("required", "function")


@dataclass
class ToolCall:
    """A call the model made. ``error`` says why ``arguments`` could not be trusted, if so."""

    id: str
    name: str
    arguments: dict[str, Any] | None
    error: str | None = None
    raw: str = field(default="", repr=False)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> ToolCall:
        """A call from the final message's ``tool_calls`` entry (:meth:`as_dict`'s inverse)."""
        return cls(body["id"], body["function"]["name"], body["function"]["arguments"], body.get("error"))

    def as_dict(self) -> dict[str, Any]:
        """The call as the final message carries it (with ``error`` when it could not be read)."""
        body: dict[str, Any] = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if self.error is not None:
            body["error"] = self.error
        return body


def parse_tools(data: Any, where: str = "tools") -> list[Tool]:
    """Validate OpenAI-style tool definitions; raise :class:`ToolError` naming the bad field."""
    import jsonschema

    if not isinstance(data, list) or not data or len(data) > 64:
        raise ToolError(f"field '{where}' must be a list of 1-64 tool definitions")
    tools: list[Tool] = []
    for i, entry in enumerate(data):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict) or entry.get("type", "function") != "function" or not isinstance(entry.get("function"), dict):
            raise ToolError(f"field '{at}' must be {{\"type\": \"function\", \"function\": {{...}}}}")
        extra = sorted(set(entry) - {"type", "function"})
        if extra:
            raise ToolError(f"field '{at}.{extra[0]}' is not supported")
        function = entry["function"]
        extra = sorted(set(function) - {"name", "description", "parameters", "strict"})
        if extra:
            raise ToolError(f"field '{at}.function.{extra[0]}' is not supported")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"field '{at}.function.name' must be 1-64 letters, digits, '_', '.' or '-'")
        if name in {t.name for t in tools}:
            raise ToolError(f"field '{at}.function.name': {name!r} is defined twice")
        description = function.get("description", "")
        if not isinstance(description, str):
            raise ToolError(f"field '{at}.function.description' must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ToolError(f"field '{at}.function.parameters' must be a JSON Schema of type object")
        try:
            jsonschema.Draft202012Validator.check_schema(parameters)
        except jsonschema.SchemaError as exc:
            raise ToolError(f"field '{at}.function.parameters' is not a valid JSON Schema: {exc.message}") from None
        if not isinstance(parameters.get("properties", {}), dict):
            raise ToolError(f"field '{at}.function.parameters.properties' must be an object")
        strict = function.get("strict", False)
        if not isinstance(strict, bool):
            raise ToolError(f"field '{at}.function.strict' must be true or false")
        tools.append(Tool(name=name, parameters=parameters, description=description, strict=strict))
    return tools


def parse_tool_choice(data: Any, tools: list[Tool] | None) -> ToolChoice | None:
    """``auto``, ``none``, ``required`` or ``{"type": "function", "function": {"name": ...}}``; None
    when absent (auto with tools, none without). ``tools`` None: the tools are not known yet (a
    session's later turn uses those its first turn sent), so :func:`check_tool_choice` runs later."""
    if data is None:
        return None
    if data in ("auto", "none", "required"):
        choice = ToolChoice(data)
    else:
        name = data.get("function", {}).get("name") if isinstance(data, dict) and isinstance(data.get("function"), dict) else None
        if not isinstance(name, str):
            raise ToolError("field 'tool_choice' must be auto, none, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")
        choice = ToolChoice("function", name)
    if tools is not None:
        check_tool_choice(choice, tools)
    return choice


def check_tool_choice(choice: ToolChoice, tools: Sequence[Tool], where: str = "'tools'") -> None:
    """Refuse a choice that the tools cannot satisfy: a call required with none, or an unknown name."""
    if choice.mode in ("auto", "required") and not tools:
        raise ToolError(f"field 'tool_choice' is {choice.mode!r} but no {where} are given")
    if choice.mode == "function" and choice.name not in {t.name for t in tools}:
        raise ToolError(f"field 'tool_choice' names {choice.name!r}, which is not in {where}")


def parse_call(markup: str, tools: list[Tool], call_id: str) -> ToolCall:
    """A call from the text between ``<tool_call>`` and ``</tool_call>``, never raising: what cannot
    be read becomes the call's ``error``, so that a malformed call is reported, not dropped."""
    import jsonschema

    match = _FUNCTION.match(markup)
    if match is None:
        return ToolCall(call_id, "", None, "the call is not <function=NAME>...</function>", markup)
    name, body = match.group(1).strip(), match.group(2)
    by_name = {t.name: t for t in tools}
    raw_values = {key.strip(): value for key, value in _PARAMETER.findall(body)}
    if _PARAMETER.sub("", body).strip():
        return ToolCall(call_id, name, None, "text outside <parameter=...> blocks", markup)
    if name not in by_name:
        return ToolCall(call_id, name, None, f"unknown tool {name!r}", markup)
    schema = by_name[name].parameters
    properties = schema.get("properties", {})
    arguments: dict[str, Any] = {}
    for key, raw in raw_values.items():
        try:
            arguments[key] = convert_value(raw, properties.get(key, {}))
        except ValueError as exc:
            return ToolCall(call_id, name, None, f"parameter {key!r}: {exc}", markup)
    problem = next(iter(jsonschema.Draft202012Validator(schema).iter_errors(arguments)), None)
    if problem is not None:
        path = "/".join(str(p) for p in problem.absolute_path)
        where = f" at {path}" if path else ""
        return ToolCall(call_id, name, arguments, f"arguments do not match the schema{where}: {problem.message}", markup)
    return ToolCall(call_id, name, arguments, None, markup)


def convert_value(raw: str, schema: dict[str, Any]) -> Any:
    """A parameter's bare text as the type its schema declares: strings stay text, the rest is JSON."""
    types = schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if "enum" in schema and raw in schema["enum"]:
        return raw
    if types == ["string"]:
        return raw
    text = raw.strip()
    if "boolean" in types and text in ("True", "False"):
        return text == "True"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if not types or "string" in types:
            return raw  # an untyped parameter, or one that may be a string: keep the text
        raise ValueError(f"{text[:60]!r} is not {' or '.join(types)}") from None
