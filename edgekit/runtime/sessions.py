"""Multi-turn sessions kept on the device: each holds its sequence's model state, so turn N does not
re-read the history. Qwen3.5's recurrent state is fixed-size; only the KV cache of its full-attention
layers grows with the conversation, so sessions are bounded by bytes, least recently used first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from edgekit.agent.tools import Tool
from edgekit.runtime.engine import State


@dataclass
class Session:
    """A conversation's state and the tokens that produced it (kept for exactness checks and replay)."""

    state: State
    tokens: list[int] = field(default_factory=list)
    # The last generated token: sampled but not yet run through the model (see Engine.generate).
    pending: list[int] = field(default_factory=list)
    # The tools its first turn rendered into the prompt: later turns parse and constrain calls by them.
    tools: tuple[Tool, ...] = ()
    tools_tokens: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def nbytes(self) -> int:
        return self.state.nbytes()


class SessionStore:
    """Sessions by id, evicting the least recently used beyond ``max_bytes`` and after ``idle_s``."""

    def __init__(self, max_bytes: int, idle_s: float) -> None:
        self.max_bytes, self.idle_s = max_bytes, idle_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._evicted: OrderedDict[str, str] = OrderedDict()  # id -> why, so clients learn what happened
        self._lock = threading.Lock()

    def take(self, session_id: str) -> Session | None:
        """Remove and return a session for a turn (it is put back when the turn ends)."""
        with self._lock:
            self._expire()
            return self._sessions.pop(session_id, None)

    def evicted_reason(self, session_id: str) -> str | None:
        with self._lock:
            return self._evicted.get(session_id)

    def put(self, session_id: str, session: Session) -> None:
        with self._lock:
            session.last_used = time.monotonic()
            self._sessions[session_id] = session
            self._sessions.move_to_end(session_id)
            self._evicted.pop(session_id, None)
            while self._sessions and self.total_bytes() > self.max_bytes:
                oldest, _ = self._sessions.popitem(last=False)
                self._remember(oldest, "evicted to stay within the session memory limit")

    def total_bytes(self) -> int:
        return sum(s.nbytes() for s in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        now = time.monotonic()
        for session_id in [k for k, s in self._sessions.items() if now - s.last_used > self.idle_s]:
            del self._sessions[session_id]
            self._remember(session_id, f"expired after {self.idle_s:.0f} s idle")

    def _remember(self, session_id: str, why: str) -> None:
        self._evicted[session_id] = why
        while len(self._evicted) > 1024:
            self._evicted.popitem(last=False)
