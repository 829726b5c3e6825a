"""Constrained decoding: a token mask from llguidance applied to the logits at every step.

Why llguidance: it is the grammar engine llama.cpp and onnxruntime-genai use, it compiles JSON
Schema and Lark-style grammars (with JSON Schema inlined, which the XML-like tool-call form needs),
it builds its token trie from a ``tokenizers`` tokenizer.json (no transformers on the device), it
computes a 248k-token mask in tens of microseconds, and it ships abi3 wheels for x86-64 and aarch64
(aarch64 up to 1.6.1 at the time of writing; the API used here is the same in 1.6 and 1.9). The
comparison with XGrammar, Outlines and lm-format-enforcer is in docs/agent.md.

One grammar covers a reply: ``response_format`` makes the answer JSON, tools make it text and/or
``<tool_call>`` blocks in Qwen3.5's form. With thinking on, the ``<think>`` block stays free: the
mask starts after the model's ``</think>``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import decoders

from edgekit.agent.tools import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, Tool, ToolChoice, ToolError
from edgekit.errors import EdgekitError
from edgekit.runtime.resident import trim_heap

if TYPE_CHECKING:
    import llguidance

    from edgekit.runtime.tokenizer import ChatTokenizer

# llguidance's "slices" (sub-tries for common lexer states) make masks inside JSON strings faster
# (0.5 against 2.2 ms a token on the 0.8B) for about 60 MiB more RSS; without them every grammar
# still costs under 7 % of a decode step, and the daemon's memory target is the tighter limit
# (bench/agent_cost.py, docs/benchmarks.md).
_SLICES: list[str] = []

# llguidance is imported where a grammar is first needed, not with this module: the daemon imports
# this module at start, and a device that never constrains keeps its memory (docs/agent.md).

# JSON as models write it (and as the chat template renders arguments): ", " and ": ", no other
# whitespace. llguidance's default admits any whitespace run, which lets a weak model pad forever.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Parameter schema keywords that the bare-text string form cannot express.
_STRING_UNSUPPORTED = ("pattern", "format")


@dataclass(frozen=True)
class ReplyFormat:
    """What a reply must look like: ``response_format`` and the request's tools, as parsed."""

    json_schema: dict[str, Any] | None = None  # {"type": "object"} for json_object
    tools: tuple[Tool, ...] = ()
    choice: ToolChoice | None = None  # None: auto with tools, none without
    parallel_tool_calls: bool = True

    @property
    def tool_choice(self) -> ToolChoice:
        return self.choice or ToolChoice("auto" if self.tools else "none")

    def constrained(self) -> bool:
        """Whether decoding needs a grammar: plain ``auto`` tool calls without ``strict`` do not."""
        if self.json_schema is not None or self.tool_choice.forced:
            return True
        if self.tool_choice.mode == "none":
            return bool(self.tools)  # the grammar forbids calls the prompt still describes
        return any(t.strict for t in self.tools)


def lark_grammar(fmt: ReplyFormat, call_open: int, call_close: int, lead: bool) -> str:
    """The reply's grammar in llguidance's Lark syntax; ``lead`` admits the newlines a model writes
    after ``</think>``. Raises :class:`ToolError` for a schema the tool-call form cannot express."""
    rules: list[str] = []
    choice = fmt.tool_choice
    body = ""
    if choice.mode != "none":
        tools = [t for t in fmt.tools if choice.mode != "function" or t.name == choice.name]
        functions = " | ".join(f"f{i}" for i in range(len(tools)))
        rules.append(f'call: <[{call_open}]> "\\n<function=" ({functions}) "</function>\\n" <[{call_close}]>')
        for i, tool in enumerate(tools):
            rules.extend(_function_rules(f"f{i}", tool))
        if not all(t.strict for t in tools):
            rules.append(r"free_value[lazy]: /(.|\n)*\n<\/parameter>/")
        body = 'call ("\\n" call)*' if fmt.parallel_tool_calls else "call"
    if fmt.json_schema is not None:
        # With tools on auto, the reply is either calls or the JSON answer.
        body = f"json | {body}" if body else "json"
        rules.append(f"json: {_inline_json(fmt.json_schema)}")
    elif not choice.forced:
        body = f"TEXT ({body})?" if body else "TEXT"
    rules.insert(0, f"start: {'LEAD ' if lead else ''}({body})")
    if "TEXT" in body:
        rules.append(r"TEXT: /(.|\n)*/")
    if lead:
        rules.append(r"LEAD: /\n{0,2}/")
    return "\n".join(rules)


