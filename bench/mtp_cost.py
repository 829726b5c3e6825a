"""What speculative decoding with Qwen3.5's MTP head costs on this CPU: the mtp issue's go/no-go, measured.

It needs two bundles of the same random-weight checkpoint (real shapes, so real cost) and recipe:
PLAIN, as the daemon runs it (logits for the last position only), and MTP, built with ``--include-mtp``
(logits for every position, as verifying a draft needs, plus ``mtp.onnx``). After DEPTH tokens of
context it times, in alternating rounds:

- ``plain``: one decode step of PLAIN, the unit every other cost is divided by;
- ``verify k``: one step of k tokens through MTP's main graph (k = 1..4);
- ``draft p``: one step of the builder's ``mtp.onnx`` over p positions (p = 1, 2), its layer's KV cache
  holding DEPTH positions: the full tied LM head over every position;
- ``draftROWS p``: the same step of the draft graph the build ships (edgekit.builder.draft_graph: head
  cut to its first ROWS rows, last position only, embeddings in, fp16 cache), made here by the
  builder's own function for each ``--rows``. A draft head over the most frequent tokens only
  (FR-Spec, arXiv 2502.14856) costs what any ROWS rows cost; which rows, and what they do to
  acceptance on a real checkpoint, is not measured here.

Both kinds of draft run in the runtime's own :class:`~edgekit.runtime.speculative.Drafter` (its session
settings, its binding), so the figures are what the engine's drafting pays.

The model of the speculative loop, with a one-token draft and greedy acceptance a. A step feeds the p
tokens not yet in the recurrent state plus the draft (p + 1 tokens). Accepted (probability a): 2 new
tokens, the MTP layer runs over 2 positions, and next step p = 1. Rejected: 1 new token, and the state,
which now holds a wrong token, goes back to its copy from before the step (alternating two state
buffers copies nothing), so the step's p tokens and the new one are all pending: p + 1. Past a cap C
of pending tokens a plain step of p tokens, without a draft, brings p back to 1. The steady state of
that chain gives tokens per unit cost (cost in plain decode steps):

    speed-up(a, C) = sum_p pi_p * tokens_p / sum_p pi_p * cost_p,   pi_p proportional to (1 - a)^(p - 1)
    p <= C:  tokens 1 + a,  cost verify(p + 1) + a * draft 2 + (1 - a) * draft 1
    p = C+1: tokens 1,      cost verify(C + 1) + draft 1

before any per-step overhead of the loop itself. The rule, written before measuring: build the drafting
engine only if the best speed-up(a, C) reaches 1.10 at the trained fixture's measured acceptance
(0.666, bench/mtp_acceptance.py); a smaller gain is inside this machine's run-to-run spread and would go
to the loop's own overheads.

Prints JSON: the step costs (median seconds and relative to ``plain``) and speed-up(a) for a few a.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent.parent))

from edgekit.builder.draft_graph import draft_graph  # noqa: E402
from edgekit.builder.graph_memory import save  # noqa: E402
from edgekit.runtime.engine import Engine, GenerationStats  # noqa: E402
from edgekit.runtime.speculative import DRAFT_P_MIN, Drafter  # noqa: E402
from edgekit.runtime.timing import filler_prompt  # noqa: E402

ACCEPTANCES = (0.6, 0.666, 0.7, 0.8, 0.9)
CAPS = (1, 2, 3)  # pending-token caps of the loop (module docstring); verify is timed up to 4 tokens


def shipped_draft(mtp: Path, rows: int, work: Path) -> Path:
    """The draft graph an ``--include-mtp`` build ships, with a head of ``rows`` rows, written to
    ``work`` beside hard links to ``mtp``'s weight files (the graph reads them in place, as in a
    bundle; ONNX Runtime refuses external data reached through a symbolic link out of the folder)."""
    work.mkdir(parents=True, exist_ok=True)
    for data in mtp.parent.glob("*.data"):
        link = work / data.name
        if link.exists() and not link.samefile(data):
            link.unlink()
        if not link.exists():
            try:
                os.link(data, link)
            except OSError as exc:
                raise click.ClickException(f"cannot link {data} into {work} ({exc.strerror}): put --work on the "
                                           "bundle's file system") from exc
    target = work / f"draft-rows{rows}.onnx"
    save(draft_graph(onnx.load(str(mtp), load_external_data=False), rows), target)
    return target


def draft_step(drafter: Drafter, depth: int, capacity: int, head_size: int,
               positions: int) -> Callable[[], Callable[[], Any]]:
    """Prepares one step of the runtime's own ``drafter`` over ``positions`` new positions after
    ``depth`` entries (values are irrelevant to cost). The cache is allocated once and set back before
    each step, so every step pays the same depth and touches no fresh pages."""
    entries = drafter._new_entries(depth, capacity, head_size)
    hidden_size = next(i.shape[-1] for i in drafter.session.get_inputs() if i.name == "hidden_states")
    row = np.zeros(hidden_size, np.float32)
    spots = list(range(depth, depth + positions))

    def prepare() -> Callable[[], Any]:
        entries.entered = entries.length = depth
        entries.hidden = dict.fromkeys(spots, row)
        entries.tokens = {p + 1: 42 for p in spots}
        return functools.partial(drafter._run, entries, spots)

    return prepare


def time_steps(prepare: Callable[[], Callable[[], Any]], count: int) -> float:
    """Median seconds of ``count`` steps after one untimed one; ``prepare`` (untimed) returns each step."""
    prepare()()
    times = []
    for _ in range(count):
        step = prepare()
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def engine_step(engine: Engine, depth: int, tokens: int) -> Callable[[], Callable[[], Any]]:
    """Prepares one ``tokens``-token step after ``depth`` tokens of context, each from a fresh copy
    of the same state (copied before the clock starts), so every step pays the same depth."""
    state = engine.new_state()
    engine.forward(state, [1000 + i % 5000 for i in range(depth)])
    return lambda: functools.partial(engine.forward, state.copy(), [42] * tokens)


def speedup(costs: dict[str, float], a: float, draft: str, cap: int) -> float:
    """Tokens per plain-step cost of the loop's steady state (the chain in the module docstring)."""
    weights = [(1 - a) ** (p - 1) for p in range(1, cap + 2)]
    tokens = cost = 0.0
    for p, weight in enumerate(weights, start=1):
        if p <= cap:
            tokens += weight * (1 + a)
            cost += weight * (costs[f"verify {p + 1}"] + a * costs[f"{draft} 2"] + (1 - a) * costs[f"{draft} 1"])
        else:
            tokens += weight
            cost += weight * (costs[f"verify {p}"] + costs[f"{draft} 1"])
    return tokens / cost


