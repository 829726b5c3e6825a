"""Speculative decoding with the MTP head, on the trained fixture (a head whose drafts mean something):
greedy output, and sampled output with the same seed, equal plain decoding's, token for token, and
the state after it is the same."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgekit.builder.draft_graph import DRAFT_ROWS
from edgekit.builder.pipeline import BuildRequest, build
from edgekit.cli import main
from edgekit.client import DeviceClient
from edgekit.profiles import Quality, load_profile
from edgekit.runtime.engine import KEEP_INPUT, Engine, GenerationStats
from edgekit.runtime.sampling import Sampling
from edgekit.runtime.speculative import DRAFT_GRAPH, DRAFT_P_MIN
from edgekit.runtime.tokenizer import ChatTokenizer
from edgekit.serve.config import DaemonConfig
from tests.conftest import broker_at, start_daemon, write_profile
from tests.test_protocol_schema import schema
from tests.test_trained import trained_checkpoint  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slow
PROMPTS = ["The history of the city begins", "In mathematics, a prime number is", "Once upon a time", "The river"]
OPEN = Quality(min_top1_agreement=0.0, max_mean_kl=10.0)


def _build(checkpoint: Path, folder: Path, precision: str, context: int | None = None) -> Path:
    profile = load_profile(str(write_profile(folder, f"pi5-{precision}", base="raspberry-pi-5", precision=precision)))
    return build(BuildRequest(profile=profile, model=str(checkpoint), output=folder, include_mtp=True,
                              context_length=context, quality=OPEN)).path


@pytest.fixture(scope="module")
def fp32_bundle(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return _build(trained_checkpoint, tmp_path_factory.mktemp("spec"), "fp32", context=256)


@pytest.fixture(scope="module")
def int4_bundle(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return _build(trained_checkpoint, tmp_path_factory.mktemp("spec4"), "int4")


def _both(engine: Engine, ids: list[int], new: int) -> tuple[list[int], list[int], GenerationStats, GenerationStats]:
    plain_stats, draft_stats = GenerationStats(), GenerationStats()
    plain = list(engine.generate(ids, new, stats=plain_stats, speculative=False))
    drafted = list(engine.generate(ids, new, stats=draft_stats))
    return plain, drafted, plain_stats, draft_stats


def _drafts_as_plain(engine: Engine, tokenizer: ChatTokenizer, text: str, new: int, sampling: Sampling) -> GenerationStats:
    """Generate ``new`` tokens after ``text`` drafting and not: the same tokens, and the same state
    after them (everything but the last token in it, bit for bit). The drafted generation's stats."""
    ids = tokenizer.encode(text)
    plain_state, draft_state = engine.new_state(), engine.new_state()
    plain = list(engine.generate(ids, new, sampling, state=plain_state, speculative=False))
    stats = GenerationStats()
    drafted = list(engine.generate(ids, new, sampling, state=draft_state, stats=stats))
    assert drafted == plain, (text, new, sampling)
    assert draft_state.length == plain_state.length == len(ids) + len(plain) - 1
    follow = plain[-1:] + tokenizer.encode(" and then")
    assert np.array_equal(engine.forward(draft_state, follow), engine.forward(plain_state, follow))
    return stats


def test_the_build_writes_a_draft_graph_sharing_the_tied_table(int4_bundle: Path) -> None:
    main = onnx.load(str(int4_bundle / "model.onnx"), load_external_data=False)
    assert KEEP_INPUT in {i.name for i in main.graph.input}
    draft = onnx.load(str(int4_bundle / DRAFT_GRAPH), load_external_data=False)
    assert "inputs_embeds" in {i.name for i in draft.graph.input} and "input_ids" not in {i.name for i in draft.graph.input}
    # The cut head reads the leading bytes of the main weights file: nothing copied.
    stored = [{e.key: e.value for e in t.external_data} for t in draft.graph.initializer if t.name.endswith(f".rows{DRAFT_ROWS}")]
    assert len(stored) == 2 and all(s["location"] == "model.onnx.data" for s in stored)
    [head] = [n for n in draft.graph.node if "logits" in n.output]
    assert {t.name for t in draft.graph.initializer if t.name.endswith(f".rows{DRAFT_ROWS}")} <= set(head.input)
    assert draft.graph.output[0].type.tensor_type.shape.dim[2].dim_value == DRAFT_ROWS
    assert Engine(int4_bundle, threads=2).drafter is not None


def test_drafting_on_fp32_gives_plain_greedy_output_and_state(fp32_bundle: Path) -> None:
    engine = Engine(fp32_bundle, threads=2)
    assert engine.drafter is not None
    tokenizer = ChatTokenizer(fp32_bundle)
    accepted = steps = 0
    for text in PROMPTS:
        for new in (1, 2, 3, 40):  # budgets that end after an accepted pair, a rejection, a plain step
            stats = _drafts_as_plain(engine, tokenizer, text, new, Sampling())
            accepted, steps = accepted + stats.drafts_accepted, steps + stats.draft_steps
    # Both branches ran: drafts were accepted and rejected.
    assert 0 < accepted < steps, (accepted, steps)
    print(f"fp32: acceptance {accepted / steps:.3f} over {steps} drafts")