def _function_rules(rule: str, tool: Tool) -> list[str]:
    properties: dict[str, Any] = tool.parameters.get("properties", {})
    if not tool.strict:
        # Without strict only the form is enforced: known parameter names, values as free text.
        names = " | ".join(json.dumps(k) for k in properties) or '""'
        return [f'{rule}: "{tool.name}>\\n" {rule}_p*',
                f'{rule}_p: "<parameter=" ({names}) ">\\n" free_value "\\n"']
    required = set(tool.parameters.get("required", []))
    parts, rules = [], []
    for j, (key, schema) in enumerate(properties.items()):
        where = f"tools: {tool.name}.parameters.properties.{key}"
        if not _SAFE_KEY.match(key):
            raise ToolError(f"{where}: a strict tool's parameter names must be letters, digits, '_', '.' or '-'")
        value = f"{rule}_{j}"
        rules.append(f'{value}_p: "<parameter={key}>\\n" {value} "\\n"')
        rules.append(_value_rule(value, schema if isinstance(schema, dict) else {}, where))
        parts.append(f"{value}_p" + ("" if key in required else "?"))
    return [f'{rule}: "{tool.name}>\\n" {" ".join(parts)}', *rules]


def _value_rule(rule: str, schema: dict[str, Any], where: str) -> str:
    """A parameter's value and its closing tag: bare text for strings, JSON for everything else."""
    if schema.get("type") == "string":
        for keyword in _STRING_UNSUPPORTED:
            if keyword in schema:
                raise ToolError(f"{where}.{keyword} is not supported for a strict tool's string parameter")
        if "enum" in schema or "const" in schema:
            options = schema.get("enum", [schema.get("const")])
            return f"{rule}: ({' | '.join(json.dumps(str(o)) for o in options)}) " + r'"\n</parameter>"'
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        repeat = f"{{{low},{int(high)}}}" if high is not None else (f"{{{low},}}" if low else "*")
        return f"{rule}[lazy]: /(.|\\n){repeat}\\n<\\/parameter>/"
    return f"{rule}: {_inline_json(schema)} " + r'"\n</parameter>"'


def _inline_json(schema: dict[str, Any]) -> str:
    """``%json {...}`` with edgekit's JSON style, unless the schema sets its own ``x-guidance``."""
    styled = {**schema, "x-guidance": {**_JSON_STYLE, **schema.get("x-guidance", {})}}
    return "%json " + json.dumps(styled)


def grammar_problem(fmt: ReplyFormat) -> str | None:
    """Why the grammar for ``fmt`` cannot be built, naming the schema feature; None if it can.

    Runs without a tokenizer, so the request is refused before it is queued."""
    if not fmt.constrained():
        return None
    try:
        lark = lark_grammar(fmt, 0, 1, lead=False)
    except ToolError as exc:
        return str(exc)
    import llguidance

    error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(llguidance.LLMatcher.grammar_from_lark(lark))
    if not error:
        return None
    # "at 1(8): failed to compile JSON schema: Unimplemented keys: [...]" and the grammar's source.
    return re.sub(r"^at \d+\(\d+\): ", "", messages[0].splitlines()[0])


