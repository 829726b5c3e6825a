"""Speculative decoding with Qwen3.5's own MTP head: the draft proposes one token, one main-graph step
verifies it; greedy or sampled.

A bundle built with ``--include-mtp`` carries ``draft.onnx`` (edgekit.builder.draft_graph): the MTP
layer with a head over the first token ids. At position p it takes the main model's final hidden
state h_p and the embedding of token p+1 (an *entry*, kept in the draft's own KV cache) and proposes
token p+2.

Each step feeds the main graph the tokens not yet in its state (``pending``: one, or more after a
rejection) plus the draft, and keeps the logits of the last two positions:
- the first says what follows the last pending token: the request's sampler draws that token from
  them, and if it is the draft, the draft is accepted and the second gives a bonus token (two tokens
  for one step);
- otherwise the drawn token is the next one, and the step's recurrent and conv state are thrown away
  (they were written into spare buffers; the state's own arrays still hold the state before the
  step); its KV entries are discarded by setting the length back. The pending tokens are fed again
  next step.
Past PENDING_CAP pending tokens a plain step (no draft) catches up, and so does a sampled request's
step whose draft the head gives less than DRAFT_P_MIN.

Every token is drawn from the main graph's logits at its own position, one draw each, in the order
plain decoding draws them: greedy output is plain greedy decoding's, and sampled output (same seed)
plain sampled decoding's, token for token. For sampling this is speculative sampling's rule (accept a
draft x with probability min(1, p(x)/q(x)), else draw from p without x) for a draft that is the
head's argmax (q one-hot on x): acceptance p(x), and on rejection a draw from p that is not x. Only a
multi-token step's arithmetic may differ in the last bits from one-token steps (docs/benchmarks.md:
agreement on int4).

The step model and its measured costs: bench/mtp_cost.py and docs/benchmarks.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from edgekit.errors import EdgekitError
from edgekit.kernels import int4_layout
from edgekit.runtime.resident import session_options, trim_heap
from edgekit.runtime.sampling import Sampler, choose

if TYPE_CHECKING:
    from edgekit.runtime.embedding import EmbeddingTable
    from edgekit.runtime.engine import Engine, GenerationStats, State
    from edgekit.runtime.sampling import LogitsConstraint

DRAFT_GRAPH = "draft.onnx"
STOP_SPINNING = "session.force_spinning_stop"
# Pending tokens before a plain step: from the measured step costs, caps 2 and 3 predict speed within
# 0.5 % of each other and cap 1 about 1.5 % less (bench/mtp_cost.py, 0.8B int4, 2 threads).
PENDING_CAP = 2
ENTRY_CHUNK = 64
# A sampled request's step verifies the draft only where the head gives it at least this probability
# (softmax over the head's rows; llama.cpp's --draft-p-min does the same): below it, drafts are drawn
# too seldom to pay for their verify steps. On the trained fixture's held-out text half the positions
# fall below 0.25; sampling at temperature 0.7 (top-k 20, top-p 0.8) accepts 0.32 of their drafts and
# 0.76 of the rest. Simulated with the measured step costs (docs/benchmarks.md), the gate takes that
# sampling from 1.00x plain to 1.08x on held-out text and from 1.06x to 1.12x on sampled generations,
# and temperature 1.0 (top-p 0.95) from 0.91x to 1.00x. Greedy requests verify every draft: there the
# gate gained 1 % on held-out text, lost 1 % on generations, and more on the fixture's repetitive
# ones, whose drafts are right even where the small head is unsure (tests/test_speculative.py).
DRAFT_P_MIN = 0.25
# Drafting costs when its drafts are rejected (0.69x plain decoding at no acceptance, break-even
# near 0.45, 1.12x at 0.66, measured on the 0.8B: docs/benchmarks.md). A generation that accepted
# fewer than MIN_ACCEPTANCE of at least PROBE_DRAFTS drafts stops drafting: low enough that a head
# near break-even rarely trips it by chance, high enough to catch one that is no use here.
MIN_ACCEPTANCE = 0.3
PROBE_DRAFTS = 8


@dataclass
class _Entries:
    """What the draft has seen in one generation: its KV cache, and the hidden states and tokens of
    positions not yet entered."""

    caches: dict[str, ort.OrtValue]
    entered: int  # first position without an entry
    tokens: dict[int, int] = field(default_factory=dict)  # position -> token, from ``entered`` on
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # position -> h_p, from ``entered`` on
    length: int = 0  # entries in the cache

    def add_hidden(self, first: int, rows: np.ndarray) -> None:
        """Keep the main model's final hidden states of positions ``first``, ``first + 1``, ... ."""
        self.hidden.update({first + i: row for i, row in enumerate(rows)})


