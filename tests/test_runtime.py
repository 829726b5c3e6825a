"""The decode loop: exact continuation and chunking, sampling, streaming text, context limits, bundle integrity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgekit import bundle
from edgekit.errors import EdgekitError
from edgekit.runtime import engine as engine_module
from edgekit.runtime.engine import Engine
from edgekit.runtime.sampling import Sampler, Sampling
from edgekit.runtime.tokenizer import ChatTokenizer


def test_continued_sequence_matches_fresh_replay(engine: Engine, tokenizer: ChatTokenizer) -> None:
    first = tokenizer.encode(tokenizer.render([{"role": "user", "content": "Tell me about owls."}]))
    state = engine.new_state()
    reply = list(engine.generate(first, 6, state=state))
    follow = tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd bats?<|im_end|>\n<|im_start|>assistant\n")
    # The last generated token is not yet in the state: it leads the next turn's input.
    continued = engine.forward(state, [reply[-1], *follow])
    fresh = engine.forward(engine.new_state(), first + reply + follow)
    assert state.length == len(first) + len(reply) + len(follow)
    np.testing.assert_array_equal(continued, fresh)


def test_chunked_prefill_is_exact(engine: Engine, tokenizer: ChatTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = tokenizer.encode("A long prompt " * 40)
    whole = engine.forward(engine.new_state(), ids)
    monkeypatch.setattr(engine, "prefill_chunk", 7)
    np.testing.assert_array_equal(engine.forward(engine.new_state(), ids), whole)


def test_long_prompt_chunks_shrink_for_its_second_half_and_stay_exact(engine: Engine, tokenizer: ChatTokenizer,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Past LONG_CONTEXT positions, chunks shrink with the capacity, and halve again once the KV cache
    is half full, where a long prompt's peak memory is: same logits as one pass of big chunks."""
    ids = tokenizer.encode("A long prompt " * 80)[:240]
    whole = engine.forward(engine.new_state(), ids)
    monkeypatch.setattr(engine_module, "LONG_CONTEXT", 64)  # the capacity for 240 tokens is 256
    sizes: list[int] = []
    run = engine._run
    monkeypatch.setattr(engine, "_run", lambda state, chunk, **kw: sizes.append(len(chunk)) or run(state, chunk, **kw))
    np.testing.assert_array_equal(engine.forward(engine.new_state(), ids), whole)
    # 128 x 256 > 128 x 64: 32-token chunks, then 16 from position 128 (half of 256) on.
    assert sizes == [32] * 4 + [16] * 7
    # A larger configured chunk (edgekit tune) speeds short prompts, but the bound is the default's.
    sizes.clear()
    monkeypatch.setattr(engine, "prefill_chunk", 512)
    np.testing.assert_array_equal(engine.forward(engine.new_state(), ids), whole)
    assert sizes == [32] * 4 + [16] * 7


def test_snapshot_restores_state(engine: Engine) -> None:
    state = engine.new_state()
    engine.forward(state, [248045, 846, 198, 9419])
    snapshot = state.copy()
    # Steps overwrite the state's arrays in place: a snapshot must share none of them. Both take the
    # same steps: one token at a time and three at once need not round alike (MatMulNBits on AVX2
    # runs a different kernel for a single row).
    a = [engine.forward(state, [token]) for token in (11, 12, 13)][-1]
    b = [engine.forward(snapshot, [token]) for token in (11, 12, 13)][-1]
    np.testing.assert_array_equal(a, b)


