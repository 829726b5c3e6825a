"""One chat turn over the engine: template, sessions, streaming text, stop sequences, cancellation.

Transport-free: the MQTT daemon and ``edgekit generate`` call it with callbacks.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from edgekit.agent.grammar import GrammarCompiler, ReplyFormat
from edgekit.agent.tools import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, ToolCall, ToolError, check_tool_choice, parse_call
from edgekit.errors import EdgekitError
from edgekit.runtime.engine import Engine, GenerationStats
from edgekit.runtime.images import Patches
from edgekit.runtime.sampling import Sampling
from edgekit.runtime.sessions import Session, SessionStore
from edgekit.runtime.tokenizer import ChatTokenizer
from edgekit.runtime.vision import IMAGE_PAD, ImageSpan, VisionEncoder, place_images


class SessionEvicted(EdgekitError):
    """The named session is gone from the device; the client should resend the history."""


class VisionUnavailable(EdgekitError):
    """A turn with images on a bundle that cannot take them."""


@dataclass
class Turn:
    """What to generate: chat messages (or a raw prompt), limits and sampling."""

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    thinking: bool = False
    session: str | None = None
    new_session: bool = False
    speculative: bool = True  # draft with the MTP head where the bundle has one
    fmt: ReplyFormat = field(default_factory=ReplyFormat)  # tools, tool choice, response_format
    # The messages' images in order of appearance, cut for the encoder; each message part that held
    # one is ``{"type": "image"}`` in ``messages``.
    images: list[Patches] = field(default_factory=list)


@dataclass
class TurnResult:
    """How a turn ended."""

    text: str
    finish_reason: str  # stop (end of turn or stop sequence), tool_calls, length, context, cancelled
    stats: GenerationStats
    session_tokens: int = 0
    tool_calls: list[ToolCall] = field(default_factory=list)
    tools_tokens: int = 0  # what the tool definitions take of the context
    grammar_ms_per_token: float | None = None  # constrained turns: the grammar's time per masked step
    reasoning: str = ""  # thinking turns: the text of the <think> block (never part of ``text``)
    image_tokens: int = 0  # what this turn's images take of the context


def run_turn(
    engine: Engine,
    tokenizer: ChatTokenizer,
    turn: Turn,
    on_text: Callable[[str], None],
    cancelled: Callable[[], bool] = lambda: False,
    sessions: SessionStore | None = None,
    grammars: GrammarCompiler | None = None,
    on_call: Callable[[int, ToolCall], None] = lambda index, call: None,
    on_reasoning: Callable[[str], None] | None = None,
    vision: VisionEncoder | None = None,
) -> TurnResult:
    """Generate one turn, calling ``on_text`` with each piece of complete UTF-8 text.

    With ``turn.thinking`` the reply opens inside Qwen3.5's ``<think>`` block: its text goes to
    ``on_reasoning`` (or, without one, to ``on_text`` as it always did) until the model's ``</think>``.

    Tool-call markup never reaches ``on_text``: ``on_call`` announces each call once its function
    name is known, and the parsed calls come back in the result. ``grammars`` builds the constraint
    that ``turn.fmt`` asks for (a turn that needs one fails without it). ``vision`` encodes the
    turn's images (a turn with images fails without it).
    """
    session = _open_session(turn, sessions)
    fmt = turn.fmt
    if session is not None and session.tokens:
        fmt = _session_tools(fmt, session)
        # Close the previous assistant turn exactly as a fresh rendering of the history would.
        closing = session.pending if session.pending else []
        if closing != [tokenizer.token_id("<|im_end|>")]:
            closing = closing + tokenizer.encode("<|im_end|>")
        text = turn.prompt if turn.prompt is not None else tokenizer.render_continuation(turn.messages or [], thinking=turn.thinking)
        ids = closing + tokenizer.encode("\n" + text)
        tools_tokens = session.tools_tokens
    else:
        session = session or (Session(engine.new_state()) if turn.session else None)
        if fmt.choice is not None and not fmt.tools:
            check_tool_choice(fmt.choice, fmt.tools)  # the request left it to a session that is not there
        ids, tools_tokens = _first_prompt(tokenizer, turn)
        if session is not None:
            session.tools, session.tools_tokens = fmt.tools, tools_tokens
    spans: list[ImageSpan] = []
    if turn.images:
        if vision is None:
            raise VisionUnavailable("this bundle was built text-only (no vision encoder): it cannot take images")
        pad = tokenizer.token_id(IMAGE_PAD)
        if pad is None:
            raise VisionUnavailable(f"the bundle's tokenizer has no {IMAGE_PAD} token")
        ids, spans = place_images(ids, pad, turn.images, vision)
    constraint = None
    if fmt.constrained():
        if grammars is None:
            raise ToolError("constrained output needs the bundle's grammar compiler")
        constraint = grammars.constraint(fmt, thinking=turn.thinking and turn.prompt is None)
    state = session.state if session is not None else engine.new_state()
    if constraint is None and grammars is not None and state.length + len(ids) > engine.context_length // 2:
        # A long prefill is what sets the daemon's memory peak: keep the grammar's index out of it.
        grammars.release()
    stats = GenerationStats()
    thinking = turn.thinking and turn.prompt is None  # a raw prompt has no generation prompt that opens <think>
    reply = _Reply(tokenizer, fmt, turn.stop, on_text, on_call, on_reasoning if thinking else None)
    finish = None
    generated: list[int] = []
    for token in engine.generate(ids, turn.max_tokens, turn.sampling, state=state, stats=stats,
                                 speculative=turn.speculative, constraint=constraint, images=spans):
        generated.append(token)
        if token in engine.eos_ids:
            break
        if reply.add(token):
            finish = "stop"
            break
        if cancelled():
            finish = "cancelled"
            break
    reply.close()
    finish = finish or stats.finish_reason
    if finish == "stop" and reply.calls:
        finish = "tool_calls"
    if session is not None and turn.session and sessions is not None:
        # The state has run every token but the last generated one, which leads the next turn.
        session.tokens.extend(ids + generated[:-1])
        session.pending = generated[-1:]
        sessions.put(turn.session, session)
    grammar_ms = round(1000 * constraint.grammar_s / constraint.steps, 3) if constraint and constraint.steps else None
    return TurnResult("".join(reply.emitted), finish, stats, session_tokens=state.length, tool_calls=reply.calls,
                      tools_tokens=tools_tokens, grammar_ms_per_token=grammar_ms, reasoning="".join(reply.reasoning),
                      image_tokens=sum(len(span.embeds) for span in spans))


class _Reply:
    """Splits generated tokens into text (held back while it may grow into a stop sequence) and
    tool calls (collected between the ``<tool_call>`` tokens and parsed when each closes)."""

    def __init__(self, tokenizer: ChatTokenizer, fmt: ReplyFormat, stop: list[str], on_text: Callable[[str], None],
                 on_call: Callable[[int, ToolCall], None], on_reasoning: Callable[[str], None] | None = None) -> None:
        self.tokenizer, self.fmt, self.stop = tokenizer, fmt, stop
        self.on_text, self.on_call, self.on_reasoning = on_text, on_call, on_reasoning
        # Inside the <think> block the generation prompt opened, until the model closes it.
        self.thinking = on_reasoning is not None
        self.think_close = tokenizer.token_id(THINK_CLOSE)
        self.reasoning: list[str] = []
        self.after_think = False  # the line breaks after </think> are the template's, not the answer's
        self.stream = tokenizer.stream()
        self.open_id = tokenizer.token_id(CALL_OPEN) if fmt.tools else None
        self.close_id = tokenizer.token_id(CALL_CLOSE)
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.pending = ""
        self.emitted: list[str] = []
        self.calls: list[ToolCall] = []
        self.markup: str | None = None  # the open call's text so far
        self.call_id = ""
        self.announced = False

    def add(self, token: int) -> bool:
        """Take one token; True when a stop sequence ended the text."""
        piece = self.stream.step(self.tokenizer.tokenizer, token) or ""
        if self.thinking:
            if token == self.think_close:
                self.thinking, self.after_think = False, True
            elif piece and self.on_reasoning:
                self.on_reasoning(piece)
                self.reasoning.append(piece)
            return False
        if self.after_think:
            piece = piece.lstrip("\n")
            self.after_think = not piece
        if token == self.open_id and self.markup is None:
            self._flush()
            self.markup, self.call_id, self.announced = "", _call_id(), False
            return False
        if self.markup is not None:
            if token == self.close_id:
                self._finish_call(self.markup)
                return False
            self.markup += piece
            if not self.announced and ">" in self.markup:
                self.announced = True
                self.on_call(len(self.calls), ToolCall(self.call_id, _call_name(self.markup), None))
            return False
        if not piece:
            return False
        self.pending += piece
        cut = _find_stop(self.pending, self.stop)
        if cut is not None:
            self.pending = self.pending[:cut]
            return True
        if self._markup_only():
            return False
        # Hold back text that may still grow into a stop sequence.
        ready = self.pending[: len(self.pending) - self.hold] if self.hold else self.pending
        if ready:
            self._emit(ready)
            self.pending = self.pending[len(ready):]
        return False

    def close(self) -> None:
        """End of generation: flush held text; a call cut off mid-way is reported, not dropped."""
        self._flush()
        if self.markup is not None:
            self._finish_call(self.markup, cut_off=True)

    def _finish_call(self, markup: str, cut_off: bool = False) -> None:
        call = parse_call(markup, list(self.fmt.tools), self.call_id)
        if cut_off:
            call = replace(call, name=call.name or _call_name(markup), arguments=None, error="the reply ended inside this call")
        if not self.announced:
            self.on_call(len(self.calls), call)
        self.calls.append(call)
        self.markup = None

    def _markup_only(self) -> bool:
        """Whether the held text is only the line breaks between and after calls: markup, not text."""
        return bool(self.calls) and not self.pending.strip()

    def _flush(self) -> None:
        if self._markup_only():
            self.pending = ""
        if self.pending:
            self._emit(self.pending)
            self.pending = ""

    def _emit(self, text: str) -> None:
        self.on_text(text)
        self.emitted.append(text)


def _call_name(markup: str) -> str:
    """The function name at the head of call markup (``\n<function=NAME>``), as far as it goes."""
    return markup.split(">", 1)[0].strip().removeprefix("<function=")


def _call_id() -> str:
    return "call_" + secrets.token_hex(8)


def _first_prompt(tokenizer: ChatTokenizer, turn: Turn) -> tuple[list[int], int]:
    """The prompt's ids, and how many of them the tool definitions take."""
    if turn.prompt is not None:
        return tokenizer.encode(turn.prompt), 0
    messages, tools = turn.messages or [], [t.as_openai() for t in turn.fmt.tools]
    text = tokenizer.render(messages, thinking=turn.thinking, tools=tools)
    ids = tokenizer.encode(text)
    if not tools:
        return ids, 0
    return ids, tokenizer.extra_tokens(text, tokenizer.render(messages, thinking=turn.thinking))


def _session_tools(fmt: ReplyFormat, session: Session) -> ReplyFormat:
    """A later turn uses the tools its session's prompt holds (and may force a call among them
    without resending them); sending other tools is an error, as the model would be asked to call
    functions it was never shown."""
    if fmt.tools and fmt.tools != session.tools:
        raise ToolError("field 'tools' differs from the tools this session started with; start a new session to change them")
    if not fmt.tools and fmt.choice is not None:
        check_tool_choice(fmt.choice, session.tools, "tools in this session")
    return replace(fmt, tools=session.tools) if session.tools and not fmt.tools else fmt  # choice: auto by default


def _open_session(turn: Turn, sessions: SessionStore | None) -> Session | None:
    if not turn.session or sessions is None:
        return None
    if turn.new_session:
        sessions.take(turn.session)
        return None
    session = sessions.take(turn.session)
    if session is None and (why := sessions.evicted_reason(turn.session)):
        raise SessionEvicted(f"session {turn.session!r} {why}; resend the history with new_session: true")
    return session


def _find_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
