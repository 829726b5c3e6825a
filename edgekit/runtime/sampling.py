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


# Top-k and top-p look first at the tokens at least this likely relative to the most likely one, and
# further only when those cannot settle the cut: sorting or partitioning all 248,320 logits costs 15 ms
# a token, and 40 ms where many are equal (numpy's introselect on a trained model's unused rows).
_FLOORS = (1e-4, 1e-9, 0.0)


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
        applied: the most likely first, or every token in id order when nothing is cut (greedy: the
        argmax, with probability 1)."""
        s = self.settings
        if s.temperature <= 0:
            return np.array([int(np.argmax(logits))]), np.ones(1)
        scaled = logits.astype(np.float64) / s.temperature
        weights = np.exp(scaled - scaled.max())
        cut_k = 0 < s.top_k < weights.size
        if not cut_k and s.top_p >= 1.0:
            return np.arange(weights.size), weights / weights.sum()
        total = weights.sum()
        for floor in _FLOORS:
            order = np.flatnonzero(weights >= floor) if floor else np.arange(weights.size)
            if cut_k:
                if order.size < s.top_k and floor:
                    continue  # fewer candidates than top-k keeps
                if order.size > s.top_k:
                    order = order[np.argpartition(weights[order], -s.top_k)[-s.top_k:]]
                total = weights[order].sum()
            if s.top_p < 1.0 and floor and weights[order].sum() < s.top_p * total:
                continue  # the nucleus reaches below the candidates
            order = order[np.argsort(weights[order])[::-1]]
            probs = weights[order] / total
            if s.top_p < 1.0:
                cutoff = int(np.searchsorted(np.cumsum(probs), s.top_p)) + 1
                order, probs = order[:cutoff], probs[:cutoff] / probs[:cutoff].sum()
            return order, probs
        raise AssertionError("the last floor takes every token")


def choose(logits: np.ndarray, sampler: Sampler, constraint: LogitsConstraint | None = None) -> int:
    """The next token: ``sampler``'s pick among the tokens ``constraint`` allows (it then moves past it)."""
    if constraint is not None:
        constraint.apply(logits)
    token = sampler(logits)
    if constraint is not None:
        constraint.advance(token)
    return token
