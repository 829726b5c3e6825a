"""edgekit's MTP drafting beside llama.cpp's ``--spec-type draft-mtp`` on the same checkpoint.

For each prompt, both sides generate greedily with one-token drafts from the checkpoint's MTP head and
report how many drafts the main model accepted, and decode tok/s with and without drafting:
edgekit's engine on an ``--include-mtp`` bundle of the raspberry-pi-5 recipe (int4, block 32),
llama.cpp's ``llama-speculative-simple`` (drafting) and ``llama-bench`` (plain) on the checkpoint
converted to GGUF with its MTP tensors and quantized to Q4_0 (llama.cpp from llama-cpp-python's sdist,
as bench/llama_cpp.py builds it). Same prompts, 2 threads, ``--spec-draft-n-max 1``.

The default checkpoint is the trained fixture, whose MTP head was trained: random weights would
give both sides an acceptance of zero. Its small size makes per-step overheads dominate speed, so
the decode tok/s printed beside acceptance compare the two loops' overheads, not what a 0.8B gains
(docs/benchmarks.md has that). Prints JSON per prompt and the totals.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from llama_cpp import LlamaCpp, ensure  # noqa: E402

from edgekit.builder.pipeline import BuildRequest, build  # noqa: E402
from edgekit.profiles import Quality, load_profile  # noqa: E402
from edgekit.runtime.engine import Engine, GenerationStats  # noqa: E402
from edgekit.runtime.tokenizer import ChatTokenizer  # noqa: E402

PROMPTS = ("The history of the city begins", "In mathematics, a prime number is", "Once upon a time",
           "The river", "Scientists have found that")
NEW = 48
OPEN = Quality(min_top1_agreement=0.0, max_mean_kl=10.0)


def llama_side(llama: LlamaCpp, gguf: Path, prompt: str, threads: int) -> dict[str, Any]:
    """One greedy generation of ``llama-speculative-simple`` with MTP drafts: drafted, accepted, decode tok/s."""
    run = subprocess.run([str(llama.tool("llama-speculative-simple")), "-m", str(gguf), "--spec-type", "draft-mtp",
                          "--spec-draft-n-max", "1", "-p", prompt, "-n", str(NEW), "--temp", "0", "-t", str(threads),
                          "-c", "1024",
                          # Q4_0's repacked (AMX) path segfaults on this 256-wide model on an AMX Xeon
                          # (llama-bench too, 2026-12-05); unpacked weights give the same tokens.
                          "--no-repack"], capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise click.ClickException(f"llama-speculative-simple failed (exit {run.returncode}): {log[-800:]}")
    figures = {name: int(m.group(1)) for name in ("n_drafted", "n_accept")
               if (m := re.search(rf"{name}\s*=\s*(\d+)", log))}
    speed = re.search(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", log)
    return {**figures, "decode_tps": float(speed.group(1)) if speed else None}


def llama_plain_tps(llama: LlamaCpp, gguf: Path, threads: int) -> float:
    """llama.cpp's decode tok/s without drafting: ``llama-bench`` generating NEW tokens (median of 3)."""
    run = subprocess.run([str(llama.tool("llama-bench")), "-m", str(gguf), "-p", "0", "-n", str(NEW), "-t", str(threads),
                          "-r", "3", "--repack", "0", "-o", "json"], capture_output=True, text=True, check=True)
    return float(json.loads(run.stdout)[0]["avg_ts"])


def edgekit_side(engine: Engine, tokenizer: ChatTokenizer, prompt: str) -> dict[str, Any]:
    """One drafted and one plain greedy generation: drafted, accepted, decode tok/s of each."""
    ids = tokenizer.encode(prompt)
    plain, stats = GenerationStats(), GenerationStats()
    list(engine.generate(ids, NEW, stats=plain, speculative=False))
    list(engine.generate(ids, NEW, stats=stats))
    return {"n_drafted": stats.draft_steps, "n_accept": stats.drafts_accepted, "decode_tps": stats.decode_tps,
            "plain_decode_tps": plain.decode_tps}


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("fixtures/qwen3.5-trained"),
              show_default=True)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("mtp-results/llama"), show_default=True)
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
def main(model: Path, work: Path, threads: int) -> None:
    """Acceptance of one-token MTP drafts, edgekit against llama.cpp, on MODEL."""
    work.mkdir(parents=True, exist_ok=True)
    llama = ensure(progress=lambda m: click.echo(m, err=True))
    bundle = work / "edgekit-mtp"
    if not (bundle / "manifest.json").is_file():
        build(BuildRequest(profile=load_profile("raspberry-pi-5"), model=str(model), output=work, name=bundle.name,
                           include_mtp=True, quality=OPEN))
    f16, q4 = work / "model-f16.gguf", work / "model-Q4_0.gguf"
    if not f16.is_file():
        subprocess.run([*llama.convert, str(model), "--outtype", "f16", "--outfile", str(f16)], check=True,
                       capture_output=True, env=llama.convert_env())
    if not q4.is_file():
        subprocess.run([str(llama.tool("llama-quantize")), str(f16), str(q4), "Q4_0"], check=True, capture_output=True)
    engine = Engine(bundle, threads=threads)
    tokenizer = ChatTokenizer(bundle)
    rows = []
    for prompt in PROMPTS:
        rows.append({"prompt": prompt, "edgekit": edgekit_side(engine, tokenizer, prompt),
                     "llama.cpp Q4_0": llama_side(llama, q4, prompt, threads)})
    totals = {}
    for side in ("edgekit", "llama.cpp Q4_0"):
        drafted = sum(r[side].get("n_drafted", 0) for r in rows)
        accepted = sum(r[side].get("n_accept", 0) for r in rows)
        totals[side] = {"drafted": drafted, "accepted": accepted, "acceptance": accepted / drafted if drafted else None}
    totals["llama.cpp Q4_0"]["plain_decode_tps"] = llama_plain_tps(llama, q4, threads)
    click.echo(json.dumps({"threads": threads, "new_tokens": NEW, "prompts": rows, "totals": totals}, indent=2))


if __name__ == "__main__":
    main()
