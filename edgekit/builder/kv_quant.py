"""An int8 KV cache for the engine's graph: per-channel scales measured on calibration tokens.

GroupQueryAttention stores ``round(x / scale)`` clipped to int8, with one fixed scale per channel of
each layer's keys and values, so the scales must cover what the model writes there. They are
measured here by running the export (still with its fp16 cache) on the parity prompts, chat-formatted
as users send them, and on random ordinary tokens that reach every part of the vocabulary. A rotary
pair of key channels can take any share of the pair's norm at some position, so both channels of a
pair get the largest norm seen, not just their own largest value: a long context cannot clip where
calibration's positions never went.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnx

from edgekit.builder.graph_memory import rotary_pairs, save, store_kv_cache_int8
from edgekit.builder.parity import prompt_ids
from edgekit.errors import EdgekitError
from edgekit.runtime.embedding import embeds_graph
from edgekit.runtime.engine import Engine
from edgekit.runtime.tokenizer import ChatTokenizer

RANDOM_TOKENS = 1024
_INT8_MAX = 127


def _peaks(cache: np.ndarray, rotary: tuple[int, bool] | None) -> np.ndarray:
    """Largest magnitude per channel of a cache [1, heads, positions, head_size] over its positions,
    rotary pairs taking their norm."""
    values = np.abs(cache.astype(np.float32))
    if rotary:
        dims, interleaved = rotary
        first, second = ((slice(0, dims, 2), slice(1, dims, 2)) if interleaved
                         else (slice(0, dims // 2), slice(dims // 2, dims)))
        values[..., first] = values[..., second] = np.sqrt(values[..., first] ** 2 + values[..., second] ** 2)
    return values.max(axis=2, keepdims=True)


def calibration_prompts(bundle: Path) -> list[list[int]]:
    """Token ids to calibrate on: the parity prompts through the chat template, then random ordinary tokens."""
    tokenizer = ChatTokenizer(bundle)
    ordinary = tokenizer.tokenizer.get_vocab_size(with_added_tokens=False)
    rng = random.Random(0)
    return [*prompt_ids(tokenizer), [rng.randrange(ordinary) for _ in range(RANDOM_TOKENS)]]


def kv_scales(bundle: Path, rotary: dict[str, tuple[int, bool]], threads: int | None = None) -> dict[str, np.ndarray]:
    """Per-channel int8 scales [1, kv_heads, 1, head_size] for every KV cache input of ``bundle``'s graph."""
    engine = Engine(bundle, threads=threads)
    empty = engine.new_state().past
    caches = [name for name in empty if name.startswith("past_key_values.")]
    for name in caches:
        if empty[name].dtype.kind != "f":
            raise EdgekitError(f"{bundle}: calibration needs the graph's float cache; {name} is {empty[name].dtype}")
    peaks: dict[str, np.ndarray] = {}
    for ids in calibration_prompts(bundle):
        state = engine.new_state()
        engine.forward(state, ids)
        for name in caches:
            seen = _peaks(state.past[name][:, :, : state.length], rotary.get(name))
            peaks[name] = np.maximum(peaks[name], seen) if name in peaks else seen
    # A channel that stayed zero keeps a tiny scale: whatever it later holds stays near zero.
    return {name: np.maximum(peak, 1e-6) / _INT8_MAX for name, peak in peaks.items()}


def quantize_kv_cache(bundle: Path, threads: int | None = None) -> int:
    """Calibrate and store the KV cache of ``bundle``'s engine graph (its embeds variant) in int8;
    return how many attention layers changed: none where the export has no embeds graph (k_quant's
    lookup), since ``model.onnx`` keeps its cache for onnxruntime-genai."""
    graph = embeds_graph(bundle / "model.onnx")
    if not graph.is_file():
        return 0
    model = onnx.load(str(graph), load_external_data=False)
    scales = kv_scales(bundle, rotary_pairs(model), threads)
    changed = store_kv_cache_int8(model, scales)
    save(model, graph)
    return changed
