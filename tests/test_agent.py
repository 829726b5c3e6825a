"""The device as an agent: tool definitions and calls, constrained output, over the real protocol.

Random weights never call a tool or write JSON by themselves, which is what makes them a fair test of
the grammar: with the constraint every finished reply validates, without it none does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from edgekit.agent.grammar import GrammarCompiler, ReplyFormat
from edgekit.agent.tools import ToolError, parse_call, parse_tool_choice, parse_tools
from edgekit.cli import main
from edgekit.client import DeviceClient
from edgekit.errors import EdgekitError
from edgekit.mqtt import protocol
from edgekit.runtime.conversation import Turn, _Reply, run_turn
from edgekit.runtime.engine import Engine
from edgekit.runtime.sampling import Sampling
from edgekit.runtime.tokenizer import ChatTokenizer
from edgekit.serve.daemon import Daemon

from .conftest import broker_at

LIGHT = {"type": "function", "function": {
    "name": "set_light", "description": "Switch a room's light.", "strict": True,
    "parameters": {"type": "object", "properties": {
        "room": {"type": "string", "enum": ["kitchen", "hall", "porch"]},
        "on": {"type": "boolean"},
        "level": {"type": "integer", "minimum": 0, "maximum": 100},
        "note": {"type": "string", "maxLength": 12}},
        "required": ["room", "on"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# The same with strict arguments and a bounded string, so that a random model finishes a forced call.
WEATHER_STRICT = {"type": "function", "function": {**WEATHER["function"], "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"]}}}

# Bounded so that a random model can finish them: every string has a maxLength, every array maxItems.
SCHEMAS = [
    {"type": "object", "properties": {"room": {"enum": ["kitchen", "hall"]}, "on": {"type": "boolean"}},
     "required": ["room", "on"], "additionalProperties": False},
    {"type": "object", "properties": {
        "sensor": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                                    "name": {"type": "string", "maxLength": 8}},
                   "required": ["id", "name"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3}},
     "required": ["sensor", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"celsius": {"type": "integer", "minimum": -40, "maximum": 60},
                                      "alarm": {"type": "boolean"}, "level": {"enum": ["low", "mid", "high"]}},
     "required": ["celsius", "alarm", "level"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
]


@pytest.fixture(scope="module")
def grammars(engine: Engine, tokenizer: ChatTokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, engine.vocab_size, engine.eos_ids)


def _request(payload: dict) -> protocol.Request:
    return protocol.parse_request(json.dumps({"id": "r", **payload}).encode())


# --- definitions, choice, and reading calls --------------------------------------------------------

@pytest.mark.parametrize("tools, message", [
    ([], "must be a list of 1-64"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([LIGHT, LIGHT], "defined twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 5}}}}}],
     "not a valid JSON Schema"),
    ([{"type": "function", "function": {"name": "f", "colour": "red"}}], "tools[0].function.colour"),
])
def test_bad_tool_definitions_are_refused_by_field(tools: list, message: str) -> None:
    with pytest.raises(protocol.ProtocolError, match="tools") as caught:
        _request({"prompt": "x", "tools": tools})
    assert caught.value.code == "bad_request" and message in caught.value.message


def test_tool_choice_forms() -> None:
    tools = parse_tools([LIGHT, WEATHER])
    assert parse_tool_choice(None, tools) is None
    assert parse_tool_choice("required", tools).forced
    named = parse_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools)
    assert named is not None and named.mode == "function" and named.name == "get_weather"
    with pytest.raises(ToolError, match="not in 'tools'"):
        parse_tool_choice({"type": "function", "function": {"name": "nope"}}, tools)
    with pytest.raises(ToolError, match="no 'tools'"):
        parse_tool_choice("required", [])


def test_calls_are_read_by_their_schema_and_bad_ones_are_reported() -> None:
    tools = parse_tools([LIGHT, WEATHER])
    call = parse_call("\n<function=set_light>\n<parameter=room>\nkitchen\n</parameter>\n<parameter=on>\nTrue\n</parameter>\n"
                      "<parameter=level>\n40\n</parameter>\n</function>\n", tools, "c1")
    assert (call.name, call.arguments, call.error) == ("set_light", {"room": "kitchen", "on": True, "level": 40}, None)
    # A string value keeps its text, line breaks and all.
    call = parse_call("<function=get_weather>\n<parameter=city>\nSão Paulo\nBrazil\n</parameter>\n</function>", tools, "c2")
    assert call.arguments == {"city": "São Paulo\nBrazil"} and call.error is None
    unknown = parse_call("<function=open_door>\n<parameter=door>\nfront\n</parameter>\n</function>", tools, "c3")
    assert unknown.name == "open_door" and unknown.arguments is None and "unknown tool" in (unknown.error or "")
    wrong = parse_call("<function=set_light>\n<parameter=room>\nkitchen\n</parameter>\n<parameter=on>\nmaybe\n</parameter>\n"
                       "</function>", tools, "c4")
    assert wrong.arguments is None and "'on'" in (wrong.error or "")
    invalid = parse_call("<function=set_light>\n<parameter=room>\nattic\n</parameter>\n<parameter=on>\ntrue\n</parameter>\n"
                         "</function>", tools, "c5")
    assert invalid.arguments == {"room": "attic", "on": True} and "do not match the schema at room" in (invalid.error or "")
    assert "not <function=NAME>" in (parse_call("set_light(room='x')", tools, "c6").error or "")


def test_call_markup_never_reaches_the_text_stream(tokenizer: ChatTokenizer) -> None:
    """Text before a call streams; the call is announced once named, parsed when closed; a call cut
    off by the end of generation is reported with an error, not dropped."""
    fmt = ReplyFormat(tools=tuple(parse_tools([LIGHT, WEATHER])))
    reply_text = ("Turning it on.<tool_call>\n<function=set_light>\n<parameter=room>\nhall\n</parameter>\n"
                  "<parameter=on>\ntrue\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parame")
    texts: list[str] = []
    announced: list[tuple[int, str, str]] = []
    reply = _Reply(tokenizer, fmt, [], texts.append, lambda i, call: announced.append((i, call.id, call.name)))
    for token in tokenizer.encode(reply_text):
        assert not reply.add(token)
    reply.close()
    assert "".join(texts) == "Turning it on."
    assert [(i, name) for i, _, name in announced] == [(0, "set_light"), (1, "get_weather")]
    first, second = reply.calls
    assert first.arguments == {"room": "hall", "on": True} and first.error is None and first.id == announced[0][1]
    assert second.name == "get_weather" and second.error == "the reply ended inside this call"


def test_thinking_block_streams_apart_from_the_answer(tokenizer: ChatTokenizer) -> None:
    """With thinking on, text up to the model's </think> is reasoning; the line breaks after it are the
    template's; tool calls after it still parse. Without a reasoning sink it all stays text, as before."""
    fmt = ReplyFormat(tools=tuple(parse_tools([LIGHT])))
    reply_text = ("The hall is dark, so the light.\n</think>\n\nSwitching it on.<tool_call>\n<function=set_light>\n"
                  "<parameter=room>\nhall\n</parameter>\n<parameter=on>\ntrue\n</parameter>\n</function>\n</tool_call>")
    texts: list[str] = []
    thoughts: list[str] = []
    reply = _Reply(tokenizer, fmt, [], texts.append, lambda i, call: None, thoughts.append)
    for token in tokenizer.encode(reply_text):
        reply.add(token)
    reply.close()
    assert "".join(thoughts) == "The hall is dark, so the light.\n" and "".join(thoughts) == "".join(reply.reasoning)
    assert "".join(texts) == "Switching it on." and reply.calls[0].arguments == {"room": "hall", "on": True}
    plain: list[str] = []
    reply = _Reply(tokenizer, ReplyFormat(), [], plain.append, lambda i, call: None)
    for token in tokenizer.encode("Thought.</think>\n\nAnswer."):
        reply.add(token)
    reply.close()
    assert "".join(plain) == "Thought.</think>\n\nAnswer."