Draws = Iterator[tuple[float, float]]  # per draft: (probability it is right, the head's confidence)


def end_to_end(plain: Engine, drafting: Engine, variants: dict[str, tuple[Callable[[int], Draws], float]],
               rounds: int) -> dict[str, Any]:
    """Decode tok/s (medians over ``rounds``) of plain decoding and of oracle drafting in each variant:
    its draws (a function of the round) and the draft confidence below which it does not draft."""
    ids = filler_prompt(128)
    samples: dict[str, list[float]] = {"plain": []}
    measured: dict[str, list[float]] = {}
    drafted: dict[str, list[float]] = {}
    for round_index in range(rounds):
        stats = GenerationStats()
        list(plain.generate(ids, 64, stats=stats))
        samples["plain"].append(stats.decode_tps)
        for name, (draws, p_min) in variants.items():
            stats = oracle_decode(drafting, ids, 64, draws(round_index), p_min, seed=round_index)
            samples.setdefault(name, []).append(stats.decode_tps)
            measured.setdefault(name, []).append(stats.acceptance or 0.0)
            drafted.setdefault(name, []).append(stats.draft_steps / max(1, stats.decode_steps))
        print(f"round {round_index + 1}/{rounds} done", file=sys.stderr)
    tps = {name: statistics.median(values) for name, values in samples.items()}
    return {"decode_tps": tps, "speedup": {name: value / tps["plain"] for name, value in tps.items()},
            "measured_acceptance": {name: statistics.median(values) for name, values in measured.items()},
            "steps_drafted": {name: statistics.median(values) for name, values in drafted.items()}}


def oracle_decode(engine: Engine, ids: list[int], new: int, draws: Draws, p_min: float, seed: int = 0) -> GenerationStats:
    """A drafted generation whose drafts cost what the real draft costs (it runs) but are right with
    the probability ``draws`` gives each (the true greedy token from a plain run, else another), which
    also gives the head's confidence, checked against ``p_min``. Random weights make the real head's
    drafts worthless, so this is how the loop's speed is measured on real shapes. The output must still
    be plain greedy decoding's (checked)."""
    truth = ids + list(engine.generate(ids, new, speculative=False))
    drafter = engine.drafter
    assert drafter is not None, "the MTP bundle has no draft graph (build it with --include-mtp)"
    real_enter = drafter._enter
    rng = random.Random(seed)

    def enter(entries: Any, constraint: Any = None) -> tuple[int, float]:
        real_enter(entries, constraint)
        chance, confidence = next(draws)
        target = entries.entered + 1  # the draft is for two positions past the last one entered
        right = truth[target] if target < len(truth) else 0
        return (right if rng.random() < chance else (right + 1) % drafter.rows), confidence

    drafter._enter = enter  # type: ignore[method-assign]
    # The oracle decodes greedily (it needs the true tokens); the gate a variant asks for applies anyway.
    drafter.greedy_p_min = p_min
    try:
        stats = GenerationStats()
        drafted = list(engine.generate(ids, new, stats=stats))
    finally:
        del drafter._enter
        drafter.greedy_p_min = 0.0
    assert drafted == truth[len(ids):], "drafted output differs from plain greedy decoding"
    return stats


