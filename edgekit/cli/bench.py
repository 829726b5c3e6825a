"""``edgekit bench``: measure a bundle on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgekit.cli.common import Output, err, friendly, int_list, out, output_option


@click.command("bench")
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--runs", type=click.IntRange(1), default=5, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="Override the bundle's thread count.")
@click.option("--depths", default="", metavar="D1,D2,...", callback=int_list(0, "0,1024,4032"),
              help="Also measure decode after each of these many tokens of context (like llama-bench -d).")
@output_option()
@friendly
def bench(bundle_dir: Path, runs: int, prompt_tokens: int, new_tokens: int, threads: int | None, depths: tuple[int, ...],
          output: Output) -> None:
    """Measure a bundle: engine speed, the same through an MQTT daemon, idle CPU, RSS, sessions.

    \b
    Example:
      edgekit bench dist/qwen3.5-0.8b-host-int4 --runs 5 --depths 0,1024,4032 --json
    """
    from edgekit.bench import run

    report = run(bundle_dir, runs, prompt_tokens, new_tokens, threads, progress=lambda text: err.print(f"[dim]{text}[/]"),
                 depths=depths)
    output.result(report, _draw)


def _draw(report: dict[str, Any]) -> None:
    d, m, sess = report["direct"], report["mqtt"], report["session"]
    out.print(f"engine: prefill {d['prefill_tps']:.1f} tok/s, decode {d['decode_tps']:.1f} tok/s, TTFT {d['ttft_ms']:.0f} ms, "
              f"inter-token p50 {d['itl_p50_ms']:.1f} ms / p99 {d['itl_p99_ms']:.1f} ms")
    out.print(f"mqtt:   decode {m['decode_tps']:.1f} tok/s ({report['mqtt_over_direct_decode']:.3f}x direct), "
              f"TTFT {m['ttft_ms']:.0f} ms, added by the broker {report['added_ttft_ms']:.1f} ms")
    peak, full_peak = report["daemon_peak_rss_mb"], report["daemon_peak_rss_full_context_mb"]
    out.print(f"daemon: idle CPU {report['idle_cpu_percent']:.1f} %, RSS {report['daemon_rss_mb']:.0f} MiB after the runs, "
              f"{report['daemon_rss_full_context_mb']:.0f} MiB with the context full"
              + (f" (peak {full_peak:.0f} MiB during that request)" if full_peak else "")
              + f", {report['daemon_rss_idle_mb']:.0f} MiB idle"
              + (f", peak {peak:.0f} MiB with loading" if peak else ""))
    out.print(f"session turn 2 after {sess['history_tokens']} tokens: first token {sess['kept_ttft_ms']:.0f} ms kept vs "
              f"{sess['replay_ttft_ms']:.0f} ms replayed ({sess['speedup']:.1f}x)")
    for depth, decode in report.get("depth_decode_tps", {}).items():
        out.print(f"decode after {depth} tokens of context: {decode['median']:.1f} tok/s "
                  f"(min {decode['min']:.1f}, max {decode['max']:.1f})")


COMMANDS = (bench,)
