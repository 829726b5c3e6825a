"""How closely two runs of a model agree, position by position, when both are fed the same tokens.

Teacher forcing: both sides see the same token sequence and produce the next-token distribution at
every position, so one near-tie cannot send the rest of a comparison down another path (greedy
generation would). Used by the build's parity check (export against the PyTorch reference) and to
compare a device's kernels with the build host's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from edgekit.runtime.engine import Engine
from edgekit.runtime.vision import ImageSpan


@dataclass(frozen=True)
class Agreement:
    """Agreement of a candidate with a reference over some positions."""

    positions: int
    top1: float  # share of positions whose most likely token is the same
    mean_kl: float  # mean KL(reference || candidate), nats
    max_kl: float
    max_delta: float  # largest |logit difference| over the reference's logit range at that position

    @classmethod
    def of(cls, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> Agreement:
        """Agreement over every row of each (reference, candidate) pair of [positions, vocab] logits."""
        agree: list[bool] = []
        kls: list[float] = []
        deltas: list[float] = []
        for reference, candidate in pairs:
            if reference.shape != candidate.shape:
                raise ValueError(f"logits of shape {reference.shape} and {candidate.shape} cannot be compared")
            for ref, cand in zip(reference, candidate):
                agree.append(int(np.argmax(ref)) == int(np.argmax(cand)))
                kls.append(kl(ref, cand))
                spread = float(ref.max() - ref.min()) or 1.0
                deltas.append(float(np.max(np.abs(ref.astype(np.float64) - cand))) / spread)
        if not agree:
            raise ValueError("no positions to compare")
        return cls(positions=len(agree), top1=float(np.mean(agree)), mean_kl=float(np.mean(kls)),
                   max_kl=float(np.max(kls)), max_delta=float(np.max(deltas)))


def kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    """KL(reference || candidate) of two logit vectors, in float64."""
    p = log_softmax(reference.astype(np.float64))
    q = log_softmax(candidate.astype(np.float64))
    return float(np.sum(np.exp(p) * (p - q)))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities of logits ``x`` along its last axis."""
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def forced_logits(engine: Engine, prompt: list[int], tokens: list[int],
                  tick: Callable[[], object] | None = None, images: Sequence[ImageSpan] = ()) -> np.ndarray:
    """The engine's logits for each of ``tokens`` ([len(tokens), vocab]): row i is the distribution
    after ``prompt`` (with ``images`` in place of its pads) and ``tokens[:i]``, one decode step per
    token after the prompt's prefill; ``tick`` is called after every step."""
    state = engine.new_state()
    rows = [engine.forward(state, prompt, images).copy()]
    if tick:
        tick()
    for token in tokens[:-1]:
        rows.append(engine.forward(state, [token]).copy())
        if tick:
            tick()
    return np.stack(rows)