# --- the chat template ------------------------------------------------------------------------------

def test_published_template_renders_tools_calls_and_results(tokenizer: ChatTokenizer) -> None:
    tools = [t.as_openai() for t in parse_tools([LIGHT])]
    messages = [{"role": "user", "content": "Dark in the hall"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "set_light", "arguments": {"room": "hall", "on": True}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "<ok>"}]
    text = tokenizer.render(messages, thinking=False, tools=tools)
    assert "<tools>\n" + json.dumps(tools[0], ensure_ascii=False) + "\n</tools>" in text  # transformers' tojson: no \u003c
    assert "<tool_call>\n<function=set_light>\n<parameter=room>\nhall\n</parameter>\n<parameter=on>\nTrue\n</parameter>" in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n<ok>\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # A session continues after its assistant turn with what the whole history renders there.
    continuation = tokenizer.render_continuation(messages[2:], thinking=False)
    assert text.endswith("<|im_end|>\n" + continuation)
    assert continuation.startswith("<|im_start|>user\n<tool_response>")


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Du bist ein Heimassistent. Antworte knapp."}, {"role": "user", "content": "Licht?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  leading spaces\n\n"}],
    [{"role": "user", "content": "turn on the hall"}, {"role": "assistant", "content": "done"},
     {"role": "user", "content": "and the porch 🌙"}],
])
@pytest.mark.parametrize("thinking", [True, False])
def test_tools_tokens_counted_without_a_second_encoding_match_it(tokenizer: ChatTokenizer, messages: list[dict[str, str]],
                                                                 thinking: bool) -> None:
    tools = [t.as_openai() for t in parse_tools([LIGHT, WEATHER])]
    with_tools = tokenizer.render(messages, thinking=thinking, tools=tools)
    without = tokenizer.render(messages, thinking=thinking)
    expected = len(tokenizer.encode(with_tools)) - len(tokenizer.encode(without))
    assert tokenizer.extra_tokens(with_tools, without) == expected > 100
    # Texts that differ inside a run of ordinary text, with no special token near: still exact.
    assert tokenizer.extra_tokens("<|im_start|>user\nabc def ghi<|im_end|>", "<|im_start|>user\nabcghi<|im_end|>") == (
        len(tokenizer.encode("abc def ghi")) - len(tokenizer.encode("abcghi")))


