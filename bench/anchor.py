"""edgekit against llama.cpp on the same weights: a side-by-side anyone can rerun (`make bench-anchor`).

For each model (the random-weight 0.8B and 2B fixtures: real architecture, real cost), it
1. gets llama.cpp as bench/llama_cpp.py does (llama-cpp-python's PyPI sdist, built with CMake);
2. converts the checkpoint to GGUF (f16) and quantizes it to Q4_0 and Q4_K_M; builds edgekit's
   bundle with the raspberry-pi-5 recipe (int4, block 32, accuracy level 4, int8 KV cache, context 4,096);
3. runs rounds that alternate the two sides (llama.cpp first in even rounds, edgekit first in odd
   ones), at each thread count: prefill of a 128-token prompt, and decode of 64 tokens after 0, 1,024
   and 4,032 tokens of context (llama-bench ``-d``; edgekit: the same prompt prefilled, not timed).

Each side is preceded by a memory-bandwidth probe (``threads`` threads each copying their own 256 MiB;
bytes read plus bytes written per second, best of three). Decode reads every weight once per token, so
a neighbour's memory traffic slows it: a round is *quiet* when both of its probes reach at least
QUIET_SHARE of the best probe of the whole run at the same thread count, else *contended*. Ratios (edgekit / llama.cpp) are
taken per round and summarised apart for quiet and contended rounds: median, min, max.

``--variant int4_layout=true`` adds edgekit on its x86 Int4Layout op (the x86-64 profile's setting).

Beside tok/s it reports the weight bytes each side reads per decoded token (edgekit: the MatMulNBits
weights, scales and, at accuracy level 4, the fp32 block sums ONNX Runtime adds when it repacks them,
or the Int4Layout op's 0.5625 byte per weight;
llama.cpp: every tensor of the GGUF, the token embedding only where it is also the LM head) and the
share of that side's probed bandwidth this traffic reaches at its measured decode speed.

Writes OUT/anchor.json and OUT/anchor.md. Nothing of llama.cpp is kept in the repository.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from llama_cpp import SDIST, LlamaCpp, ensure  # noqa: E402

from edgekit.bench import depth_run, direct_run  # noqa: E402
from edgekit.builder.pipeline import BuildRequest, build  # noqa: E402
from edgekit.profiles import Quality, load_profile  # noqa: E402
from edgekit.runtime.engine import Engine  # noqa: E402
from edgekit.runtime.machine import commit, cpu  # noqa: E402

PROMPT, NEW = 128, 64
DEPTHS = (0, 1024, 4032)
QUIET_SHARE = 0.9
PROBE_BYTES = 256 * 2**20
LLAMA_KINDS = ("Q4_0", "Q4_K_M")
PROFILE = "raspberry-pi-5"
# Random weights: the build's quality gate has nothing to say about them (docs/quality.md).
RANDOM_WEIGHTS = Quality(min_top1_agreement=0.0, max_mean_kl=10.0)


def probe_bandwidth(threads: int, repeats: int = 3) -> float:
    """Memory bandwidth in GB/s: ``threads`` threads each copy their own buffer (numpy releases the GIL)."""
    sources = [np.ones(PROBE_BYTES // 8) for _ in range(threads)]
    targets = [np.empty_like(s) for s in sources]
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.copyto, args=(t, s)) for t, s in zip(targets, sources)]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, 2 * PROBE_BYTES * threads / (time.perf_counter() - started) / 1e9)
    return best


def edgekit_side(bundle: Path, threads: int) -> dict[str, float]:
    """edgekit's engine: prefill tok/s at PROMPT, decode tok/s after each of DEPTHS."""
    engine = Engine(bundle, threads=threads)
    direct_run(engine, 16, 4)  # warm-up: first-run allocations are not what a serving daemon pays
    figures = {"prefill": direct_run(engine, PROMPT, 2)["prefill_tps"]}
    for depth in DEPTHS:
        figures[f"decode@{depth}"] = depth_run(engine, depth, NEW)
    return figures


