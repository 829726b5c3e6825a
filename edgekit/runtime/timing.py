"""Generations timed on a fixed filler prompt: `edgekit bench`, `edgekit tune` and the side-by-side
with llama.cpp (bench/anchor.py) measure speed the same way."""

from __future__ import annotations

from edgekit.runtime.engine import Engine, GenerationStats

# Distinct ordinary token ids: a fixed-length prompt without template effects.
FILLER = 1000


def filler_prompt(length: int) -> list[int]:
    """``length`` distinct ordinary token ids."""
    return [FILLER + i for i in range(length)]


def timed_generation(engine: Engine, prompt_len: int, new_tokens: int) -> GenerationStats:
    """Up to ``new_tokens`` tokens after ``prompt_len`` filler tokens; the generation's counts and timings."""
    stats = GenerationStats()
    list(engine.generate(filler_prompt(prompt_len), new_tokens, stats=stats))
    return stats
