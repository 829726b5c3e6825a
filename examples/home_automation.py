"""A home-automation tool loop: the device proposes calls, this client executes them.

Start a daemon first (``make run`` leaves a bundle in dist/; ``edgekit serve BUNDLE --device-id
kitchen``), then::

    python examples/home_automation.py --device kitchen "It's getting dark in the hall."

The house here is a dictionary; put your Home Assistant or Node-RED calls in ``run_tool``. The
conversation stays on the device (a session): each round sends only the tool results. A random-weight
bundle (the fixtures) calls tools only because ``--tool-choice required`` forces it, and its
arguments are noise that still validates; a real Qwen3.5 picks the call from the request.
"""

from __future__ import annotations

import argparse
import json
import uuid
from typing import Any

from edgekit.client import DeviceClient, ToolCall
from edgekit.mqtt.settings import BrokerSettings

TOOLS = [
    {"type": "function", "function": {
        "name": "set_light", "description": "Switch a room's light on or off, optionally dimmed.", "strict": True,
        "parameters": {"type": "object", "properties": {
            "room": {"type": "string", "enum": ["kitchen", "hall", "porch"]},
            "on": {"type": "boolean"},
            "brightness": {"type": "integer", "minimum": 1, "maximum": 100}},
            "required": ["room", "on"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "read_sensor", "description": "Read a sensor: temperature in degrees C, or light level in lux.", "strict": True,
        "parameters": {"type": "object", "properties": {
            "room": {"type": "string", "enum": ["kitchen", "hall", "porch"]},
            "kind": {"type": "string", "enum": ["temperature", "lux"]}},
            "required": ["room", "kind"], "additionalProperties": False}}},
]

HOUSE: dict[str, Any] = {"lights": {"kitchen": False, "hall": False, "porch": True},
                         "temperature": {"kitchen": 21.5, "hall": 19.0, "porch": 7.5},
                         "lux": {"kitchen": 180, "hall": 12, "porch": 3}}


def run_tool(call: ToolCall) -> dict[str, Any]:
    """Execute one call against the house; the result goes back to the model as JSON."""
    if call.error or call.arguments is None:
        return {"error": call.error or "no arguments"}
    args = call.arguments
    if call.name == "set_light":
        HOUSE["lights"][args["room"]] = args["on"]
        return {"room": args["room"], "on": args["on"], "brightness": args.get("brightness", 100)}
    if call.name == "read_sensor":
        return {"room": args["room"], args["kind"]: HOUSE[args["kind"]][args["room"]]}
    return {"error": f"unknown tool {call.name}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("request", help="what the user says")
    parser.add_argument("--device", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--tool-choice", default="auto", choices=["auto", "required"],
                        help="required: the first round must call a tool (what a random-weight bundle needs)")
    parser.add_argument("--rounds", type=int, default=3, help="most tool rounds before giving up")
    args = parser.parse_args()

    session = f"home-{uuid.uuid4().hex[:8]}"
    request: dict[str, Any] = {"messages": [{"role": "user", "content": args.request}], "tools": TOOLS,
                               "tool_choice": args.tool_choice, "session": session, "max_tokens": 128}
    with DeviceClient(BrokerSettings(host=args.host, port=args.port)) as client:
        for _ in range(args.rounds):
            answer = client.chat(args.device, request, on_text=lambda text: print(text, end="", flush=True))
            if not answer.tool_calls:
                print(f"\n[{answer.finish_reason}]")
                break
            results = []
            for call in answer.tool_calls:
                result = run_tool(call)
                print(f"\n-> {call.name}({json.dumps(call.arguments)}) = {json.dumps(result)}")
                results.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
            # The session holds the history: send only the results (tools come from the session).
            request = {"messages": results, "session": session, "max_tokens": 128}
    print("house:", json.dumps(HOUSE["lights"]))


if __name__ == "__main__":
    main()
