"""What constrained decoding costs on this CPU: time per token and resident memory, on a real bundle.

The agent issue's targets: the grammar (llguidance's mask, its application to the logits, advancing
the matcher) adds under 10 % to decode time per token on the 0.8B, and the daemon's RSS stays under
800 MB with the grammar engine and jsonschema loaded.

Time: in alternating rounds, the same prompt decodes TOKENS tokens unconstrained and under each
grammar below (greedy, so both sides decode the same number of steps unless the grammar ends the
reply; per-token figures are used either way). The grammar's own time is measured inside the loop
(``Constraint.grammar_s``); the decode-time ratio is measured around it, so it also catches costs the
inner timer misses.

- ``json-string``: an object with one string of 200+ characters: the mask inside a JSON string, the
  most common state of a constrained reply;
- ``text-auto``: free text with a strict tool on ``auto``: the mask over free text, where any token
  but the call's is allowed;
- ``json-object``: a bounded sensor-reading schema (nested object, enum, integer bounds, array);
- ``tool-required``: two strict tools, a call forced.

Memory: the process's RSS after loading the engine and tokenizer, after llguidance's tokenizer index
is built, and after a constrained generation; and, in a fresh interpreter, what importing llguidance
and jsonschema adds (the daemon imports both at start, through the protocol).

Prints JSON. Example::

    python bench/agent_cost.py dist/qwen3.5-0.8b-raspberry-pi-5-int4 --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import psutil

from edgekit.agent.grammar import GrammarCompiler, ReplyFormat
from edgekit.agent.tools import parse_tool_choice, parse_tools
from edgekit.runtime.conversation import Turn, run_turn
from edgekit.runtime.engine import Engine
from edgekit.runtime.tokenizer import ChatTokenizer

SENSOR = {"type": "object", "properties": {
    "sensor": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                                "room": {"enum": ["kitchen", "hall", "porch"]}},
               "required": ["id", "room"]},
    "celsius": {"type": "integer", "minimum": -40, "maximum": 60},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4}},
    "required": ["sensor", "celsius", "tags"]}
TOOLS = [
    {"type": "function", "function": {"name": "set_light", "strict": True, "parameters": {
        "type": "object", "properties": {"room": {"enum": ["kitchen", "hall"]}, "on": {"type": "boolean"},
                                         "note": {"type": "string", "maxLength": 200}}, "required": ["room", "on", "note"]}}},
    {"type": "function", "function": {"name": "read_sensor", "strict": True, "parameters": {
        "type": "object", "properties": {"room": {"enum": ["kitchen", "hall"]}}, "required": ["room"]}}},
]


def formats() -> dict[str, ReplyFormat]:
    tools = parse_tools(TOOLS)
    return {
        "none": ReplyFormat(),
        "json-string": ReplyFormat(json_schema={"type": "object", "properties": {"notes": {"type": "string", "minLength": 200}},
                                                "required": ["notes"]}),
        "text-auto": ReplyFormat(tools=tuple(tools)),
        "json-object": ReplyFormat(json_schema=SENSOR),
        "tool-required": ReplyFormat(tools=tuple(tools), choice=parse_tool_choice("required", tools)),
    }


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def import_cost() -> dict[str, float]:
    """RSS a fresh interpreter gains by importing llguidance and jsonschema (after numpy, as the daemon has it)."""
    code = ("import psutil, numpy; p = psutil.Process(); a = p.memory_info().rss; import jsonschema; b = p.memory_info().rss; "
            "import llguidance; c = p.memory_info().rss; print(a, b, c)")
    before, with_jsonschema, with_both = (int(x) for x in subprocess.check_output([sys.executable, "-c", code]).split())
    return {"jsonschema_mib": round((with_jsonschema - before) / 2**20, 1),
            "llguidance_mib": round((with_both - with_jsonschema) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    memory = {"imports": import_cost()}
    engine = Engine(args.bundle, threads=args.threads)
    tokenizer = ChatTokenizer(args.bundle)
    memory["engine_loaded_mib"] = round(rss_mib(), 1)
    grammars = GrammarCompiler(tokenizer, engine.vocab_size, engine.eos_ids)
    grammars.tokenizer()
    memory["grammar_index_mib"] = round(rss_mib() - memory["engine_loaded_mib"], 1)

    messages = [{"role": "user", "content": "Report the hall sensor, and switch the light if it is dark."}]
    per_token: dict[str, list[float]] = {name: [] for name in formats()}
    grammar_ms: dict[str, list[float]] = {name: [] for name in formats()}
    steps: dict[str, list[int]] = {name: [] for name in formats()}
    for round_ in range(args.rounds):
        names = list(formats()) if round_ % 2 == 0 else list(reversed(formats()))
        for name in names:
            turn = Turn(messages=messages, max_tokens=args.tokens, fmt=formats()[name], speculative=False)
            result = run_turn(engine, tokenizer, turn, lambda text: None, grammars=grammars)
            stats = result.stats
            per_token[name].append(1000 * stats.decode_s / max(stats.decode_steps, 1))
            steps[name].append(stats.decode_steps)
            if result.grammar_ms_per_token is not None:
                grammar_ms[name].append(result.grammar_ms_per_token)
    memory["after_constrained_mib"] = round(rss_mib(), 1)

    plain = statistics.median(per_token["none"])
    figures = {}
    for name in formats():
        decode = statistics.median(per_token[name])
        figures[name] = {
            "decode_ms_per_token": round(decode, 2),
            "decode_steps": statistics.median(steps[name]),
            "vs_unconstrained": round(decode / plain, 3),
            "grammar_ms_per_token": round(statistics.median(grammar_ms[name]), 3) if grammar_ms[name] else None,
            "grammar_share_of_decode": round(statistics.median(grammar_ms[name]) / decode, 3) if grammar_ms[name] and decode else None,
        }
    print(json.dumps({"bundle": args.bundle.name, "threads": args.threads, "rounds": args.rounds, "tokens": args.tokens,
                      "decode": figures, "memory": memory}, indent=2))


if __name__ == "__main__":
    main()