def test_tools_cost_is_reported_and_kept_in_the_session(engine: Engine, tokenizer: ChatTokenizer, grammars: GrammarCompiler) -> None:
    from edgekit.runtime.sessions import SessionStore

    sessions = SessionStore(64 * 1024**2, 600)
    fmt = ReplyFormat(tools=tuple(parse_tools([LIGHT, WEATHER])))
    messages = [{"role": "user", "content": "hi"}]
    first = run_turn(engine, tokenizer, Turn(messages=messages, max_tokens=2, fmt=fmt, session="s"), lambda t: None,
                     sessions=sessions, grammars=grammars)
    with_tools = len(tokenizer.encode(tokenizer.render(messages, thinking=False, tools=[t.as_openai() for t in fmt.tools])))
    assert first.tools_tokens == with_tools - len(tokenizer.encode(tokenizer.render(messages, thinking=False))) > 100
    # Turn 2 reads only its own message; the session remembers the tools for parsing.
    second = run_turn(engine, tokenizer, Turn(messages=[{"role": "user", "content": "again"}], max_tokens=2, session="s"),
                      lambda t: None, sessions=sessions, grammars=grammars)
    assert second.tools_tokens == first.tools_tokens and second.stats.prompt_tokens < 20
    with pytest.raises(ToolError, match="differs from the tools this session"):
        run_turn(engine, tokenizer, Turn(messages=messages, max_tokens=2, session="s",
                                         fmt=ReplyFormat(tools=tuple(parse_tools([WEATHER])))), lambda t: None,
                 sessions=sessions, grammars=grammars)