def llama_side(llama: LlamaCpp, gguf: Path, threads: int) -> dict[str, float]:
    """llama-bench on ``gguf``: pp PROMPT, and tg NEW after each of DEPTHS (one repetition each)."""
    common = [str(llama.tool("llama-bench")), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
    runs = [subprocess.run([*common, "-p", str(PROMPT), "-n", "0"], check=True, capture_output=True, text=True),
            subprocess.run([*common, "-p", "0", "-n", str(NEW), "-d", ",".join(map(str, DEPTHS))], check=True,
                           capture_output=True, text=True)]
    figures = {}
    for done in runs:
        for row in json.loads(done.stdout):
            key = "prefill" if row["n_prompt"] else f"decode@{row['n_depth']}"
            figures[key] = row["avg_ts"]
    return figures


def edgekit_bytes_per_token(bundle: Path) -> int:
    """Weight bytes the bundle's graph reads per decoded token (see the module notes)."""
    import onnx

    from edgekit.kernels import int4_layout
    from edgekit.runtime.embedding import embeds_graph

    # The graph the engine runs here: an x86-64 bundle's Int4Layout graph where the op can run.
    layout = int4_layout.layout_graph(embeds_graph(bundle / "model.onnx"))
    graph = layout if layout.is_file() and int4_layout.unavailable() is None else bundle / "model.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    sizes = {t.name: _tensor_bytes(t) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == int4_layout.OP:
            total += sizes[node.input[1]]  # nibbles and fp16 scales, read where the file is mapped
        if node.op_type != "MatMulNBits":
            continue
        total += sum(sizes.get(name, 0) for name in node.input[1:])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("accuracy_level") == 4:
            total += 4 * attrs["N"] * (attrs["K"] // attrs["block_size"])  # the repacked fp32 block sums
    return total


def _tensor_bytes(tensor: Any) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(tensor.raw_data)


def gguf_bytes_per_token(llama: LlamaCpp, gguf: Path) -> int:
    """Weight bytes llama.cpp reads per decoded token: every tensor, but the token embedding only
    where a separate output tensor exists (with tied embeddings it is the LM head, read in full)."""
    sys.path.insert(0, str(llama.source / "gguf-py"))
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def parse_variant(text: str) -> dict[str, Any]:
    """``--variant``: quantization fields over the profile's, e.g. ``lm_head_block_size=128,block_size=64``."""
    fields: dict[str, Any] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if not value:
            raise click.BadParameter(f"expected FIELD=VALUE[,FIELD=VALUE] (got {text!r})", param_hint="--variant")
        value = value.strip()
        fields[key.strip()] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
    return fields


def prepare(model: Path, work: Path, llama: LlamaCpp, variants: tuple[str, ...], progress: Any) -> dict[str, Path]:
    """Every side's files for ``model`` (kept in ``work`` for reruns): edgekit's bundle of the profile's
    recipe and of each variant, and llama.cpp's quantized GGUFs. Keys are the sides' names."""
    work.mkdir(parents=True, exist_ok=True)
    profile = load_profile(PROFILE)
    files: dict[str, Path] = {}
    for variant in ("", *variants):
        side = f"edgekit {variant}".strip()
        bundle = work / ("edgekit-" + PROFILE + (f"-{variant.replace('=', '').replace(',', '-')}" if variant else ""))
        if not (bundle / "manifest.json").is_file():
            progress(f"building {side} from {model}")
            recipe = dataclasses.replace(profile, quantization=dataclasses.replace(profile.quantization, **parse_variant(variant))) \
                if variant else profile
            # Text only: the vision encoder takes no part in these figures, and its export and
            # parity would double each build's time.
            build(BuildRequest(profile=recipe, model=str(model), output=work, name=bundle.name, quality=RANDOM_WEIGHTS,
                               text_only=True))
        files[side] = bundle
    f16 = work / "model-f16.gguf"
    if not f16.is_file():
        progress(f"converting {model} to GGUF (f16)")
        subprocess.run([*llama.convert, str(model), "--outtype", "f16", "--outfile", str(f16)], check=True,
                       capture_output=True, env=llama.convert_env())
    for kind in LLAMA_KINDS:
        quantized = work / f"model-{kind}.gguf"
        if not quantized.is_file():
            progress(f"llama-quantize {kind}")
            subprocess.run([str(llama.tool("llama-quantize")), str(f16), str(quantized), kind], check=True,
                           capture_output=True)
        files[kind] = quantized
    return files


def run_rounds(files: dict[str, Path], llama: LlamaCpp, rounds: int, thread_counts: tuple[int, ...],
               progress: Any, done: Any = None) -> list[dict[str, Any]]:
    """Alternating rounds; each entry is one round at one thread count: every side's figures
    (``figures``) and each tool's bandwidth probe, taken just before that tool's runs. ``done`` is
    called with the entries so far after each one (to keep them if the run is cut short)."""
    results = []
    ours = [side for side in files if side.startswith("edgekit")]
    for index in range(rounds):
        for threads in thread_counts:
            tools = ["llama.cpp", "edgekit"] if index % 2 == 0 else ["edgekit", "llama.cpp"]
            entry: dict[str, Any] = {"round": index + 1, "threads": threads, "order": tools, "figures": {}}
            for tool in tools:
                progress(f"round {index + 1}/{rounds}, {threads} thread(s): {tool}")
                entry[f"{tool}_probe_gbs"] = probe_bandwidth(threads)
                for side in ours if tool == "edgekit" else LLAMA_KINDS:
                    measure = edgekit_side(files[side], threads) if tool == "edgekit" else llama_side(llama, files[side], threads)
                    entry["figures"][side] = measure
            results.append(entry)
            if done is not None:
                done(results)
    return results


def _tool(side: str) -> str:
    return "edgekit" if side.startswith("edgekit") else "llama.cpp"


def summarise(rounds: list[dict[str, Any]], bytes_per_token: dict[str, int]) -> dict[str, Any]:
    """Per thread count and spell (quiet, contended): medians of each side's figures and of the
    per-round ratios of each edgekit side to Q4_0, with min and max; bandwidth shares at decode depth 0."""
    # One thread moves less memory than two: each thread count is judged against its own best probe.
    best = {threads: max(max(r["edgekit_probe_gbs"], r["llama.cpp_probe_gbs"]) for r in rounds if r["threads"] == threads)
            for threads in {r["threads"] for r in rounds}}
    for r in rounds:
        quiet = min(r["edgekit_probe_gbs"], r["llama.cpp_probe_gbs"]) >= QUIET_SHARE * best[r["threads"]]
        r["spell"] = "quiet" if quiet else "contended"
    summary: dict[str, Any] = {"best_probe_gbs": {str(t): gbs for t, gbs in sorted(best.items())}}
    sides = list(rounds[0]["figures"])
    for threads in sorted({r["threads"] for r in rounds}):
        for spell in ("quiet", "contended"):
            group = [r for r in rounds if r["threads"] == threads and r["spell"] == spell]
            if not group:
                continue
            figures: dict[str, Any] = {"rounds": len(group)}
            for key in group[0]["figures"]["edgekit"]:
                row: dict[str, Any] = {side: statistics.median(r["figures"][side][key] for r in group) for side in sides}
                for side in sides:
                    if _tool(side) == "edgekit":
                        ratios = [r["figures"][side][key] / r["figures"]["Q4_0"][key] for r in group]
                        row[f"{side} / Q4_0"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
                figures[key] = row
            figures["bandwidth_share_decode@0"] = {
                side: statistics.median(bytes_per_token[side] * r["figures"][side]["decode@0"]
                                        / (r[f"{_tool(side)}_probe_gbs"] * 1e9) for r in group) for side in sides}
            summary[f"{threads} threads, {spell}"] = figures
    return summary


def markdown(model_name: str, result: dict[str, Any]) -> str:
    """One table per thread count and spell: each figure, each side's median, the ratios' spread."""
    mib = {side: b / 2**20 for side, b in result["bytes_per_token"].items()}
    sides = list(mib)
    ours = [side for side in sides if _tool(side) == "edgekit"]
    lines = [f"### {model_name}", "",
             "Weight bytes read per decoded token: " + ", ".join(f"{side} {v:.1f} MiB" for side, v in mib.items()) + ".", ""]
    for label, figures in result["summary"].items():
        if label == "best_probe_gbs":
            continue
        lines += [f"**{label}** ({figures['rounds']} rounds; share of the probe's bandwidth at decode depth 0: "
                  + ", ".join(f"{s} {v:.0%}" for s, v in figures["bandwidth_share_decode@0"].items()) + ")", "",
                  "| figure (tok/s) | " + " | ".join(sides) + " | " + " | ".join(f"{s} / Q4_0 (median, min-max)" for s in ours) + " |",
                  "|---|" + "---|" * (len(sides) + len(ours))]
        for key, row in figures.items():
            if key in ("rounds", "bandwidth_share_decode@0"):
                continue
            name = "prefill 128" if key == "prefill" else f"decode 64 after {key.split('@')[1]}"
            ratios = [row[f"{s} / Q4_0"] for s in ours]
            lines.append(f"| {name} | " + " | ".join(f"{row[s]:.1f}" for s in sides) + " | "
                         + " | ".join(f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})" for r in ratios) + " |")
        lines.append("")
    return "\n".join(lines)


@click.command()
@click.option("--model", "models", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=[Path("fixtures/qwen3.5-0.8b"), Path("fixtures/qwen3.5-2b")], show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("anchor-results"), show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=4, show_default=True)
@click.option("--threads", "thread_counts", type=click.IntRange(1), multiple=True, default=[1, 2], show_default=True)
@click.option("--variant", "variants", multiple=True, metavar="FIELD=VALUE[,...]",
              help="Also measure edgekit with these quantization fields over the profile's (e.g. lm_head_block_size=128).")
@click.option("--render-only", is_flag=True, help="Summarise OUT/anchor.json's rounds again and rewrite OUT/anchor.md.")
def main(models: tuple[Path, ...], out: Path, rounds: int, thread_counts: tuple[int, ...], variants: tuple[str, ...],
         render_only: bool) -> None:
    """Run the side-by-side for each MODEL; write OUT/anchor.json and OUT/anchor.md (an hour or more)."""
    import onnxruntime

    if render_only:
        report = json.loads((out / "anchor.json").read_text())
        for result in report["models"].values():
            result["summary"] = summarise(result["rounds"], result["bytes_per_token"])
        (out / "anchor.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "anchor.md").write_text(render(report))
        click.echo(render(report))
        return

    llama = ensure(progress=click.echo)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.date.today().isoformat(), "cpu": cpu()["model"], "machine": platform.machine(),
            "edgekit_commit": (commit() or "?")[:12], "onnxruntime": onnxruntime.__version__,
            "llama_cpp": f"as vendored in {SDIST}'s sdist",
            "prompt": PROMPT, "new": NEW, "depths": DEPTHS, "profile": PROFILE, "quiet_share": QUIET_SHARE,
            "variants": variants}
    report: dict[str, Any] = {"meta": meta, "models": {}}
    for model in models:
        files = prepare(model, out / "work" / model.name, llama, variants, click.echo)
        bytes_per_token = {side: edgekit_bytes_per_token(path) if _tool(side) == "edgekit" else gguf_bytes_per_token(llama, path)
                           for side, path in files.items()}

        def keep(measured: list[dict[str, Any]], name: str = model.name, sizes: dict[str, int] = bytes_per_token) -> None:
            # Written after every round: an interrupted run keeps what it measured (--render-only).
            report["models"][name] = {"bytes_per_token": sizes, "rounds": measured, "summary": summarise(measured, sizes)}
            (out / "anchor.json").write_text(json.dumps(report, indent=2) + "\n")

        run_rounds(files, llama, rounds, thread_counts, click.echo, keep)
    (out / "anchor.md").write_text(render(report))
    click.echo(render(report))


def render(report: dict[str, Any]) -> str:
    """The markdown of a whole run (``--render-only`` redoes it from anchor.json)."""
    meta = report["meta"]
    best = "; ".join(f"{name}: " + ", ".join(f"{gbs:.1f} GB/s at {t} thread(s)" for t, gbs in r["summary"]["best_probe_gbs"].items())
                     for name, r in report["models"].items())
    header = (f"Measured {meta['date']} on {meta['cpu']} ({meta['machine']}), edgekit {meta['edgekit_commit']}, "
              f"ONNX Runtime {meta['onnxruntime']}, llama.cpp {meta['llama_cpp']}; edgekit's {meta['profile']} recipe (int4, "
              f"block 32, accuracy level 4, int8 KV cache); prompt {meta['prompt']}, {meta['new']} new tokens; a round is "
              f"quiet when both of its bandwidth probes reach {meta['quiet_share']:.0%} of the best at its thread count "
              f"({best}).\n\n")
    return header + "\n".join(markdown(name, result) for name, result in report["models"].items())


if __name__ == "__main__":
    main()
