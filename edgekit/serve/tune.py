"""``edgekit tune``: measure the installed bundle at each thread count on this device, then its prefill
at each chunk size with the chosen count, and keep both winners in the daemon's config.

A bundle's thread count comes from the profile it was built for, which guesses the board. The device
itself knows better: its cores, its memory bus, what else runs on it (a Home Assistant beside the
daemon). Decode is bandwidth-bound and often peaks below the core count; prefill is compute-bound.
Prompts run in chunks (edgekit.runtime.engine.PREFILL_CHUNK by default): larger ones give the
kernels longer matrices, smaller ones hold fewer activations. Long prompts shrink their chunks to a
fixed memory bound whatever the setting, so the setting is about short-prompt speed.

Measuring beside a serving daemon would time both and slow its users, so tuning refuses while the
daemon's unit is active, or with ``pause`` stops it for the measurement and starts it again after
(with the new thread count), whatever happens in between.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from edgekit.errors import EdgekitError
from edgekit.runtime.engine import Engine, configured_threads
from edgekit.runtime.timing import timed_generation
from edgekit.serve import config as daemon_config

# Thread counts within this share of the best decode speed count as equally fast for decode; among
# them the best prefill wins, then the fewest threads (cores left to the device's other work).
DECODE_TIE = 0.03
# Chunk sizes within this share of the best prefill speed count as equally fast; the smallest wins
# (fewer activations held at once).
PREFILL_TIE = 0.03


@dataclass(frozen=True)
class Trial:
    """One thread count's figures: medians (and decode's spread) over the runs."""

    threads: int
    prefill_tps: float
    decode_tps: float
    decode_min: float
    decode_max: float


@dataclass(frozen=True)
class ChunkTrial:
    """One prefill chunk size's figures at the chosen thread count: medians over the runs."""

    chunk: int
    prefill_tps: float
    prefill_min: float
    prefill_max: float


@dataclass
class TuneReport:
    """What ``edgekit tune`` measured, chose and wrote."""

    bundle: str
    prompt_tokens: int
    new_tokens: int
    runs: int
    trials: list[Trial] = field(default_factory=list)
    chosen: int = 0
    previous: int | None = None  # the config's thread count before (None: the bundle's)
    bundle_threads: int | None = None
    chunk_prompt_tokens: int = 0
    chunk_trials: list[ChunkTrial] = field(default_factory=list)
    chosen_chunk: int | None = None  # None: chunks not measured
    previous_chunk: int | None = None  # the config's chunk before (None: the engine's default)
    config: str | None = None
    written: bool = False
    daemon_paused: bool = False
    rule: str = (f"highest median decode tok/s; within {DECODE_TIE:.0%} of it, highest prefill, then fewest threads; "
                 f"then the prefill chunk: within {PREFILL_TIE:.0%} of the highest median prefill tok/s, the smallest")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def thread_counts(cores: int | None = None) -> tuple[int, ...]:
    """The counts worth trying on a machine with ``cores`` cores: 1-4, then doubling, and ``cores``."""
    cores = cores or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    counts = {n for n in (1, 2, 3, 4) if n <= cores} | {cores}
    doubling = 8
    while doubling < cores:
        counts.add(doubling)
        doubling *= 2
    return tuple(sorted(counts))


def measure(bundle: Path, counts: tuple[int, ...], runs: int, prompt_tokens: int, new_tokens: int,
            progress: Callable[[str], None] = print) -> list[Trial]:
    """Prefill and decode speed of ``bundle`` at each of ``counts`` threads. One engine at a time: a
    Pi 4 has no room for four copies of the weights."""
    trials = []
    for threads in counts:
        progress(f"{threads} thread(s)")
        engine = Engine(bundle, threads=threads)
        timed_generation(engine, 8, 2)  # warm-up: first-run allocations are not what serving pays
        prefill, decode = [], []
        for _ in range(runs):
            stats = timed_generation(engine, prompt_tokens, new_tokens)
            prefill.append(stats.prefill_tps)
            decode.append(stats.decode_tps)
        trials.append(Trial(threads, statistics.median(prefill), statistics.median(decode), min(decode), max(decode)))
        del engine
        gc.collect()
    return trials


def measure_chunks(bundle: Path, threads: int, chunks: tuple[int, ...], runs: int, prompt_tokens: int,
                   progress: Callable[[str], None] = print) -> list[ChunkTrial]:
    """Prefill speed of ``bundle`` at ``threads`` threads with each of ``chunks`` tokens per step, on
    one engine (the chunk is read at each prompt; the runs of each size alternate with the others')."""
    engine = Engine(bundle, threads=threads)
    timed_generation(engine, 8, 2)
    speeds: dict[int, list[float]] = {chunk: [] for chunk in chunks}
    for run in range(runs):
        progress(f"prefill chunks, run {run + 1}/{runs}")
        for chunk in chunks:
            engine.prefill_chunk = chunk
            speeds[chunk].append(timed_generation(engine, prompt_tokens, 2).prefill_tps)
    del engine
    gc.collect()
    return [ChunkTrial(chunk, statistics.median(tps), min(tps), max(tps)) for chunk, tps in speeds.items()]