def test_sampling() -> None:
    logits = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    assert Sampler(Sampling())(logits) == int(np.argmax(logits))
    assert Sampler(Sampling(temperature=1.0, top_k=1))(logits) == int(np.argmax(logits))
    draws = [Sampler(Sampling(temperature=0.8, top_p=0.9, seed=42))(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # a seed repeats
    many = Sampler(Sampling(temperature=1.0, top_k=5, seed=1))
    top5 = set(np.argsort(logits)[-5:].tolist())
    assert {many(logits) for _ in range(200)} <= top5


def _full_sort_distribution(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """Temperature, top-k and top-p by their definition, sorting every logit: probability per token."""
    scaled = logits.astype(np.float64) / s.temperature
    order = np.argsort(-scaled, kind="stable")
    if 0 < s.top_k < scaled.size:
        order = order[: s.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if s.top_p < 1.0:
        cutoff = int(np.searchsorted(np.cumsum(probs), s.top_p)) + 1
        order, probs = order[:cutoff], probs[:cutoff] / probs[:cutoff].sum()
    full = np.zeros(scaled.size)
    full[order] = probs
    return full


def test_sampling_distribution_is_the_full_sorts_without_sorting_everything() -> None:
    """The sampler looks at likely tokens first (a full sort of 248k logits costs 15-40 ms a token);
    the distribution it draws from must be the one sorting everything gives, flat or peaked logits,
    many of them equal (a trained model's unused rows) or not."""
    rng = np.random.default_rng(7)
    # One likely token among 248,320 unlikely ones that together outweigh it: top-k and top-p must
    # look past the likely tokens.
    long_tail = np.zeros(248320, np.float32)
    long_tail[:3] = 10.0, 9.0, 8.0
    cases = [(long_tail, Sampling(temperature=1.0, top_p=0.95)), (long_tail, Sampling(temperature=1.0, top_k=20)),
             (long_tail, Sampling(temperature=1.0, top_k=20, top_p=0.9))]
    for trial in range(200):
        logits = (rng.standard_normal(4000) * rng.choice([0.5, 3.0, 10.0, 30.0])).astype(np.float32)
        if trial % 3 == 0:
            logits[rng.integers(0, logits.size, logits.size // 2)] = logits.min()
        cases.append((logits, Sampling(temperature=float(rng.choice([0.3, 0.7, 1.0, 1.5])),
                                       top_k=int(rng.choice([0, 1, 5, 20, 5000])), top_p=float(rng.choice([1.0, 0.95, 0.8, 0.5])))))
    for logits, settings in cases:
        order, probs = Sampler(settings).distribution(logits)
        drawn = np.zeros(logits.size)
        drawn[order] = probs
        expected = _full_sort_distribution(logits, settings)
        np.testing.assert_allclose(np.sort(drawn), np.sort(expected), atol=1e-12, err_msg=str(settings))
        # Which of several equal logits make a cut is arbitrary; every token with a logit of its own
        # has the same probability.
        values, counts = np.unique(logits, return_counts=True)
        single = np.isin(logits, values[counts == 1])
        np.testing.assert_allclose(drawn[single], expected[single], atol=1e-12, err_msg=str(settings))


def test_greedy_generation_stops_at_max_tokens(engine: Engine) -> None:
    tokens = list(engine.generate([248045, 846, 198], 5))
    assert len(tokens) == 5


def test_prompt_longer_than_context_is_refused(engine: Engine) -> None:
    with pytest.raises(EdgekitError, match=f"does not fit the bundle's context of {engine.context_length} tokens"):
        list(engine.generate([11] * engine.context_length, 4))


def test_stream_never_splits_utf8(tokenizer: ChatTokenizer) -> None:
    text = "Grüße 😀👍🏽 日本語 ok"
    ids = tokenizer.encode(text)
    stream = tokenizer.stream()
    pieces = [stream.step(tokenizer.tokenizer, i) for i in ids]
    emitted = [p for p in pieces if p]
    assert "".join(emitted) == text
    assert all("\ufffd" not in p for p in emitted)
    assert None in pieces  # some emoji span several tokens and were held back until complete


def test_chat_template_thinking_switch(tokenizer: ChatTokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.render(messages).endswith("<|im_start|>assistant\n<think>\n")
    assert tokenizer.render(messages, thinking=False).endswith("<think>\n\n</think>\n\n")


def test_verify_catches_tampering(bundle_copy: Path) -> None:
    bundle.verify(bundle_copy)
    config = bundle_copy / "genai_config.json"
    config.write_text(config.read_text().replace('"intra_op_num_threads": ', '"intra_op_num_threads": 1'))
    with pytest.raises(EdgekitError, match="genai_config.json: (size|sha256)"):
        bundle.verify(bundle_copy)


def test_verify_catches_missing_and_extra_files(bundle_copy: Path) -> None:
    (bundle_copy / "chat_template.jinja").unlink()
    with pytest.raises(EdgekitError, match="incomplete bundle, missing chat_template.jinja"):
        bundle.verify(bundle_copy)


def test_generate_cli(host_bundle: Path) -> None:
    import json

    from click.testing import CliRunner

    from edgekit.cli import main

    result = CliRunner().invoke(main, ["generate", str(host_bundle), "Hello", "--max-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.stdout)
    assert reply["usage"]["completion_tokens"] == 5 and reply["finish_reason"] == "length"
    assert reply["text"]


def test_stop_sequence_cuts_the_text(engine: Engine, tokenizer: ChatTokenizer) -> None:
    from edgekit.runtime.conversation import Turn, run_turn

    full: list[str] = []
    run_turn(engine, tokenizer, Turn(prompt="Once upon a time", max_tokens=12), full.append)
    text = "".join(full)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut: list[str] = []
    result = run_turn(engine, tokenizer, Turn(prompt="Once upon a time", max_tokens=12, stop=[stop]), cut.append)
    assert result.finish_reason == "stop" and "".join(cut) == text[: text.find(stop)]


def test_session_store_evicts_least_recently_used_and_idle(engine: Engine) -> None:
    import time

    from edgekit.runtime.sessions import Session, SessionStore

    one = Session(engine.new_state())
    store = SessionStore(max_bytes=int(one.nbytes() * 2.5), idle_s=0.2)
    for name in ("a", "b", "c"):
        store.put(name, Session(engine.new_state()))
    assert store.take("a") is None and "memory limit" in store.evicted_reason("a")
    assert store.take("b") is not None  # taken for a turn...
    time.sleep(0.3)
    assert store.take("c") is None and "idle" in store.evicted_reason("c")


def test_state_written_in_place_matches_fresh_outputs(engine: Engine) -> None:
    """The engine overwrites each state tensor with the step's output (KV caches appended in place);
    a plain ``session.run``, whose outputs are new arrays, computes the same logits and state."""
    prompt = [int(i) for i in np.random.default_rng(5).integers(0, 248000, 150)]
    chunks = [prompt[:128], prompt[128:], [11], [12]]
    state = engine.new_state()
    ours = [engine.forward(state, chunk) for chunk in chunks]

    names = [o.name for o in engine.session.get_outputs()]
    past = {name: array.copy() for name, array in engine.new_state().past.items()}
    length = 0
    for chunk, expected in zip(chunks, ours):
        n = len(chunk)
        feeds = {"inputs_embeds": engine._embedding.lookup(chunk),  # the bundle's embeds graph
                 "attention_mask": np.ones((1, length + n), np.int64),
                 "position_ids": np.broadcast_to(np.arange(length, length + n), (3, 1, n)).copy(), **past}
        outputs = dict(zip(names, engine.session.run(None, feeds)))
        np.testing.assert_array_equal(outputs["logits"][0, -1], expected)
        past = {name: outputs[engine._past_to_present[name]] for name in past}
        length += n
    for name, array in past.items():
        kept = state.past[name][:, :, :length] if name in state.kv else state.past[name]
        np.testing.assert_array_equal(kept, array, err_msg=name)


def test_verify_exit_status_tells_a_damaged_copy_from_a_refused_one(bundle_copy: Path, tmp_path: Path) -> None:
    """Deploy resends a copy only on status 3; a signature refusal (1) would be refused again."""
    from click.testing import CliRunner

    from edgekit import signing
    from edgekit.cli import main

    signing.create_keys(tmp_path / "release.key", tmp_path / "release.pub")
    runner = CliRunner()
    assert runner.invoke(main, ["verify", str(bundle_copy)]).exit_code == 0
    unsigned = runner.invoke(main, ["verify", str(bundle_copy), "--trusted-key", str(tmp_path / "release.pub")])
    assert unsigned.exit_code == 1 and "not signed" in unsigned.output
    (bundle_copy / "tokenizer_config.json").write_text("{}")
    damaged = runner.invoke(main, ["verify", str(bundle_copy)])
    assert damaged.exit_code == 3 and "tokenizer_config.json" in damaged.output
