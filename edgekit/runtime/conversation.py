"""One chat turn over the engine: template, sessions, streaming text, stop sequences, cancellation.

Transport-free: the MQTT daemon and ``edgekit generate`` call it with callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgekit.errors import EdgekitError
from edgekit.runtime.engine import Engine, GenerationStats
from edgekit.runtime.sampling import Sampling
from edgekit.runtime.sessions import Session, SessionStore
from edgekit.runtime.tokenizer import ChatTokenizer


class SessionEvicted(EdgekitError):
    """The named session is gone from the device; the client should resend the history."""


@dataclass
class Turn:
    """What to generate: chat messages (or a raw prompt), limits and sampling."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    thinking: bool = False
    session: str | None = None
    new_session: bool = False
    speculative: bool = True  # draft with the MTP head where the bundle has one (greedy only)


@dataclass
class TurnResult:
    """How a turn ended."""

    text: str
    finish_reason: str  # stop (end of turn or stop sequence), length, context, cancelled
    stats: GenerationStats
    session_tokens: int = 0


def run_turn(
    engine: Engine,
    tokenizer: ChatTokenizer,
    turn: Turn,
    on_text: Callable[[str], None],
    cancelled: Callable[[], bool] = lambda: False,
    sessions: SessionStore | None = None,
) -> TurnResult:
    """Generate one turn, calling ``on_text`` with each piece of complete UTF-8 text."""
    session = _open_session(turn, sessions)
    if session is not None and session.tokens:
        # Close the previous assistant turn exactly as a fresh rendering of the history would.
        closing = session.pending if session.pending else []
        if closing != [tokenizer.token_id("<|im_end|>")]:
            closing = closing + tokenizer.encode("<|im_end|>")
        ids = closing + tokenizer.encode("\n" + _render(tokenizer, turn))
    else:
        session = session or (Session(engine.new_state()) if turn.session else None)
        ids = tokenizer.encode(_render(tokenizer, turn))
    state = session.state if session is not None else engine.new_state()
    stats = GenerationStats()
    stream = tokenizer.stream()
    emitted: list[str] = []
    pending_text = ""
    hold = max((len(s) for s in turn.stop), default=1) - 1
    finish = None
    generated: list[int] = []
    for token in engine.generate(ids, turn.max_tokens, turn.sampling, state=state, stats=stats,
                                 speculative=turn.speculative):
        generated.append(token)
        if token in engine.eos_ids:
            break
        piece = stream.step(tokenizer.tokenizer, token)
        if piece:
            pending_text += piece
            cut = _find_stop(pending_text, turn.stop)
            if cut is not None:
                pending_text = pending_text[:cut]
                finish = "stop"
                break
            # Hold back text that may still grow into a stop sequence.
            ready = pending_text[: len(pending_text) - hold] if hold else pending_text
            if ready:
                on_text(ready)
                emitted.append(ready)
                pending_text = pending_text[len(ready):]
        if cancelled():
            finish = "cancelled"
            break
    if pending_text:
        on_text(pending_text)
        emitted.append(pending_text)
    finish = finish or stats.finish_reason
    if session is not None and turn.session and sessions is not None:
        # The state has run every token but the last generated one, which leads the next turn.
        session.tokens.extend(ids + generated[:-1])
        session.pending = generated[-1:]
        sessions.put(turn.session, session)
    return TurnResult("".join(emitted), finish, stats, session_tokens=state.length)


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


def _render(tokenizer: ChatTokenizer, turn: Turn) -> str:
    if turn.prompt is not None:
        return turn.prompt
    return tokenizer.render(turn.messages or [], thinking=turn.thinking)


def _find_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