def test_drafting_stops_at_the_context_as_plain_decoding_does(fp32_bundle: Path) -> None:
    engine = Engine(fp32_bundle, threads=2)
    ids = ChatTokenizer(fp32_bundle).encode("The river " * 150)[:200]
    assert len(ids) == 200
    plain, drafted, plain_stats, draft_stats = _both(engine, ids, 100)
    assert drafted == plain and draft_stats.finish_reason == plain_stats.finish_reason == "context"


def test_sampled_drafting_on_fp32_draws_plain_sampled_output_and_state(fp32_bundle: Path) -> None:
    """Every token is drawn from the main graph's logits at its own position, one draw each, in plain
    decoding's order: with the same seed the output is plain sampling's, token for token, whatever
    the drafts; an accepted draft is one the sampler drew."""
    engine = Engine(fp32_bundle, threads=2)
    tokenizer = ChatTokenizer(fp32_bundle)
    accepted = steps = 0
    settings = [Sampling(temperature=0.7, top_k=20, top_p=0.8, seed=1), Sampling(temperature=1.0, seed=2),
                Sampling(temperature=0.6, top_p=0.95, seed=3)]
    for sampling in settings:
        for text in PROMPTS:
            stats = _drafts_as_plain(engine, tokenizer, text, 40, sampling)
            accepted, steps = accepted + stats.drafts_accepted, steps + stats.draft_steps
    assert 0 < accepted < steps, (accepted, steps)
    # Sampling draws other tokens than the greedy ones: a seed changes the output.
    ids = tokenizer.encode(PROMPTS[0])
    outputs = {tuple(engine.generate(ids, 24, Sampling(temperature=1.0, seed=seed))) for seed in range(4)}
    assert len(outputs) > 1
    print(f"fp32 sampled: acceptance {accepted / steps:.3f} over {steps} drafts")


def test_sampled_requests_skip_drafts_the_head_is_unsure_of(fp32_bundle: Path) -> None:
    """Below the head's DRAFT_P_MIN a sampled request's step runs without the draft: fewer drafts,
    more of them accepted, the same output; with no draft confident enough, none is verified. Greedy
    requests verify every draft."""
    engine = Engine(fp32_bundle, threads=2)
    assert engine.drafter is not None and engine.drafter.sampled_p_min == DRAFT_P_MIN
    tokenizer = ChatTokenizer(fp32_bundle)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    sampling = Sampling(temperature=0.7, top_k=20, top_p=0.8, seed=11)
    plain = [list(engine.generate(ids, 40, sampling, speculative=False)) for ids in prompts]
    counts = {}
    for p_min in (0.0, DRAFT_P_MIN, 1.01):
        engine.drafter.sampled_p_min = p_min
        accepted = steps = 0
        for ids, expected in zip(prompts, plain):
            stats = GenerationStats()
            assert list(engine.generate(ids, 40, sampling, stats=stats)) == expected, p_min
            accepted, steps = accepted + stats.drafts_accepted, steps + stats.draft_steps
        counts[p_min] = (accepted, steps)
    (all_accepted, all_steps), (gated_accepted, gated_steps) = counts[0.0], counts[DRAFT_P_MIN]
    assert 0 < gated_steps < all_steps and gated_accepted / gated_steps > all_accepted / all_steps, counts
    assert counts[1.01] == (0, 0)
    greedy = GenerationStats()
    list(engine.generate(prompts[0], 40, stats=greedy))
    assert greedy.draft_steps > 0  # greedy requests ignore the sampled gate
    print(f"fp32 sampled: acceptance {all_accepted / all_steps:.3f} over {all_steps} drafts, "
          f"{gated_accepted / gated_steps:.3f} over {gated_steps} at confidence >= {DRAFT_P_MIN}")


def test_the_opt_out_does_not_draft(fp32_bundle: Path) -> None:
    engine = Engine(fp32_bundle, threads=2)
    stats = GenerationStats()
    list(engine.generate(ChatTokenizer(fp32_bundle).encode(PROMPTS[0]), 8, stats=stats, speculative=False))
    assert stats.draft_steps == 0 and stats.tokens_per_step == 1.0
    assert Engine(fp32_bundle, threads=2, speculative=False).drafter is None