class Constraint:
    """One reply's mask: ``apply`` before sampling, ``advance`` after; free until ``gate`` is seen."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, gate: int | None) -> None:
        self.matcher, self.vocab_size, self.gate = matcher, vocab_size, gate
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        # The mask of the grammar's current state, once computed: a drafting step reads it twice
        # (for the draft and for the verified token) before the next advance.
        self._allowed: np.ndarray | None = None
        # Time spent in the grammar (mask, its application, advancing) and the steps it ran for:
        # what constrained decoding adds per token (bench/agent_cost.py).
        self.grammar_s, self.steps = 0.0, 0

    @property
    def active(self) -> bool:
        return self.gate is None

    def allowed(self) -> np.ndarray | None:
        """Which tokens the grammar allows next ([vocab_size] of 0/1), None while it is not active."""
        if self.gate is not None:
            return None
        if self._allowed is None:
            started = time.perf_counter()
            self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            if self.matcher.is_error():
                raise EdgekitError(f"grammar: {self.matcher.get_error()}")
            self._allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little", count=self.vocab_size)
            self.grammar_s += time.perf_counter() - started
            self.steps += 1
        return self._allowed

    def apply(self, logits: np.ndarray) -> None:
        """Set the logits of tokens the grammar forbids to -inf, in place (the first len(logits)
        tokens: a draft head covers only the first ids)."""
        allowed = self.allowed()
        if allowed is None:
            return
        started = time.perf_counter()
        np.putmask(logits, allowed[: logits.shape[-1]] == 0, -np.inf)
        self.grammar_s += time.perf_counter() - started

    def advance(self, token: int) -> None:
        """Move the grammar past ``token`` (or open the gate when it is the ``</think>`` token)."""
        if self.gate is not None:
            if token == self.gate:
                self.gate = None
            return
        started = time.perf_counter()
        self._allowed = None
        if not self.matcher.consume_token(token):
            raise EdgekitError(f"grammar refused token {token}: {self.matcher.get_error()}")
        self.grammar_s += time.perf_counter() - started


class GrammarCompiler:
    """Builds constraints for one bundle. Its tokenizer index (about 1-2 s to build, tens of MiB) is
    made on the first constrained request, so a device that never constrains never pays for it."""

    def __init__(self, tokenizer: ChatTokenizer, vocab_size: int, eos_ids: Iterable[int]) -> None:
        self.chat_tokenizer, self.vocab_size = tokenizer, vocab_size
        # One end token: llguidance 1.6 (the last with aarch64 wheels) takes a single id. The chat
        # template's end of turn is the one a constrained reply should end with.
        end_of_turn, ends = tokenizer.token_id("<|im_end|>"), sorted(eos_ids)
        self.eos_id = end_of_turn if end_of_turn in ends else ends[0]
        self.special = {text: tokenizer.token_id(text) for text in (CALL_OPEN, CALL_CLOSE, THINK_CLOSE)}
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self.last_used = 0.0  # time.monotonic() of the last constraint built

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _index(self.chat_tokenizer, self.vocab_size, self.eos_id)
            return self._tokenizer

    def release(self, idle_s: float = 0.0) -> bool:
        """Drop the tokenizer index (about 31 MiB on Qwen3.5's vocabulary) unless a constraint was built
        in the last ``idle_s`` seconds; the next constrained request builds it again (under a second
        here). True if there was one to drop."""
        if idle_s and time.monotonic() - self.last_used < idle_s:
            return False
        with self._lock:
            held, self._tokenizer = self._tokenizer is not None, None
        if held:
            trim_heap()
        return held

    def constraint(self, fmt: ReplyFormat, thinking: bool) -> Constraint | None:
        """The reply's constraint, or None when ``fmt`` needs none."""
        if not fmt.constrained():
            return None
        call_open, call_close, think_end = (self.special[t] for t in (CALL_OPEN, CALL_CLOSE, THINK_CLOSE))
        if fmt.tools and (call_open is None or call_close is None):
            raise ToolError("this bundle's tokenizer has no <tool_call> token: it cannot call tools")
        lark = lark_grammar(fmt, call_open or 0, call_close or 0, lead=thinking)
        self.last_used = time.monotonic()
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer(), llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
        if matcher.is_error():
            raise ToolError(f"grammar: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size, think_end if thinking else None)


def _index(chat: ChatTokenizer, vocab_size: int, eos_id: int) -> llguidance.LLTokenizer:
    """llguidance's tokenizer over the bundle's own ``tokenizers`` instance.

    Handing llguidance the tokenizer.json would make it load a second copy of the BPE (it cost 128 MiB
    of RSS against 31 MiB this way, measured on Qwen3.5's 248k vocabulary); instead it gets each id's
    bytes and calls back into the daemon's tokenizer. All added tokens count as special, so free-text
    rules can never emit ``<tool_call>`` as text, whatever the tokenizer's own flags say.
    """
    import llguidance

    tokenizer = chat.tokenizer
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos_id)
    to_byte = _byte_level_decoder()
    added = tokenizer.get_added_tokens_decoder()
    tokens: list[bytes] = []
    for token_id in range(vocab_size):
        text = tokenizer.id_to_token(token_id)
        if text is None:
            tokens.append(b"")  # the padding rows past the tokenizer's ids: never allowed
        elif token_id in added:
            tokens.append(text.encode())
        else:
            tokens.append(bytes(to_byte[ch] for ch in text))

    class _Vocabulary:
        eos_token_id, bos_token_id = eos_id, None
        special_token_ids = sorted(added)

        def __init__(self) -> None:
            self.tokens = tokens

        def __call__(self, text: bytes) -> list[int]:
            return chat.encode(text.decode("utf-8", errors="replace"))

    vocabulary = _Vocabulary()
    index = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary), n_vocab=vocab_size, slices=_SLICES)
    # llguidance copied the bytes; its wrapper would keep the list (13 MiB of Python objects) alive.
    vocabulary.tokens.clear()
    return index


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character map, reversed: how byte-level BPE writes each byte in its vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}
