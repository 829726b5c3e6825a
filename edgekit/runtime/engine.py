"""Decode loop over a bundle's exported graph with a plain ``onnxruntime.InferenceSession``.

We run the graph ourselves rather than through onnxruntime-genai's Generator: continued turns,
snapshots and chunked prefill are exact here (the recurrent and KV state is just the ``present.*``
outputs fed back as ``past.*``), while genai's continuation after a generated token is not.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgekit.errors import ContextExceeded, EdgekitError
from edgekit.kernels import int4_layout
from edgekit.runtime.embedding import INPUT as EMBEDS_INPUT
from edgekit.runtime.embedding import EmbeddingTable, embeds_graph
from edgekit.runtime.resident import clean_mappings, drop_pages, session_options, trim_heap, tune_allocator
from edgekit.runtime.sampling import LogitsConstraint, Sampler, Sampling, choose
from edgekit.runtime.speculative import DRAFT_GRAPH, STOP_SPINNING, Drafter
from edgekit.runtime.vision import ImageSpan, prompt_positions

# Bounds prefill activations (chunked prefill is exact): smaller chunks lower the daemon's peak for a
# little prefill speed (figures: docs/benchmarks.md, "Prefill chunks"). The default; a device's
# config may set its own (``edgekit tune`` measures it).
PREFILL_CHUNK = 128
# Attention scores take chunk x KV capacity x heads x 4 bytes, so past this capacity chunks shrink to
# keep that product within PREFILL_CHUNK x LONG_CONTEXT, whatever chunk is configured: a larger one
# speeds short prompts but never raises a long prompt's peak.
LONG_CONTEXT = 2048
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
KEEP_INPUT = "logits_to_keep"  # written by edgekit.builder.draft_graph
HIDDEN_OUTPUT = "hidden_states"


@dataclass
class State:
    """One sequence's model state: the ``past.*`` tensors and how many positions they cover.

    Each step writes its ``present.*`` outputs over these same arrays (see ``Engine._run``).
    """

    past: dict[str, np.ndarray]
    length: int = 0
    kv: frozenset[str] = frozenset()  # names in ``past`` that are KV caches with spare capacity on axis 2
    # The M-RoPE position of the next token: the token count until an image, which takes as many
    # positions as its longer side has embeddings rather than one per embedding (runtime/vision.py).
    position: int = 0

    def copy(self) -> State:
        """An independent snapshot: every tensor copied (KV caches up to the length in use)."""
        return State({name: np.array(value[:, :, : self.length]) if name in self.kv else value.copy()
                      for name, value in self.past.items()}, self.length, self.kv, self.position)

    def nbytes(self) -> int:
        """Bytes this state holds, KV capacity included."""
        return sum(a.nbytes for a in self.past.values())


@dataclass
class GenerationStats:
    """Token counts and timings of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""
    token_times: list[float] = field(default_factory=list)
    decode_steps: int = 0  # main-graph steps after the prefill (counted when drafting)
    draft_steps: int = 0  # steps that verified a draft
    drafts_accepted: int = 0

    @property
    def acceptance(self) -> float | None:
        """Share of drafts accepted; None when nothing was drafted."""
        return self.drafts_accepted / self.draft_steps if self.draft_steps else None

    @property
    def tokens_per_step(self) -> float | None:
        """New tokens per main-graph decode step (1.0 without drafting); None before any step."""
        return (self.completion_tokens - 1) / self.decode_steps if self.decode_steps else None

    def drafting(self) -> dict[str, float | None]:
        """The timings fields of a reply that say how drafting went (docs/protocol.md)."""
        return {"tokens_per_step": round(self.tokens_per_step, 3) if self.tokens_per_step else None,
                "draft_acceptance": round(self.acceptance, 3) if self.acceptance is not None else None}

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        # The first new token comes out of prefill; decode steps make the rest.
        steps = max(self.completion_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0


def configured_threads(folder: Path) -> int | None:
    """The thread count ``folder``'s bundle was built for (None: left to ONNX Runtime)."""
    config = json.loads((folder / "genai_config.json").read_text())
    return config["model"]["decoder"].get("session_options", {}).get("intra_op_num_threads") or None


class Engine:
    """A loaded bundle graph that runs prefill and decode steps for any number of sequences."""

    def __init__(self, folder: Path, threads: int | None = None, provider: str | None = None,
                 speculative: bool = True, prefill_chunk: int | None = None) -> None:
        """Load ``folder``'s graph; ``threads`` and ``provider`` (cpu, cuda) override the bundle's settings.
        With ``speculative`` (the default) a bundle built with ``--include-mtp`` drafts its
        generations with its MTP head (:mod:`edgekit.runtime.speculative`). Prompts run in chunks
        of at most ``prefill_chunk`` tokens (default :data:`PREFILL_CHUNK`)."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise EdgekitError(f"prefill chunk must be at least 1 token (got {prefill_chunk})")
        self.prefill_chunk = prefill_chunk or PREFILL_CHUNK
        config_path = folder / "genai_config.json"
        try:
            config = json.loads(config_path.read_text())
            model = config["model"]
            decoder = model["decoder"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise EdgekitError(f"{config_path}: cannot read the bundle's genai_config ({exc})") from exc
        self.context_length: int = int(model.get("context_length") or config["search"]["max_length"])
        self.vocab_size: int = int(model["vocab_size"])  # the logits' width (padded past the tokenizer's ids)
        eos = model.get("eos_token_id", [])
        self.eos_ids: frozenset[int] = frozenset(eos if isinstance(eos, list) else [eos])
        decoder_options = decoder.get("session_options", {})
        options = session_options(threads or int(decoder_options.get("intra_op_num_threads", 0)))
        self.threads = options.intra_op_num_threads  # 0: ONNX Runtime's choice (the physical cores)
        drafting = speculative and (folder / DRAFT_GRAPH).is_file()
        if drafting:
            options.add_session_config_entry(STOP_SPINNING, "1")
        self.provider = provider or configured_provider(config)
        providers = [ORT_PROVIDERS.get(self.provider, self.provider)]
        if "CPUExecutionProvider" not in providers:
            providers.append("CPUExecutionProvider")
        self.providers = tuple(providers)  # ONNX Runtime's names, the bundle's first (the vision encoder's too)
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise EdgekitError(
                f"{folder}: this bundle needs {', '.join(missing)}, which this onnxruntime build lacks "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        tune_allocator()
        # The build writes an embeds variant beside the graph where it can: same weights, but the
        # token embeddings come from reads of the weights file instead of a mapping (embedding.py).
        graph = folder / decoder["filename"]
        if embeds_graph(graph).is_file():
            graph = embeds_graph(graph)
        # x86 bundles carry the graph again with edgekit's Int4Layout op (kernels/int4_layout.py), taken
        # where the op can run here. ``int4_kernel`` says which kernel runs it, ``int4_fallback`` why not.
        self.int4_kernel: str | None = None
        self.int4_fallback: str | None = None
        if int4_layout.layout_graph(graph).is_file():
            self.int4_fallback = int4_layout.unavailable()
            if self.int4_fallback is None:
                self.int4_kernel = int4_layout.register(options)
                graph = int4_layout.layout_graph(graph)
        # Kept for a second session of the same graph and settings (bench/op_profile.py profiles one).
        self.graph, self.session_options = graph, options
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise EdgekitError(f"{graph}: cannot load the graph ({exc})") from exc
        inputs = {i.name for i in self.session.get_inputs()}
        self._embedding = (EmbeddingTable.from_metadata(folder, self.session.get_modelmeta().custom_metadata_map)
                           if EMBEDS_INPUT in inputs and "input_ids" not in inputs else None)
        self.head_size = int(decoder["head_size"])
        self._past_specs = {
            i.name: (self._zero_shape(i.shape), _ORT_TYPES[i.type])
            for i in self.session.get_inputs()
            if i.name.startswith("past")
        }
        outputs = [o.name for o in self.session.get_outputs()]
        if "logits" not in outputs:
            raise EdgekitError(f"{graph}: the graph has no 'logits' output")
        # Bundles built for drafting (builder/draft_graph.py) compute logits for the last
        # ``logits_to_keep`` positions and put out the final hidden states the draft reads.
        self._keeps_logits = KEEP_INPUT in inputs
        self.has_hidden_states = HIDDEN_OUTPUT in outputs
        # past_key_values.3.key -> present.3.key, past.0.conv -> present.0.conv. Other outputs (an MTP
        # head's hidden states) are not bound, so not computed.
        self._past_to_present = {_past_name(name): name for name in outputs if name.startswith("present")}
        # KV caches grow along the past sequence axis. With past_present_share_buffer (the builder
        # sets it for CPU), GroupQueryAttention appends new keys in place when past and present are
        # the same buffer: no per-token copy of the whole cache (decode +24% at 3,000 tokens of
        # context, bit-exact) and no second cache-sized buffer during a step.
        share = self.provider == "cpu" and bool(config.get("search", {}).get("past_present_share_buffer"))
        caches = frozenset(
            i.name for i in self.session.get_inputs()
            if i.name.startswith("past") and len(i.shape) == 4 and i.shape[2] == "past_sequence_length"
        )
        self._kv = caches if share else frozenset()
        # Without a shared buffer each step returns a longer cache, in a new array.
        self._growing = caches - self._kv
        # A bundle built for drafting carries draft.onnx; drafting needs in-place KV caches (a step's
        # entries are discarded by moving the length back).
        self.drafter: Drafter | None = None
        if drafting and self._keeps_logits and self.has_hidden_states and not self._growing:
            draft = folder / DRAFT_GRAPH
            layout = int4_layout.layout_graph(draft)
            int4 = self.int4_kernel is not None and layout.is_file()
            self.drafter = Drafter(layout if int4 else draft, self.threads, self._embedding, int4)
        # After every session of this bundle has prepacked its weights (the draft's too). The Int4Layout
        # op's weights are its working set, read in place from the mapping: those pages stay.
        self._file_pages = {data: clean_mappings(data) for data in sorted(folder.glob("*.data")) if data.name != int4_layout.DATA}
        self.release_memory()
        if self._embedding is not None:
            # Prepacking read every page once (dropped just now); per token, only the lookup's rows
            # came back through the mapping, and those are read with pread now. Later drops would
            # just make the small weights fault in again.
            self._file_pages = {}

    def release_memory(self, heap: bool = True) -> None:
        """Give back what the device need not keep resident: clean pages of the weights file, and
        (``heap``) freed heap. Prepacking reads every weight page once. Afterwards, a graph that looks
        embeddings up itself reads the table's rows through the mapping, and the kernel maps whole
        large folios around each row, far more than the rows; dropping those is cheap. The embeds
        graph reads no rows through it (embedding.py). Trimming the heap delayed the next request's
        first token, so the daemon waits for an idle spell (figures: docs/benchmarks.md).
        """
        for data, mappings in self._file_pages.items():
            drop_pages(data, mappings)
        if heap:
            trim_heap()

    def _zero_shape(self, shape: list) -> tuple[int, ...]:
        sizes = {"batch_size": 1, "past_sequence_length": 0, "kv_cache_dim": self.head_size}
        try:
            return tuple(d if isinstance(d, int) else sizes[d] for d in shape)
        except KeyError as exc:
            raise EdgekitError(f"unexpected symbolic dimension {exc} in the graph's state inputs") from exc

    def new_state(self) -> State:
        """An empty sequence: zero recurrent and conv state, no KV entries."""
        return State({name: np.zeros(shape, dtype) for name, (shape, dtype) in self._past_specs.items()}, kv=self._kv)

    def forward(self, state: State, ids: list[int], images: Sequence[ImageSpan] = ()) -> np.ndarray:
        """Run ``ids`` after ``state`` (updated in place); return the logits for the last position.
        ``images`` put their embeddings in place of the ids they cover (their ``<|image_pad|>``s)."""
        return self._forward(state, ids, images=images)

    @property
    def takes_embeddings(self) -> bool:
        """Whether the graph reads embeddings (the embeds graph), so image embeddings can go in."""
        return self._embedding is not None

    def forward_with_hidden(self, state: State, ids: list[int], on_hidden: Callable[[int, np.ndarray], None]) -> np.ndarray:
        """As :meth:`forward`, also handing each chunk's final hidden states [chunk, hidden] to
        ``on_hidden`` with the position of the chunk's first token, as the chunk is done (a graph
        built for drafting only): a long prompt's hidden states are never all held at once."""
        return self._forward(state, ids, on_hidden)

    def step(self, state: State, ids: list[int], keep: int, spare: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One step of ``ids`` for speculative decoding: the logits of the last ``keep`` positions
        [keep, vocab] and the hidden states of all [len(ids), hidden]. The recurrent and conv state
        are written into ``spare`` (same names and shapes as ``state``'s), leaving ``state``'s own
        arrays as they were before the step: the caller keeps whichever is right. KV caches are
        appended in place; ``state.length`` moves on, and setting it back discards the entries."""
        self._make_room(state, len(ids))
        logits, hidden = self._run(state, ids, keep=keep, spare=spare, hidden=True)
        assert hidden is not None
        return logits, hidden

    def spare_buffers(self, state: State) -> dict[str, np.ndarray]:
        """Arrays to receive a :meth:`step`'s recurrent and conv state: every non-KV tensor of ``state``."""
        return {name: np.empty_like(array) for name, array in state.past.items() if name not in state.kv}

    def _forward(self, state: State, ids: list[int],
                 on_hidden: Callable[[int, np.ndarray], None] | None = None,
                 images: Sequence[ImageSpan] = ()) -> np.ndarray:
        if images and self._embedding is None:
            raise EdgekitError("this bundle's graph looks its embeddings up itself (no embeds graph), so it cannot take images")
        # Room for the whole prompt at once: growing chunk by chunk would leave each outgrown cache
        # behind in the heap.
        self._make_room(state, len(ids))
        positions, following = prompt_positions(state.position, len(ids), images)
        capacity = max([state.past[name].shape[2] for name in state.kv], default=state.length + len(ids))
        step = self.prefill_chunk
        while step > 16 and step * capacity > PREFILL_CHUNK * LONG_CONTEXT:
            step //= 2
        logits = None
        start = 0
        while start < len(ids):
            if start:
                # Each chunk's activations come and go in sub-MiB pieces that glibc keeps; over a long
                # prompt they pile up, and a trim per chunk is cheap beside the chunk itself.
                trim_heap()
            size = step
            if capacity > LONG_CONTEXT and 2 * state.length >= capacity:
                # The KV cache becomes resident as it fills, so a long prompt peaks near its end: the
                # second half runs in half-size chunks, trading some prefill speed for a lower peak.
                size = max(16, step // 2)
            first = state.length
            chunk = ids[start : start + size]
            embeds = self._spliced(chunk, start, images) if images else None
            logits, chunk_hidden = self._run(state, chunk, hidden=on_hidden is not None,
                                             positions=positions[:, start : start + len(chunk)], embeds=embeds)
            if on_hidden is not None and chunk_hidden is not None:
                on_hidden(first, chunk_hidden)
            start += size
        assert logits is not None, "forward needs at least one token"
        state.position = following
        return logits[-1]

    def _spliced(self, chunk: list[int], start: int, images: Sequence[ImageSpan]) -> np.ndarray:
        """The chunk's token embeddings with the images' embeddings in place of their pads."""
        assert self._embedding is not None
        embeds = self._embedding.lookup(chunk)
        end = start + len(chunk)
        for span in images:
            low, high = max(span.offset, start), min(span.offset + len(span.embeds), end)
            if low < high:
                embeds[0, low - start : high - start] = span.embeds[low - span.offset : high - span.offset]
        return embeds

    def _run(self, state: State, ids: list[int], keep: int = 1, spare: dict[str, np.ndarray] | None = None,
             hidden: bool = False, positions: np.ndarray | None = None,
             embeds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Run one chunk: the logits of its last ``keep`` positions (all of them in a graph that
        computes every position's) and, with ``hidden``, its final hidden states. ``positions``
        [3, n] are the chunk's M-RoPE rows (by default text's: the same position on all three, from
        ``state.position``); ``embeds`` [1, n, hidden] replace the lookup of ``ids``."""
        n = len(ids)
        if positions is None:
            positions = np.broadcast_to(np.arange(state.position, state.position + n, dtype=np.int64), (3, n))
            state.position += n
        binding = self.session.io_binding()
        if self._embedding is not None:
            binding.bind_cpu_input(EMBEDS_INPUT, embeds if embeds is not None else self._embedding.lookup(ids))
        else:
            binding.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, state.length + n), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions[:, None, :]))
        if self._keeps_logits:
            binding.bind_cpu_input(KEEP_INPUT, np.array([keep], dtype=np.int64))
        # Each state tensor is the step's input and output in one buffer: KV caches are appended in
        # place (see __init__), the recurrent and conv state overwritten in place (bit-exact against
        # fresh outputs, tested): a second set would add the whole state's size to every request,
        # and fresh arrays every step slow decode.
        names = list(state.past)
        for name, array in state.past.items():
            if name in self._growing:
                binding.bind_cpu_input(name, array)
                binding.bind_output(self._past_to_present[name])
            else:
                value = ort.OrtValue.ortvalue_from_numpy(array)
                binding.bind_ortvalue_input(name, value)
                target = value if spare is None or name in state.kv else ort.OrtValue.ortvalue_from_numpy(spare[name])
                binding.bind_ortvalue_output(self._past_to_present[name], target)
        binding.bind_output("logits")
        if hidden:
            binding.bind_output(HIDDEN_OUTPUT)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in binding order: the state's, the logits, the hidden states
        for name, value in zip(names, outputs):
            if name in self._growing:
                state.past[name] = value.numpy()
        state.length += n
        logits = outputs[len(names)].numpy()[0, -keep:]
        return logits, outputs[len(names) + 1].numpy()[0] if hidden else None

    def _make_room(self, state: State, count: int) -> None:
        """Refuse ``count`` more tokens past the context; else make the KV caches hold them."""
        if state.length + count > self.context_length:
            raise ContextExceeded(
                f"sequence of {state.length + count} tokens exceeds the bundle's context of {self.context_length}"
            )
        self._reserve(state, state.length + count)

    def _reserve(self, state: State, needed: int) -> None:
        """Make every KV cache of ``state`` hold ``needed`` positions: each one too small is replaced
        by a copy grown by half again, in steps of 256, never past the context."""
        for name in state.kv:
            cache = state.past[name]
            if cache.shape[2] >= needed:
                continue
            capacity = min(self.context_length, max(needed, cache.shape[2] * 3 // 2) + 255 & ~255)
            grown = np.zeros((*cache.shape[:2], capacity, *cache.shape[3:]), cache.dtype)
            grown[:, :, : state.length] = cache[:, :, : state.length]
            state.past[name] = grown

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        sampling: Sampling | None = None,
        state: State | None = None,
        stats: GenerationStats | None = None,
        speculative: bool = True,
        constraint: LogitsConstraint | None = None,
        images: Sequence[ImageSpan] = (),
    ) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` tokens after ``prompt``; stop at an end-of-sequence token.

        ``state`` continues an earlier sequence. The last token yielded is not yet in the state: it
        is fed on the next step, or by the caller's next ``forward``. Generations draft with the
        bundle's MTP head where it has one, unless ``speculative`` is False: the same tokens, greedy
        or sampled with the same seed. A ``constraint`` masks every token chosen, drafted ones included.
        """
        state = state if state is not None else self.new_state()
        stats = stats if stats is not None else GenerationStats()
        if not prompt:
            raise EdgekitError("empty prompt: nothing to generate from")
        if state.length + len(prompt) >= self.context_length:
            raise ContextExceeded(
                f"prompt of {len(prompt)} tokens (after {state.length} already in this sequence) does not fit "
                f"the bundle's context of {self.context_length} tokens"
            )
        sampling = sampling or Sampling()
        sampler = Sampler(sampling)
        # The draft graph places tokens by their index: after an image, positions are no longer that.
        drafter = self.drafter if speculative and not images and state.position == state.length else None
        stats.prompt_tokens = len(prompt)
        started = time.perf_counter()
        if drafter is not None:
            yield from drafter.generate(self, state, prompt, max_new_tokens, sampler, stats, constraint)
            return
        logits = self.forward(state, prompt, images)
        stats.prefill_s = time.perf_counter() - started
        stats.finish_reason = "length"
        decode_started = time.perf_counter()
        # The caller stops pulling at an end token: the finally still times the decode.
        try:
            for produced in range(max_new_tokens):
                token = choose(logits, sampler, constraint)
                stats.completion_tokens += 1
                stats.token_times.append(time.perf_counter())
                if token in self.eos_ids:
                    stats.finish_reason = "stop"
                    yield token
                    break
                yield token
                if produced + 1 == max_new_tokens:
                    break
                if state.length + 1 >= self.context_length:
                    stats.finish_reason = "context"
                    break
                stats.decode_steps += 1
                logits = self.forward(state, [token])
        finally:
            stats.decode_s = time.perf_counter() - decode_started


def configured_provider(genai_config: dict) -> str:
    """The execution provider a bundle's genai_config asks for (``cpu`` when it names none)."""
    options = genai_config["model"]["decoder"].get("session_options", {}).get("provider_options") or [{"cpu": {}}]
    return next(iter(options[0]), "cpu")


def provider_available(name: str) -> bool:
    """Whether this onnxruntime build has the execution provider ``name`` (cpu, cuda)."""
    return ORT_PROVIDERS.get(name, name) in ort.get_available_providers()


def _past_name(present: str) -> str:
    if present.endswith((".key", ".value")):
        return present.replace("present.", "past_key_values.", 1)
    return present.replace("present.", "past.", 1)