# --- constrained output -----------------------------------------------------------------------------

def _generate(engine: Engine, tokenizer: ChatTokenizer, grammars: GrammarCompiler, fmt: ReplyFormat, seed: int,
              thinking: bool = False) -> tuple[str, str]:
    turn = Turn(messages=[{"role": "user", "content": "Report the sensor as JSON."}], max_tokens=96, fmt=fmt,
                thinking=thinking, sampling=Sampling(temperature=1.0, seed=seed))
    result = run_turn(engine, tokenizer, turn, lambda t: None, grammars=grammars)
    return result.text, result.finish_reason


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_constrained_output_validates_and_unconstrained_does_not(index: int, engine: Engine, tokenizer: ChatTokenizer,
                                                                 grammars: GrammarCompiler) -> None:
    schema = SCHEMAS[index]
    validator = jsonschema.Draft202012Validator(schema)
    stops = 0
    for seed in range(8):
        text, finish = _generate(engine, tokenizer, grammars, ReplyFormat(json_schema=schema), seed)
        if finish == "stop":  # "always validates" is a promise about finished replies only
            stops += 1
            validator.validate(json.loads(text))
        else:
            assert finish == "length"
        free, _ = _generate(engine, tokenizer, grammars, ReplyFormat(), seed)
        with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
            validator.validate(json.loads(free))
    assert stops >= 6, f"only {stops} of 8 constrained replies finished"


def test_thinking_stays_free_and_the_answer_after_it_is_constrained(engine: Engine, tokenizer: ChatTokenizer,
                                                                      grammars: GrammarCompiler) -> None:
    fmt = ReplyFormat(json_schema=SCHEMAS[0])
    constraint = grammars.constraint(fmt, thinking=True)
    assert constraint is not None and not constraint.active
    logits = np.zeros(engine.vocab_size, dtype=np.float32)
    constraint.apply(logits)
    assert np.isfinite(logits).all()  # inside <think>: nothing masked
    constraint.advance(tokenizer.token_id("</think>"))
    constraint.apply(logits)
    allowed = np.flatnonzero(np.isfinite(logits))
    assert 0 < allowed.size < 1000 and {tokenizer.decode([int(t)]) for t in allowed} >= {"{", "\n"}


def test_tool_choice_none_masks_the_call_token(engine: Engine, tokenizer: ChatTokenizer, grammars: GrammarCompiler) -> None:
    tools = tuple(parse_tools([LIGHT]))
    call = tokenizer.token_id("<tool_call>")
    for choice, allowed in (("none", False), ("required", True)):
        constraint = grammars.constraint(ReplyFormat(tools=tools, choice=parse_tool_choice(choice, list(tools))), thinking=False)
        assert constraint is not None
        logits = np.zeros(engine.vocab_size, dtype=np.float32)
        logits[call] = 100.0
        constraint.apply(logits)
        assert bool(np.isfinite(logits[call])) is allowed


@pytest.mark.parametrize("schema, feature", [
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, "dependentSchemas"),
])
def test_unsupported_schema_features_are_named(schema: dict, feature: str) -> None:
    with pytest.raises(protocol.ProtocolError) as caught:
        _request({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    assert caught.value.code == "bad_request" and feature in caught.value.message and "response_format" in caught.value.message
    pattern_tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "^[0-9]+$"}}}}}
    with pytest.raises(protocol.ProtocolError, match="code.pattern is not supported"):
        _request({"prompt": "x", "tools": [pattern_tool], "tool_choice": "required"})


# --- over MQTT --------------------------------------------------------------------------------------

