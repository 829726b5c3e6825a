"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class LogitsConstraint(Protocol):
    """What the sampler needs from a grammar (``edgekit.agent.grammar.Constraint``)."""

    def apply(self, logits: np.ndarray) -> None:
        """Set forbidden tokens' logits to -inf, in place."""

    def advance(self, token: int) -> None:
        """Record the token that was chosen."""


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


class Sampler:
    """Draws tokens for one generation; a seed makes the draws repeatable."""

    def __init__(self, settings: Sampling) -> None:
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.settings.temperature <= 0:
            return int(np.argmax(logits))
        order, probs = self.distribution(logits)
        return int(order[self.rng.choice(order.size, p=probs)])

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens a draw may return and their probabilities, with temperature, top-k and top-p
        applied (greedy: the argmax, with probability 1)."""
        s = self.settings
        if s.temperature <= 0:
            return np.array([int(np.argmax(logits))]), np.ones(1)
        scaled = logits.astype(np.float64) / s.temperature
        if 0 < s.top_k < scaled.size:
            # argpartition keeps this O(vocab) rather than sorting 248k logits per token.
            keep = np.argpartition(scaled, -s.top_k)[-s.top_k:]
        else:
            keep = np.arange(scaled.size)
        order = keep[np.argsort(scaled[keep])[::-1]]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if s.top_p < 1.0:
            cutoff = int(np.searchsorted(np.cumsum(probs), s.top_p)) + 1
            order, probs = order[:cutoff], probs[:cutoff] / probs[:cutoff].sum()
        return order, probs


def choose(logits: np.ndarray, sampler: Sampler, constraint: LogitsConstraint | None = None) -> int:
    """The next token: ``sampler``'s pick among the tokens ``constraint`` allows (it then moves past it)."""
    if constraint is not None:
        constraint.apply(logits)
    token = sampler(logits)
    if constraint is not None:
        constraint.advance(token)
    return token
