"""What images cost on a bundle with a vision encoder: encoder time per image size, image tokens,
time to first token of an image+text prompt, memory with and without the encoder, bundle sizes.

Runs the runtime as the daemon does (engine, tokenizer, the lazily loaded encoder) in this process,
so its RSS is the daemon's minus the MQTT client. Image sizes are the issue's 224x224, 448x448 and
896x672, resized as the processor does (224x224 is below the default minimum of 65,536 pixels and
goes up to 256x256) but not capped by the profile, so every bundle is timed at the same sizes; the
profile's cap is reported beside them. Medians of ``--runs`` runs; prints JSON and writes JSON plus
a markdown table.

Example::

    python bench/vision.py dist/qwen3.5-0.8b-raspberry-pi-5-int4 --runs 3 --out vision-results
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil

from edgekit.builder.parity import sample_image
from edgekit.bundle import Manifest
from edgekit.runtime.conversation import Turn, run_turn
from edgekit.runtime.engine import Engine
from edgekit.runtime.images import preprocess
from edgekit.runtime.resident import trim_heap, tune_allocator
from edgekit.runtime.tokenizer import ChatTokenizer
from edgekit.runtime.vision import VISION_GRAPH, VisionEncoder

SIZES = ((224, 224), (448, 448), (896, 672))  # width x height
MIB = 1024**2


class Peak:
    """The largest RSS of this process while it runs (sampled every 2 ms)."""

    def __init__(self) -> None:
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> Peak:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rss() -> int:
    return psutil.Process().memory_info().rss


def measure(bundle: Path, runs: int, threads: int | None) -> dict:
    tune_allocator()
    manifest = Manifest.read(bundle)
    files = {f.path: f.size for f in manifest.files}
    vision_bytes = sum(size for path, size in files.items() if path in (VISION_GRAPH, "preprocessor_config.json"))
    tokenizer = ChatTokenizer(bundle)
    engine = Engine(bundle, threads=threads)
    encoder = VisionEncoder(bundle, threads=engine.threads or None)
    text_turn = Turn(messages=[{"role": "user", "content": "Describe a kitchen."}], max_tokens=8)
    run_turn(engine, tokenizer, text_turn, lambda text: None)
    trim_heap()
    text_only_rss = rss()
    # The encoder's own cost: every size resized as the processor does, not capped by the profile.
    processing = replace(encoder.processing, max_pixels=max(encoder.processing.max_pixels, 896 * 672))
    started = time.perf_counter()
    encoder.encode(preprocess(sample_image(64, 64, 0), processing))
    load_s = time.perf_counter() - started
    trim_heap()
    loaded_rss = rss()
    sizes = []
    for width, height in SIZES:
        patches = preprocess(sample_image(height, width, 1), processing)
        times = []
        with Peak() as peak:
            for _ in range(runs):
                started = time.perf_counter()
                encoder.encode(patches)
                times.append(time.perf_counter() - started)
        trim_heap()
        ttfts, prefill_tps = [], []
        for _ in range(runs):
            turn = Turn(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is on the table?"}]}],
                        images=[patches], max_tokens=1)
            started = time.perf_counter()
            result = run_turn(engine, tokenizer, turn, lambda text: None, vision=encoder)
            ttfts.append(time.perf_counter() - started)
            prefill_tps.append(result.stats.prefill_tps)
            trim_heap()
        _, grid_h, grid_w = patches.grid
        sizes.append({"image": f"{width}x{height}", "resized": f"{grid_w * 16}x{grid_h * 16}", "patches": grid_h * grid_w,
                      "image_tokens": patches.tokens, "encode_s": round(statistics.median(times), 3),
                      "encode_min_s": round(min(times), 3), "encode_max_s": round(max(times), 3),
                      "ttft_s": round(statistics.median(ttfts), 3), "prompt_tokens": result.stats.prompt_tokens,
                      "prefill_tokens_per_s": round(statistics.median(prefill_tps), 1),
                      "peak_rss_mib": round(peak.peak / MIB, 1)})
    encoder.release()
    engine.release_memory()
    return {"bundle": manifest.name, "model": manifest.model.id, "profile": manifest.profile.name,
            "precision": manifest.recipe.precision, "encoder_precision": manifest.vision.precision if manifest.vision else None,
            "profile_max_pixels": manifest.vision.max_pixels if manifest.vision else None, "threads": engine.threads,
            "context_length": engine.context_length, "runs": runs,
            "bundle_mib": round(sum(files.values()) / MIB, 1),
            "bundle_without_vision_mib": round((sum(files.values()) - vision_bytes) / MIB, 1),
            "encoder_file_mib": round(files.get(VISION_GRAPH, 0) / MIB, 1), "encoder_load_s": round(load_s, 3),
            "rss_text_only_mib": round(text_only_rss / MIB, 1), "rss_encoder_loaded_mib": round(loaded_rss / MIB, 1),
            "rss_after_release_mib": round(rss() / MIB, 1), "sizes": sizes}


def table(result: dict) -> str:
    lines = [f"**{result['bundle']}** ({result['precision']} text, {result['encoder_precision']} encoder, "
             f"{result['threads']} threads): bundle {result['bundle_mib']} MiB, {result['bundle_without_vision_mib']} MiB "
             f"without vision; RSS {result['rss_text_only_mib']} MiB text-only, {result['rss_encoder_loaded_mib']} MiB "
             f"with the encoder loaded (load {result['encoder_load_s']} s)", "",
             "| image | resized | patches | image tokens | encoder s (min-max) | time to first token s | prompt tokens | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for s in result["sizes"]:
        lines.append(f"| {s['image']} | {s['resized']} | {s['patches']} | {s['image_tokens']} | {s['encode_s']} "
                     f"({s['encode_min_s']}-{s['encode_max_s']}) | {s['ttft_s']} | {s['prompt_tokens']} | {s['peak_rss_mib']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="[default: the bundle's]")
    parser.add_argument("--out", type=Path, default=None, help="Folder for <bundle>.json and <bundle>.md.")
    args = parser.parse_args()
    result = measure(args.bundle, args.runs, args.threads)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{result['bundle']}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{result['bundle']}.md").write_text(table(result))


if __name__ == "__main__":
    main()