def test_forced_tool_call_round_trip_over_mqtt(daemon: Daemon, broker: int, host_bundle: Path) -> None:
    """A forced call arrives structured and valid; the tool's result continues the session, and turn 2
    matches a fresh engine fed the session's exact token stream."""
    session = f"tools-{uuid.uuid4().hex[:6]}"
    device = daemon.config.device_id
    with DeviceClient(broker_at(broker)) as client:
        request_id = client.send(device, {"messages": [{"role": "user", "content": "It is dark in the hall."}],
                                          "tools": [LIGHT, WEATHER_STRICT], "tool_choice": "required", "session": session,
                                          "parallel_tool_calls": False, "temperature": 0.8, "seed": 4, "max_tokens": 64})
        replies = list(client.replies(request_id, timeout=60))
        final = replies[-1]
        assert final["type"] == "final" and final["finish_reason"] == "tool_calls", final
        (call,) = final["tool_calls"]
        assert call["function"]["name"] in ("set_light", "get_weather") and "error" not in call
        tool = LIGHT if call["function"]["name"] == "set_light" else WEATHER_STRICT
        jsonschema.validate(call["function"]["arguments"], tool["function"]["parameters"])
        announced = [r for r in replies if r["type"] == "tool_call"]
        assert [(a["index"], a["call_id"], a["name"]) for a in announced] == [(0, call["id"], call["function"]["name"])]
        assert not any("<tool_call>" in r.get("text", "") or "<function=" in r.get("text", "") for r in replies)
        assert final["usage"]["tools_tokens"] > 100
        for message in replies:
            jsonschema.validate(message, json.loads((Path(__file__).parent.parent / "docs" / "schema" / "v1" /
                                                     f"{message['type']}.json").read_text()))
        # Turn 2: the tool's result, in the same session (tools and choice come from the session: auto).
        pieces: list[str] = []
        second = client.ask(device, {"messages": [{"role": "tool", "tool_call_id": call["id"], "content": '{"ok": true}'}],
                                     "session": session, "max_tokens": 6}, on_text=pieces.append)
    kept = daemon.sessions.take(session)
    assert kept is not None and kept.state.length == len(kept.tokens) == second["usage"]["session_tokens"]
    engine, tokenizer = Engine(host_bundle), ChatTokenizer(host_bundle)
    second_prompt_end = len(kept.tokens) - (second["usage"]["completion_tokens"] - 1)
    # The call closed turn 1 (a random model may end it with <|endoftext|> before the <|im_end|> the
    # session adds); the result opens a user turn as the template renders tool results.
    history = tokenizer.decode(kept.tokens[:second_prompt_end])
    assert "</tool_call>" in history.rsplit("<tool_response>", 1)[0][-80:]
    assert history.endswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n{\"ok\": true}\n</tool_response><|im_end|>\n"
                            "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    out = list(engine.generate(kept.tokens[:second_prompt_end], second["usage"]["completion_tokens"], state=engine.new_state()))
    assert out[:-1] == kept.tokens[second_prompt_end:] and out[-1:] == kept.pending
    assert tokenizer.decode([t for t in out if t not in engine.eos_ids]) == "".join(pieces)


def test_ask_cli_with_tools_and_json_schema(daemon: Daemon, broker: int, tmp_path: Path) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([LIGHT]))
    schema = tmp_path / "reading.json"
    schema.write_text(json.dumps(SCHEMAS[2]))
    base = ["ask", "--device", daemon.config.device_id, "--port", str(broker), "--temperature", "0.7", "--seed", "1"]
    result = CliRunner().invoke(main, [*base, "dark hall", "--tools", str(tools), "--tool-choice", "set_light", "--json"])
    assert result.exit_code == 0, result.output
    final = json.loads(result.output)
    assert final["finish_reason"] == "tool_calls" and final["tool_calls"][0]["function"]["name"] == "set_light"
    result = CliRunner().invoke(main, [*base, "dark hall", "--tools", str(tools), "--tool-choice", "set_light"])
    assert result.exit_code == 0 and "-> set_light({" in result.output
    result = CliRunner().invoke(main, [*base, "how warm?", "--json-schema", str(schema), "--json"])
    final = json.loads(result.output)
    assert final["finish_reason"] == "stop", final
    jsonschema.validate(json.loads(final["text"]), SCHEMAS[2])
    schema.write_text("{not json")
    result = CliRunner().invoke(main, [*base, "x", "--json-schema", str(schema)])
    assert result.exit_code == 1 and "reading.json: not valid JSON (line 1" in result.output