def test_constrained_drafting_gives_the_plain_constrained_output(fp32_bundle: Path) -> None:
    """Under a grammar every token, the draft too, is chosen from the tokens it allows: the output is
    plain constrained decoding's, greedy or sampled, and forced stretches (keys, brackets) are drafted right.
    (Tool definitions do not fit this bundle's 256-token context; calls go through the same loop.)"""
    from edgekit.agent.grammar import GrammarCompiler, ReplyFormat
    from tests.test_agent import SCHEMAS

    engine = Engine(fp32_bundle, threads=2)
    tokenizer = ChatTokenizer(fp32_bundle)
    grammars = GrammarCompiler(tokenizer, engine.vocab_size, engine.eos_ids)
    accepted = steps = 0
    for fmt in [ReplyFormat(json_schema=bounded) for bounded in SCHEMAS]:
        for text, sampling in ((PROMPTS[0], Sampling()), (PROMPTS[1], Sampling()), (PROMPTS[2], Sampling(temperature=0.8, seed=3))):
            ids = tokenizer.encode(tokenizer.render([{"role": "user", "content": text}], thinking=False))
            plain = list(engine.generate(ids, 60, sampling, speculative=False, constraint=grammars.constraint(fmt, thinking=False)))
            stats = GenerationStats()
            drafted = list(engine.generate(ids, 60, sampling, stats=stats, constraint=grammars.constraint(fmt, thinking=False)))
            assert drafted == plain, (fmt, text, sampling)
            accepted, steps = accepted + stats.drafts_accepted, steps + stats.draft_steps
    assert 0 < accepted < steps, (accepted, steps)
    print(f"fp32 constrained: acceptance {accepted / steps:.3f} over {steps} drafts")


def test_int4_drafting_agreement_with_plain_decoding(int4_bundle: Path) -> None:
    """int4 MatMulNBits may round a k-token step differently from k one-token steps: report the
    agreement (docs/benchmarks.md) and hold it high rather than promise equality."""
    engine = Engine(int4_bundle, threads=2)
    tokenizer = ChatTokenizer(int4_bundle)
    same = total = 0
    for text in PROMPTS:
        plain, drafted, _, stats = _both(engine, tokenizer.encode(text), 48)
        prefix = next((i for i, (a, b) in enumerate(zip(plain, drafted)) if a != b), len(plain))
        same, total = same + prefix, total + len(plain)
        print(f"int4 {text!r}: identical for {prefix}/{len(plain)} tokens, acceptance {stats.acceptance:.3f}, "
              f"{stats.tokens_per_step:.2f} tokens per step")
    assert same / total >= 0.9, (same, total)


def test_the_daemon_drafts_and_reports_it_and_a_request_may_opt_out(int4_bundle: Path, broker: int) -> None:
    daemon, thread = start_daemon(DaemonConfig(bundle=int4_bundle, broker=broker_at(broker),
                                               device_id=f"dev-{uuid.uuid4().hex[:8]}"))
    try:
        finals = {}
        with DeviceClient(broker_at(broker)) as client:
            for name, extra in (("drafted", {}), ("plain", {"speculative": False}),
                                ("sampled", {"prompt": PROMPTS[2], "temperature": 0.7, "top_p": 0.8, "top_k": 20, "seed": 6})):
                request = {"prompt": PROMPTS[0], "max_tokens": 32, **extra}
                request_id = client.send(daemon.config.device_id, request)
                replies = list(client.replies(request_id, timeout=120))
                finals[name] = (replies[-1], "".join(r["text"] for r in replies if r["type"] == "chunk"))
        for final, _ in finals.values():
            jsonschema.validate(final, schema("final"))
        drafted, plain, sampled = (finals[name][0]["timings"] for name in ("drafted", "plain", "sampled"))
        assert drafted["draft_acceptance"] > 0.3 and drafted["tokens_per_step"] > 1.2, drafted
        assert plain["draft_acceptance"] is None and plain["tokens_per_step"] == 1.0, plain
        assert sampled["draft_acceptance"] > 0 and sampled["tokens_per_step"] > 1.0, sampled  # sampled requests draft too
        assert finals["drafted"][1] == finals["plain"][1]
        assert daemon.metrics.snapshot()["draft_steps"] > 0  # telemetry's inference section counts them
    finally:
        daemon.stop()
        thread.join(timeout=30)


def test_generate_command_reports_drafting_and_can_turn_it_off(int4_bundle: Path) -> None:
    runs = {}
    for flags in ([], ["--no-speculative"]):
        result = CliRunner().invoke(main, ["generate", str(int4_bundle), PROMPTS[2], "--raw", "--max-tokens", "24", "--json",
                                           "--threads", "2", *flags])
        assert result.exit_code == 0, result.output
        runs[bool(flags)] = json.loads(result.stdout)
    assert runs[False]["timings"]["draft_acceptance"] > 0.3 and runs[False]["timings"]["tokens_per_step"] > 1.2
    assert runs[True]["timings"]["draft_acceptance"] is None and runs[True]["timings"]["tokens_per_step"] == 1.0
    assert runs[False]["text"] == runs[True]["text"]