def choose_chunk(trials: list[ChunkTrial]) -> ChunkTrial:
    """The winner by the second half of :data:`TuneReport.rule`."""
    best = max(t.prefill_tps for t in trials)
    return min((t for t in trials if t.prefill_tps >= (1 - PREFILL_TIE) * best), key=lambda t: t.chunk)


def choose(trials: list[Trial]) -> Trial:
    """The winner by :data:`TuneReport.rule`."""
    best_decode = max(t.decode_tps for t in trials)
    close = [t for t in trials if t.decode_tps >= (1 - DECODE_TIE) * best_decode]
    return max(close, key=lambda t: (t.prefill_tps, -t.threads))


def write_tuning(path: Path, threads: int, prefill_chunk: int | None) -> None:
    """Set ``threads`` and ``prefill_chunk`` (None: leave it) in the daemon config at ``path``. The
    file as written, without the command's bundle argument, is what is kept; it is replaced
    atomically, with its mode and owner (it may hold a password file's path and be 0600)."""
    config = daemon_config.load(path, environ={})
    text = dataclasses.replace(config, threads=threads, prefill_chunk=prefill_chunk or config.prefill_chunk).to_yaml()
    info = path.stat()
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise EdgekitError(f"cannot write {path}: {exc.strerror} (the daemon's config: run as root, or --dry-run)") from exc
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(temporary, info.st_mode & 0o7777)
        if os.geteuid() == 0:
            os.chown(temporary, info.st_uid, info.st_gid)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)


def service_active(unit: str) -> bool:
    """Whether systemd reports ``unit`` active (False where there is no systemctl)."""
    return shutil.which("systemctl") is not None and _systemctl("is-active", "--quiet", unit).returncode == 0


@contextlib.contextmanager
def daemon_paused(unit: str, pause: bool) -> Iterator[bool]:
    """Stop ``unit`` for the block when it is active and ``pause`` allows it (refuse when not);
    start it again after. Yields whether it was stopped."""
    if not service_active(unit):
        yield False
        return
    if not pause:
        raise EdgekitError(f"{unit} is serving: measuring beside it would time both and slow its users; pass "
                           "--pause-daemon to stop it while tuning (it is started again after)")
    stopped = _systemctl("stop", unit)
    if stopped.returncode != 0:
        raise EdgekitError(f"cannot stop {unit} to tune: {stopped.stderr.strip() or stopped.stdout.strip()}")
    try:
        yield True
    finally:
        started = _systemctl("start", "--no-block", unit)
        if started.returncode != 0:
            raise EdgekitError(f"tuned, but {unit} did not start again: {started.stderr.strip()}")


def tune(bundle: Path | None, config_path: Path | None, counts: tuple[int, ...], runs: int, prompt_tokens: int,
         new_tokens: int, unit: str, pause: bool, write: bool, chunks: tuple[int, ...] = (),
         chunk_prompt_tokens: int = 512, progress: Callable[[str], None] = print) -> TuneReport:
    """Measure, choose and (with ``write`` and a config) keep the thread count and, unless ``chunks``
    is empty, the prefill chunk (measured on ``chunk_prompt_tokens``-token prompts); see the module notes."""
    config = daemon_config.load(config_path, {"bundle": bundle}, environ={}) if config_path else None
    target = bundle or (config.bundle if config else None)
    if target is None:
        raise EdgekitError("no bundle to tune: give BUNDLE or --config with a 'bundle' field")
    target = target.resolve()
    if not (target / "genai_config.json").is_file():
        raise EdgekitError(f"{target} is not a bundle folder (no genai_config.json)")
    bundle_threads = configured_threads(target)
    report = TuneReport(bundle=str(target), prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs,
                        bundle_threads=bundle_threads, config=str(config_path) if config_path else None,
                        previous=config.threads if config else None,
                        previous_chunk=config.prefill_chunk if config else None)
    with daemon_paused(unit, pause) as report.daemon_paused:
        report.trials = measure(target, counts, runs, prompt_tokens, new_tokens, progress)
        report.chosen = choose(report.trials).threads
        if chunks:
            report.chunk_prompt_tokens = chunk_prompt_tokens
            report.chunk_trials = measure_chunks(target, report.chosen, chunks, runs, chunk_prompt_tokens, progress)
            report.chosen_chunk = choose_chunk(report.chunk_trials).chunk
        if write and config_path is not None:
            write_tuning(config_path, report.chosen, report.chosen_chunk)
            report.written = True
    return report