def test_bad_tools_over_mqtt_get_bad_request_and_the_daemon_serves_on(daemon: Daemon, broker: int) -> None:
    with DeviceClient(broker_at(broker)) as client:
        with pytest.raises(EdgekitError, match="bad_request: .*dependentSchemas"):
            client.ask(daemon.config.device_id, {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
                "name": "s", "schema": {"type": "object", "dependentSchemas": {"a": {}}}}}})
        answer = client.chat(daemon.config.device_id, {"prompt": "x", "max_tokens": 2})
        assert answer.finish_reason in ("stop", "length") and answer.tool_calls == []


def test_home_automation_example_runs_its_tool_loop(daemon: Daemon, broker: int) -> None:
    """The example a user copies: two rounds against a real daemon, the client executing the calls."""
    example = Path(__file__).parent.parent / "examples" / "home_automation.py"
    run = subprocess.run([sys.executable, str(example), "It is dark in the hall.", "--device", daemon.config.device_id,
                          "--port", str(broker), "--tool-choice", "required", "--rounds", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "-> set_light(" in run.stdout or "-> read_sensor(" in run.stdout
    assert "house: {" in run.stdout


def test_the_grammar_index_is_dropped_when_idle_and_rebuilt(engine: Engine, grammars: GrammarCompiler) -> None:
    fmt = ReplyFormat(json_schema=SCHEMAS[0])
    assert grammars.constraint(fmt, thinking=False) is not None
    assert not grammars.release(idle_s=60)  # just used: a tool loop's next round keeps it
    assert grammars.release() and not grammars.release()
    constraint = grammars.constraint(fmt, thinking=False)  # built again on demand
    assert constraint is not None
    logits = np.zeros(engine.vocab_size, dtype=np.float32)
    constraint.apply(logits)
    assert 0 < int(np.isfinite(logits).sum()) < 100


def test_a_later_session_turn_forces_a_call_without_resending_the_tools(daemon: Daemon, broker: int) -> None:
    session = f"force-{uuid.uuid4().hex[:6]}"
    device = daemon.config.device_id
    with DeviceClient(broker_at(broker)) as client:
        client.ask(device, {"messages": [{"role": "user", "content": "Hello."}], "tools": [LIGHT, WEATHER_STRICT],
                            "tool_choice": "none", "session": session, "max_tokens": 4})
        forced = client.chat(device, {"messages": [{"role": "user", "content": "Light the porch."}], "session": session,
                                      "tool_choice": {"type": "function", "function": {"name": "set_light"}},
                                      # One call, then the grammar ends the reply: a random model's
                                      # sampled tokens would otherwise chain calls up to max_tokens.
                                      "parallel_tool_calls": False, "temperature": 0.8, "seed": 2, "max_tokens": 64})
        assert forced.finish_reason == "tool_calls", forced.final
        assert [call.name for call in forced.tool_calls] == ["set_light"] and forced.tool_calls[0].error is None
        with pytest.raises(EdgekitError, match="names 'open_door', which is not in tools in this session"):
            client.ask(device, {"messages": [{"role": "user", "content": "Open up."}], "session": session,
                                "tool_choice": {"type": "function", "function": {"name": "open_door"}}, "max_tokens": 4})
        # A session the device does not hold has no tools to force a call among.
        with pytest.raises(EdgekitError, match="'required' but no 'tools' are given"):
            client.ask(device, {"messages": [{"role": "user", "content": "Hi."}], "session": f"{session}-new",
                                "tool_choice": "required", "max_tokens": 4})
    # Without a session, the choice still needs the tools in the request itself.
    with pytest.raises(protocol.ProtocolError, match="no 'tools' are given"):
        _request({"prompt": "x", "tool_choice": "required"})