class Drafter:
    """A draft graph (a bundle's ``draft.onnx``, or the builder's ``mtp.onnx``, which takes ids), run
    beside its engine (same threads, same embedding table)."""

    def __init__(self, graph: Path, threads: int, embedding: EmbeddingTable | None, int4: bool = False) -> None:
        """``int4``: ``graph`` runs edgekit's Int4Layout op (the engine checked that it can run here)."""
        options = session_options(threads)
        if int4:
            int4_layout.register(options)
        # Two sessions take turns on the same cores: threads that spin on after their run would
        # take the other's time (see Engine: the main session stops spinning too when drafting).
        options.add_session_config_entry(STOP_SPINNING, "1")
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise EdgekitError(f"{graph}: cannot load the draft graph ({exc})") from exc
        # The engine's table where the draft takes embeddings (draft_graph), else None: it takes ids.
        self.embedding = embedding if any(i.name == "inputs_embeds" for i in self.session.get_inputs()) else None
        self._caches = {i.name: i for i in self.session.get_inputs() if i.name.startswith("past")}
        self._cache_type = np.float16 if next(iter(self._caches.values())).type == "tensor(float16)" else np.float32
        self.rows = int(self.session.get_outputs()[0].shape[-1])
        # The head's confidence below which a step does not draft, for greedy and for sampled requests.
        self.greedy_p_min, self.sampled_p_min = 0.0, DRAFT_P_MIN

    def _new_entries(self, first: int, capacity: int, head_size: int) -> _Entries:
        caches = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, i.shape[1], capacity, head_size), self._cache_type))
                  for name, i in self._caches.items()}
        return _Entries(caches, first)

    def _enter(self, entries: _Entries, constraint: LogitsConstraint | None = None) -> tuple[int, float]:
        """Enter every position whose hidden state and next token are known; return the draft for
        two positions past the last one entered (among the tokens ``constraint`` allows there) and
        the probability the head gives it (0 where the head has no allowed token)."""
        positions = []
        p = entries.entered
        while p in entries.hidden and p + 1 in entries.tokens:
            positions.append(p)
            p += 1
        if not positions:
            raise AssertionError("the draft has nothing new to enter")
        # A prompt's positions go in chunks: attention scores take chunk x cache x heads floats.
        for start in range(0, len(positions), ENTRY_CHUNK):
            logits = self._run(entries, positions[start : start + ENTRY_CHUNK])
        if constraint is not None:
            constraint.apply(logits)
        best = int(np.argmax(logits))
        if not np.isfinite(logits[best]):
            return best, 0.0
        return best, float(1.0 / np.exp(logits - logits[best]).sum())

    def _run(self, entries: _Entries, positions: list[int]) -> np.ndarray:
        """Enter ``positions``; the draft head's logits at the last of them."""
        n = len(positions)
        binding = self.session.io_binding()
        following = [entries.tokens[q + 1] for q in positions]
        if self.embedding is None:
            binding.bind_cpu_input("input_ids", np.array([following], np.int64))
        else:
            binding.bind_cpu_input("inputs_embeds", self.embedding.lookup(following))
        binding.bind_cpu_input("hidden_states", np.stack([entries.hidden[q] for q in positions])[None])
        binding.bind_cpu_input("attention_mask", np.ones((1, entries.length + n), np.int64))
        binding.bind_cpu_input("position_ids", np.broadcast_to(np.array(positions, np.int64), (3, 1, n)).copy())
        for name, value in entries.caches.items():
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[-1].numpy()
        for q in positions:
            del entries.hidden[q]
            entries.tokens.pop(q, None)  # the first position's token was never needed
        entries.entered = positions[-1] + 1
        entries.length += n
        return logits[0, -1]

    def generate(self, engine: Engine, state: State, prompt: list[int], max_new_tokens: int, sampler: Sampler,
                 stats: GenerationStats, constraint: LogitsConstraint | None = None) -> Iterator[int]:
        """Engine.generate's prefill and decode loop, drafting (same contract: the last token yielded
        is not in the state); ``sampler`` draws every token output. Under a ``constraint`` every token
        is chosen from the tokens it allows, in the order they are output, the draft too (from the
        same mask as the token it guesses)."""
        started = time.perf_counter()
        p_min = self.sampled_p_min if sampler.settings.temperature > 0 else self.greedy_p_min
        base = state.length
        entries = self._new_entries(base, len(prompt) + max_new_tokens + PENDING_CAP + 2, engine.head_size)
        entries.tokens.update({base + i: t for i, t in enumerate(prompt[1:], start=1)})

        def enter_chunk(first: int, rows: np.ndarray) -> None:
            # Entered as the prefill goes: a long prompt's hidden states are never all kept. The
            # last position waits for the first new token.
            entries.add_hidden(first, rows)
            if entries.entered in entries.hidden and entries.entered + 1 in entries.tokens:
                self._enter(entries)

        logits = engine.forward_with_hidden(state, prompt, enter_chunk)
        stats.prefill_s = time.perf_counter() - started
        # The prefill's last activations sit freed in the heap: hand them back before the rollback
        # copy of the state takes its place, or the two add up in the daemon's peak.
        trim_heap()
        spare = engine.spare_buffers(state)
        decode_started = time.perf_counter()
        stats.finish_reason = "length"
        pending = [choose(logits, sampler, constraint)]
        produced = 0
        new = pending[:]
        try:
            while True:
                for token in new:
                    produced += 1
                    stats.completion_tokens += 1
                    stats.token_times.append(time.perf_counter())
                    yield token
                    if token in engine.eos_ids:
                        stats.finish_reason = "stop"
                        return
                    if produced == max_new_tokens:
                        return
                length, m = state.length, len(pending)
                if length + m >= engine.context_length:
                    stats.finish_reason = "context"
                    return
                entries.tokens[length + m - 1] = pending[-1]
                draft = None
                paying = stats.draft_steps < PROBE_DRAFTS or stats.drafts_accepted >= MIN_ACCEPTANCE * stats.draft_steps
                if paying and max_new_tokens - produced >= 2 and m <= PENDING_CAP and length + m + 1 < engine.context_length:
                    draft, confidence = self._enter(entries, constraint)
                    if draft in engine.eos_ids or confidence < p_min:
                        # An accepted end token would sit in the state: the contract forbids it.
                        draft = None
                stats.decode_steps += 1
                if draft is None:
                    step_logits = engine.forward_with_hidden(state, pending, entries.add_hidden)
                    pending = new = [choose(step_logits, sampler, constraint)]
                    continue
                step_logits, step_hidden = engine.step(state, [*pending, draft], keep=2, spare=spare)
                stats.draft_steps += 1
                verified = choose(step_logits[0], sampler, constraint)
                if verified == draft:
                    stats.drafts_accepted += 1
                    for name, array in spare.items():
                        spare[name], state.past[name] = state.past[name], array
                    entries.tokens[length + m] = draft
                    entries.add_hidden(length, step_hidden)
                    pending = [choose(step_logits[1], sampler, constraint)]
                    new = [draft, pending[0]]
                else:
                    # The step's KV entries go; its recurrent state went to ``spare``. Drafting runs only
                    # where positions are token indices (Engine.generate), so the position follows.
                    state.length = state.position = length
                    entries.add_hidden(length, step_hidden[:m])
                    pending = [*pending, verified]
                    new = [verified]
        finally:
            if len(pending) > 1:
                # The contract: every token but the last yielded is in the state (a step never takes
                # the state past the context, so these fit).
                engine.forward(state, pending[:-1])
            stats.decode_s = time.perf_counter() - decode_started
