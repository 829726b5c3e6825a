"""``edgekit bench``: speed and memory of a bundle, on the engine directly and through the MQTT daemon.

Speed figures are medians of several runs; direct and MQTT runs alternate so both see the same
machine noise, and their ratios come from the same run.
"""

from __future__ import annotations

import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from edgekit.client import DeviceClient
from edgekit.errors import EdgekitError
from edgekit.runtime import machine
from edgekit.runtime.engine import Engine
from edgekit.runtime.timing import timed_generation
from edgekit.runtime.tokenizer import ChatTokenizer
from edgekit.serve import embedded_broker
from edgekit.serve.daemon import GRAMMAR_IDLE_S, TRIM_AFTER_IDLE_S


def direct_run(engine: Engine, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """One generation on the engine: prefill/decode tok/s, TTFT and inter-token latencies."""
    started = time.perf_counter()
    stats = timed_generation(engine, prompt_len, new_tokens)
    gaps = [b - a for a, b in zip(stats.token_times, stats.token_times[1:])]
    return {"prefill_tps": stats.prefill_tps, "decode_tps": stats.decode_tps,
            "ttft_s": stats.token_times[0] - started, "itl": gaps}


def depth_run(engine: Engine, depth: int, new_tokens: int) -> float:
    """Decode tok/s after ``depth`` tokens of context, prefilled first and not timed (llama-bench's
    ``-d``): what a long conversation or document costs each new token."""
    return timed_generation(engine, max(depth, 1), new_tokens).decode_tps


def depth_sweep(engine: Engine, depths: tuple[int, ...], new_tokens: int, runs: int,
                progress: Any = print) -> dict[str, dict[str, float]]:
    """Decode tok/s (min, median, max over ``runs``) after each of ``depths`` tokens of context."""
    for depth in depths:
        if depth + new_tokens > engine.context_length:
            raise EdgekitError(f"--depths: {depth} tokens of context plus {new_tokens} new ones do not fit the bundle's "
                               f"context of {engine.context_length} tokens")
    sweep = {}
    for depth in depths:
        progress(f"decode after {depth} tokens of context")
        sweep[str(depth)] = _spread([depth_run(engine, depth, new_tokens) for _ in range(runs)])
    return sweep


def timed_request(client: DeviceClient, device: str, request: dict[str, Any],
                  timeout: float = 600) -> tuple[float, list[float], dict[str, Any]]:
    """Send ``request`` and time its replies at the client: (send time, chunk arrival times, final
    message); an error reply raises. ``timeout``: the longest wait for any reply, in seconds."""
    started = time.perf_counter()
    request_id = client.send(device, request)
    times: list[float] = []
    final: dict[str, Any] = {}
    for reply in client.replies(request_id, timeout=timeout):
        if reply["type"] == "chunk":
            times.append(time.perf_counter())
        elif reply["type"] == "final":
            final = reply
        elif reply["type"] == "error":
            raise EdgekitError(f"bench request failed: {reply['message']}")
    return started, times or [time.perf_counter()], final


def mqtt_run(client: DeviceClient, device: str, prompt_len: int, new_tokens: int) -> dict[str, float]:
    """One generation through the broker, timed at the client: TTFT and decode rate as a user sees them."""
    started, times, final = timed_request(client, device, {"prompt": " a" * prompt_len, "max_tokens": new_tokens})
    tokens = final["usage"]["completion_tokens"]
    return {"ttft_s": times[0] - started, "decode_tps": (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
            "server_ttft_s": final["timings"]["time_to_first_token_s"] + final["timings"]["queue_s"],
            "server_decode_tps": final["timings"]["decode_tokens_per_s"], "prompt_tokens": final["usage"]["prompt_tokens"]}


def varied_text(tokenizer: ChatTokenizer, tokens: int, seed: int = 0) -> str:
    """Text of about ``tokens`` tokens (never more) drawn from the whole ordinary vocabulary: the worst
    case for anything that keeps per-token pages resident, where a repeated word would hide it."""
    rng = random.Random(seed)
    ordinary = tokenizer.tokenizer.get_vocab_size(with_added_tokens=False)
    ids = [rng.randrange(ordinary) for _ in range(tokens)]
    while True:
        text = tokenizer.decode(ids)
        excess = len(tokenizer.encode(text)) - tokens  # decoded pieces may merge or split on re-encoding
        if excess <= 0:
            return text
        del ids[-excess - 8 :]


def full_context_rss(client: DeviceClient, device: str, process: psutil.Process, bundle: Path,
                      context: int) -> dict[str, float | None]:
    """The daemon's memory over a request of varied text that fills the context to within a few tokens:
    its peak RSS during the request (Linux; the high-water mark is reset first, so load-time transients
    are out), and its RSS and private (anonymous) RSS right after it, while a session keeps that context."""
    prompt = varied_text(ChatTokenizer(bundle), context - 64)
    reset = _reset_peak(process)
    timed_request(client, device, {"prompt": prompt, "max_tokens": 8,
                                   "session": "bench-full-context", "new_session": True})
    return {"daemon_rss_full_context_mb": process.memory_info().rss / 2**20,
            "daemon_anon_rss_full_context_mb": _status_mb(process, "RssAnon"),
            "daemon_peak_rss_full_context_mb": _status_mb(process, "VmHWM") if reset else None}


def _reset_peak(process: psutil.Process) -> bool:
    """Reset the process's high-water RSS (Linux ``clear_refs``); False where that is not possible."""
    try:
        Path(f"/proc/{process.pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_mb(process: psutil.Process, field: str) -> float | None:
    """A memory field of ``/proc/PID/status`` (Linux) in MiB, e.g. VmHWM (peak RSS) or RssAnon."""
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
    except OSError:
        return None
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def _spread(values: list[float]) -> dict[str, float]:
    """Minimum, median and maximum over the runs."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(bundle: Path, runs: int, prompt_len: int, new_tokens: int, threads: int | None,
        progress: Any = print, depths: tuple[int, ...] = ()) -> dict[str, Any]:
    """The full benchmark; returns a JSON-ready report. ``depths`` adds decode speed after that many
    tokens of context (``depth_decode_tps``)."""
    engine = Engine(bundle, threads=threads)
    sweep = depth_sweep(engine, depths, new_tokens, runs, progress) if depths else None
    broker = embedded_broker.start()
    device = "bench"
    command = [sys.executable, "-m", "edgekit.cli", "serve", str(bundle), "--device-id", device, "--port",
               str(broker.port), "--mqtt", broker.protocol.value, "--telemetry-interval", "3600"]
    if threads:
        command += ["--threads", str(threads)]
    daemon = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    used_threads = threads or engine.threads or None
    report: dict[str, Any] = {"bundle": str(bundle), "prompt_tokens": prompt_len, "new_tokens": new_tokens,
                              "threads": used_threads, "runs": runs, "machine": machine.facts(used_threads),
                              "int4_layout": engine.int4_kernel}
    try:
        with DeviceClient(broker.settings) as client:
            client.wait_for_state(device, "online", timeout=120, alive=lambda: daemon.poll() is None)
            process = psutil.Process(daemon.pid)
            process.cpu_percent()
            time.sleep(5)
            report["idle_cpu_percent"] = process.cpu_percent()
            mqtt_run(client, device, 16, 4)  # warm-up on both paths
            direct_run(engine, 16, 4)
            direct, remote = [], []
            for index in range(runs):
                progress(f"run {index + 1}/{runs}")
                direct.append(direct_run(engine, prompt_len, new_tokens))
                remote.append(mqtt_run(client, device, prompt_len, new_tokens))
            report["daemon_rss_mb"] = process.memory_info().rss / 2**20
            report["daemon_peak_rss_mb"] = _status_mb(process, "VmHWM")  # loading included
            report.update(full_context_rss(client, device, process, bundle, engine.context_length))
            # Again once the daemon has served a constrained request: llguidance, jsonschema and the
            # grammar's tokenizer index stay resident from then on (docs/agent.md).
            constrained = {"prompt": "Report the sensor.", "max_tokens": 16, "response_format": {"type": "json_object"}}
            timed_request(client, device, constrained)
            report["agent"] = full_context_rss(client, device, process, bundle, engine.context_length)
            # And once the daemon has dropped the index for want of constrained requests.
            timed_request(client, device, constrained)
            time.sleep(GRAMMAR_IDLE_S + 1)
            report["agent_after_idle"] = full_context_rss(client, device, process, bundle, engine.context_length)
            time.sleep(TRIM_AFTER_IDLE_S + 1)
            report["daemon_rss_idle_mb"] = process.memory_info().rss / 2**20  # after the idle trim
            itl = [gap for r in direct for gap in r["itl"]]
            med = statistics.median
            report["direct"] = {"prefill_tps": med(r["prefill_tps"] for r in direct),
                                "decode_tps": med(r["decode_tps"] for r in direct),
                                "ttft_ms": 1000 * med(r["ttft_s"] for r in direct),
                                "itl_p50_ms": 1000 * _percentile(itl, 0.5), "itl_p99_ms": 1000 * _percentile(itl, 0.99)}
            report["mqtt"] = {"decode_tps": med(r["decode_tps"] for r in remote),
                              "ttft_ms": 1000 * med(r["ttft_s"] for r in remote),
                              "server_ttft_ms": 1000 * med(r["server_ttft_s"] for r in remote),
                              "prompt_tokens": remote[0]["prompt_tokens"]}
            report["spread"] = {
                "direct_prefill_tps": _spread([r["prefill_tps"] for r in direct]),
                "direct_decode_tps": _spread([r["decode_tps"] for r in direct]),
                "direct_ttft_ms": _spread([1000 * r["ttft_s"] for r in direct]),
                "mqtt_decode_tps": _spread([r["decode_tps"] for r in remote]),
                "mqtt_ttft_ms": _spread([1000 * r["ttft_s"] for r in remote]),
            }
            ratios = [m["decode_tps"] / d["decode_tps"] for d, m in zip(direct, remote)]
            report["mqtt_over_direct_decode"] = med(ratios)
            # Added TTFT: what the broker round trip adds to the daemon's own time to first token.
            report["added_ttft_ms"] = med(1000 * (m["ttft_s"] - m["server_ttft_s"]) for m in remote)
            report["session"] = _session_bench(client, device, progress)
            if sweep is not None:
                report["depth_decode_tps"] = sweep
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        broker.stop()
    return report


def _session_bench(client: DeviceClient, device: str, progress: Any) -> dict[str, float]:
    """Turn 2 of a conversation with ~2,000 tokens of history: kept session vs. replaying the history."""
    progress("session vs replay")
    history = [{"role": "user", "content": " ".join(f"note {i}: the sensor read {i % 37} degrees." for i in range(160))}]
    first = client.ask(device, {"messages": history, "session": "bench", "new_session": True, "max_tokens": 8})
    follow = {"role": "user", "content": "Summarise the readings."}
    started, times, _ = timed_request(client, device, {"messages": [follow], "session": "bench", "max_tokens": 4})
    kept_s = times[0] - started
    replay_history = [*history, {"role": "assistant", "content": "ok"}, follow]
    started, times, _ = timed_request(client, device, {"messages": replay_history, "max_tokens": 4})
    replay_s = times[0] - started
    return {"history_tokens": first["usage"]["session_tokens"], "kept_ttft_ms": 1000 * kept_s,
            "replay_ttft_ms": 1000 * replay_s, "speedup": replay_s / kept_s}
