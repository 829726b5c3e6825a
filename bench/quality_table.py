"""The quality table (docs/quality.md): every recipe the profiles offer, built from the trained
checkpoint, beside llama.cpp's Q4_0, Q4_K_M and Q2_K of the same checkpoint, on the same held-out text.

Both sides follow llama-perplexity's protocol: the held-out text (the trained fixture's held-out
files) is tokenized whole, cut into windows of CTX tokens, and in each window the positions of its
second half are scored (each prediction has at least CTX/2 tokens of context). edgekit's bundles are
fed each window one token at a time after a prefill of the first half (their graphs give
last-position logits only). Against the fp32 reference of the same tool (edgekit's fp32 export;
llama.cpp's f32 GGUF): mean KL(reference || recipe), top-1 agreement, perplexity and its change.

    python bench/quality_table.py --model fixtures/qwen3.5-trained --out quality-results [--windows 16]
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_cpp import SDIST, LlamaCpp, ensure  # noqa: E402

from edgekit.builder.pipeline import BuildRequest, build  # noqa: E402
from edgekit.fixtures.trained import Corpus  # noqa: E402
from edgekit.profiles import Quality, load_profile  # noqa: E402
from edgekit.runtime.agreement import Agreement, log_softmax  # noqa: E402
from edgekit.runtime.engine import Engine  # noqa: E402
from edgekit.runtime.machine import cpu  # noqa: E402
from edgekit.runtime.tokenizer import ChatTokenizer  # noqa: E402

CTX = 256


def _quant(precision: str, block: int, level: int, kv: str, **extra: object) -> dict:
    return {"precision": precision, "block_size": block, "accuracy_level": level, "kv_cache": kv, **extra}


# (row name, quantization fields over the x86-64 profile's); the first is the reference.
RECIPES: list[tuple[str, dict]] = [
    ("fp32 (reference)", {"precision": "fp32", "kv_cache": "fp32"}),
    ("int4 block 32, level 4, int8 KV (raspberry-pi-5, x86-64)", _quant("int4", 32, 4, "int8")),
    ("int4 block 32, level 0, int8 KV (raspberry-pi-4)", _quant("int4", 32, 0, "int8")),
    ("int4 block 32, level 4, fp16 KV", _quant("int4", 32, 4, "fp16")),
    ("int4 block 64, level 4, int8 KV", _quant("int4", 64, 4, "int8")),
    ("int4 block 128, level 4, int8 KV", _quant("int4", 128, 4, "int8")),
    ("int4 k_quant block 32, level 4, int8 KV", _quant("int4", 32, 4, "int8", algorithm="k_quant")),
    ("int4 block 32, LM head block 16, level 4, int8 KV", _quant("int4", 32, 4, "int8", lm_head_block_size=16)),
    # The LM head is the largest weight read per token: larger blocks there trade quality for decode speed.
    ("int4 block 32, LM head block 64, level 4, int8 KV", _quant("int4", 32, 4, "int8", lm_head_block_size=64)),
    ("int4 block 32, LM head block 128, level 4, int8 KV", _quant("int4", 32, 4, "int8", lm_head_block_size=128)),
    ("int8 block 32, level 4, int8 KV", _quant("int8", 32, 4, "int8")),
    # Not one the profiles use: the damage every gate must refuse (beside llama.cpp's Q2_K).
    ("int2 block 32 (LM head int4), level 4, int8 KV", _quant("int2", 32, 4, "int8")),
]
NO_GATE = Quality(min_top1_agreement=0.0, max_mean_kl=1e9)


def held_out_windows(bundle: Path, windows: int) -> list[list[int]]:
    """The held-out files' text, tokenized whole as llama-perplexity does, in windows of CTX tokens."""
    ids = ChatTokenizer(bundle).tokenizer.encode(held_out_text()).ids
    count = min(windows, len(ids) // CTX)
    return [ids[i * CTX:(i + 1) * CTX] for i in range(count)]


def held_out_text() -> str:
    return "\n".join(Corpus.load().held_out.values())


def scored_logits(engine: Engine, window: list[int]) -> np.ndarray:
    """Logits at positions CTX/2 .. CTX-2 of ``window`` (predicting tokens CTX/2+1 .. CTX-1)."""
    first = CTX // 2
    state = engine.new_state()
    rows = [engine.forward(state, window[:first + 1]).copy()]
    for token in window[first + 1:CTX - 1]:
        rows.append(engine.forward(state, [token]).copy())
    return log_softmax(np.stack(rows).astype(np.float64))


def figures(reference: list[np.ndarray], candidate: list[np.ndarray], windows: list[list[int]]) -> dict:
    """KL and top-1 against the reference (``edgekit.runtime.agreement``), and the candidate's perplexity."""
    agreement = Agreement.of(zip(reference, candidate))
    nll = [-row[target] for cand, window in zip(candidate, windows) for row, target in zip(cand, window[CTX // 2 + 1:CTX])]
    return {"mean_kl": agreement.mean_kl, "top1_agreement": agreement.top1, "perplexity": math.exp(float(np.mean(nll))),
            "positions": agreement.positions}


def edgekit_rows(model: Path, work: Path, windows_wanted: int, progress) -> tuple[list[dict], list[list[int]]]:
    base = yaml.safe_load(Path(load_profile("x86-64").path).read_text())
    rows, reference, windows = [], None, None
    for name, fields in RECIPES:
        data = {**base, "name": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]}
        data["quantization"] = {**base["quantization"], **fields}
        profile_file = work / f"{data['name']}.yaml"
        profile_file.write_text(yaml.safe_dump(data))
        progress(f"building {name}")
        result = build(BuildRequest(profile=load_profile(str(profile_file)), model=str(model), output=work / "dist",
                                    quality=NO_GATE, overwrite=True))
        windows = windows or held_out_windows(result.path, windows_wanted)
        engine = Engine(result.path, threads=2)
        progress(f"scoring {name} on {len(windows)} windows of {CTX}")
        logits = [scored_logits(engine, w) for w in windows]
        del engine
        reference = reference or logits
        found = figures(reference, logits, windows)
        rows.append({"recipe": name, "tool": "edgekit", "size_mib": result.manifest.size_bytes / 2**20, **found})
    assert windows is not None
    return rows, windows


def llama_rows(model: Path, work: Path, windows: int, llama: LlamaCpp, progress) -> list[dict]:
    text = work / "held-out.txt"
    text.write_text(held_out_text())
    base = work / "model-f32.gguf"
    progress("converting to GGUF (f32)")
    subprocess.run([*llama.convert, str(model), "--outtype", "f32", "--outfile", str(base)], check=True,
                   capture_output=True, env=llama.convert_env())
    # Unrepacked weights: the repacked (AMX) Q4_0 path segfaults on this 256-wide model on an AMX Xeon
    # (2026-12-05), and quality does not need the repacked kernels' speed.
    common = ["-f", str(text), "-c", str(CTX), "-b", str(CTX), "--chunks", str(windows), "-t", "2", "--no-repack"]
    logits_file = work / "base.kld"
    run = subprocess.run([str(llama.tool("llama-perplexity")), "-m", str(base), *common, "--kl-divergence-base",
                          str(logits_file)], check=True, capture_output=True, text=True)
    base_ppl = _final_ppl(run.stdout + run.stderr)
    rows = [{"recipe": "f32 (reference)", "tool": "llama.cpp", "size_mib": base.stat().st_size / 2**20, "perplexity": base_ppl,
             "mean_kl": 0.0, "top1_agreement": 1.0}]
    for kind in ("Q4_0", "Q4_K_M", "Q2_K"):
        quantized = work / f"model-{kind}.gguf"
        progress(f"llama-quantize {kind}")
        subprocess.run([str(llama.tool("llama-quantize")), str(base), str(quantized), kind], check=True, capture_output=True)
        run = subprocess.run([str(llama.tool("llama-perplexity")), "-m", str(quantized), *common, "--kl-divergence-base",
                              str(logits_file), "--kl-divergence"], check=True, capture_output=True, text=True)
        out = run.stdout + run.stderr
        rows.append({"recipe": kind, "tool": "llama.cpp", "size_mib": quantized.stat().st_size / 2**20,
                     "perplexity": _number(out, r"Mean PPL\(Q\)\s*:\s*([\d.]+)"),
                     "mean_kl": _number(out, r"Mean\s+KLD:\s*([\d.]+)"),
                     "top1_agreement": _number(out, r"Same top p:\s*([\d.]+)") / 100})
    return rows


def _number(text: str, pattern: str) -> float:
    found = re.search(pattern, text)
    if not found:
        raise RuntimeError(f"llama-perplexity's output has no {pattern!r}:\n{text[-3000:]}")
    return float(found.group(1))


def _final_ppl(text: str) -> float:
    return _number(text, r"Final estimate: PPL = ([\d.]+)")


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['cpu']} ({meta['threads']} threads), edgekit {meta['edgekit_commit'] or '?'}, "
             f"ONNX Runtime {meta['onnxruntime']}, llama.cpp {meta['llama_cpp']}; {meta['positions']} scored positions "
             f"({meta['windows']} windows of {CTX}, second halves) of the trained fixture's held-out files.", "",
             "| tool | recipe | size MiB | mean KL vs its fp32 | top-1 vs its fp32 | perplexity | Δ perplexity |",
             "|---|---|---|---|---|---|---|"]
    for tool in ("edgekit", "llama.cpp"):
        group = [r for r in rows if r["tool"] == tool]
        base = group[0]["perplexity"]
        for r in group:
            lines.append(f"| {tool} | {r['recipe']} | {r['size_mib']:.1f} | {r['mean_kl']:.4f} | {r['top1_agreement']:.3f} | "
                         f"{r['perplexity']:.2f} | {100 * (r['perplexity'] / base - 1):+.1f} % |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("fixtures/qwen3.5-trained"))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("quality-results"))
@click.option("--windows", type=click.IntRange(1), default=16, show_default=True, help="Held-out windows of 256 tokens.")
@click.option("--skip-llama-cpp", is_flag=True, help="Only edgekit's recipes (no llama.cpp download or build).")
def main(model: Path, out: Path, windows: int, skip_llama_cpp: bool) -> None:
    """Build every recipe from MODEL, score them and llama.cpp's quants on the held-out text; write
    OUT/quality.json and OUT/quality.md (the table for docs/quality.md)."""
    import onnxruntime

    from edgekit.runtime.machine import commit

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgekit-quality-") as tmp:
        work = Path(tmp)
        rows, used = edgekit_rows(model, work, windows, click.echo)
        (out / "quality.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")  # kept if llama.cpp fails
        llama = None if skip_llama_cpp else ensure(progress=click.echo)
        if llama:
            rows += llama_rows(model, work, len(used), llama, click.echo)
    meta = {"date": dt.date.today().isoformat(), "cpu": cpu()["model"], "machine": platform.machine(), "threads": 2,
            "edgekit_commit": commit(), "onnxruntime": onnxruntime.__version__,
            "llama_cpp": f"as vendored in {SDIST}'s sdist" if llama else "not run",
            "windows": len(used), "positions": rows[0]["positions"]}
    (out / "quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, meta)
    (out / "quality.md").write_text(table)
    click.echo(table)


if __name__ == "__main__":
    main()