def replayed(path: Path) -> Callable[[int], Draws]:
    """Draws from ``bench/mtp_acceptance.py --save``: the recorded positions in order, each round
    starting elsewhere."""
    positions = [tuple(p) for p in json.loads(path.read_text())["positions"]]
    return lambda round_index: itertools.islice(itertools.cycle(positions), 997 * round_index, None)  # type: ignore[return-value]


@click.command()
@click.option("--plain", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Bundle built without --include-mtp.")
@click.option("--mtp", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The same checkpoint and recipe built with --include-mtp.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--depth", type=click.IntRange(1), default=256, show_default=True, help="Tokens of context before the step.")
@click.option("--rows", "row_counts", type=click.IntRange(1), multiple=True, default=[32768, 16384], show_default=True,
              help="LM head rows of the cut draft heads.")
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True)
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="Timed steps per figure and round.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("mtp-results"), show_default=True,
              help="Folder for the draft graphs (they read the MTP bundle's weight files through links).")
@click.option("--end-to-end", "acceptances", type=click.FloatRange(0, 1), multiple=True,
              help="Instead: decode tok/s of PLAIN and of MTP drafting at this oracle acceptance (repeatable), "
                   "a 128-token prompt and 64 new tokens, alternating rounds.")
@click.option("--replay", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Instead (or as well): the same with each draft's acceptance and confidence taken from "
                   "bench/mtp_acceptance.py --save, drafting gated at DRAFT_P_MIN (as sampled requests are) "
                   "and ungated.")
def main(plain: Path, mtp: Path, threads: int, depth: int, row_counts: tuple[int, ...], rounds: int, steps: int,
         work: Path, acceptances: tuple[float, ...], replay: Path | None) -> None:
    """Time plain decode, k-token verify and MTP draft steps; print the costs and predicted speed-ups.

    Example: python bench/mtp_cost.py --plain dist/plain --mtp dist/with-mtp --threads 2
    """
    plain_engine = Engine(plain, threads=threads)
    verify_engine = Engine(mtp, threads=threads)
    if acceptances or replay:
        variants: dict[str, tuple[Callable[[int], Draws], float]] = {
            f"drafting at {a}": (lambda _, a=a: itertools.repeat((a, 1.0)), 0.0) for a in acceptances}
        if replay:
            variants[f"replay, drafts at confidence >= {DRAFT_P_MIN}"] = (replayed(replay), DRAFT_P_MIN)
            variants["replay, every draft"] = (replayed(replay), 0.0)
        click.echo(json.dumps(end_to_end(plain_engine, verify_engine, variants, rounds), indent=2))
        return
    work.mkdir(parents=True, exist_ok=True)
    if verify_engine.drafter is None:
        raise click.ClickException(f"{mtp}: this bundle does not draft (build it with --include-mtp)")
    embedding = verify_engine.drafter.embedding
    drafters = {"draft": Drafter(mtp / "mtp.onnx", threads, embedding)}
    for rows in row_counts:
        drafters[f"draft{rows}"] = Drafter(shipped_draft(mtp / "mtp.onnx", rows, work), threads, embedding)
    shape = (depth, verify_engine.context_length,
             int(json.loads((mtp / "genai_config.json").read_text())["model"]["mtp"]["head_size"]))
    steps_by_name: dict[str, Callable[[], Callable[[], Any]]] = {"plain": engine_step(plain_engine, depth, 1)}
    for k in (1, 2, 3, 4):
        steps_by_name[f"verify {k}"] = engine_step(verify_engine, depth, k)
    # In the loop a draft follows a main step, which streams every weight through the caches: each
    # timed draft does too, or a cut head small enough for the last-level cache would look free. The
    # drafting bundle's step, as in the loop: its threads stop spinning when it ends (the plain
    # engine's would spin on into the draft's time).
    evict = engine_step(verify_engine, depth, 1)

    def after_main_step(prepare: Callable[[], Callable[[], Any]]) -> Callable[[], Any]:
        evict()()
        return prepare()

    for name, drafter in drafters.items():
        for positions in (1, 2):
            steps_by_name[f"{name} {positions}"] = functools.partial(after_main_step, draft_step(drafter, *shape, positions))
    samples: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for round_index in range(rounds):
        order = list(steps_by_name) if round_index % 2 == 0 else list(reversed(steps_by_name))
        for name in order:
            samples[name].append(time_steps(steps_by_name[name], steps))
        print(f"round {round_index + 1}/{rounds} done", file=sys.stderr)
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    relative = {name: value / seconds["plain"] for name, value in seconds.items()}
    report = {
        "threads": threads, "depth": depth, "rounds": rounds, "steps": steps,
        "seconds": seconds, "relative": relative,
        "speedup": {f"{name}, cap {cap}": {str(a): round(speedup(relative, a, name, cap), 3) for a in ACCEPTANCES}
                    for name in drafters for cap in CAPS},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
