"""Where a decode step's time goes, by ONNX Runtime operator, after D tokens of context.

The speed issue asks which attention path ONNX Runtime takes on the CPU for our shapes, and whether
the full-attention layers still cost what they once did at long context. ONNX Runtime's own profiler
times every node of every run. This script loads a bundle in the engine, swaps its session for a
profiling one of the same graph and settings, and for each DEPTH prefills that many filler tokens
(their runs are left out of the figures), then decodes NEW tokens one step at a time. The decode
steps' node times are summed by operator type (or, with ``--by node``, by node with the layer number
taken out: every layer's up projection is one row): milliseconds per step, share of the nodes' time
and nodes per step.

Prints JSON (and writes it with --out): for each depth, the median step wall time ONNX Runtime saw
and the table by operator (or node).

Example: python bench/op_profile.py dist/qwen3.5-0.8b-raspberry-pi-5-int4 --threads 2 --depths 0,4032
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent.parent))

from edgekit.runtime.engine import Engine  # noqa: E402
from edgekit.runtime.timing import filler_prompt  # noqa: E402


def profiling_session(engine: Engine, folder: Path) -> ort.InferenceSession:
    """A session over the graph ``engine`` runs, with its settings and ONNX Runtime's profiler on."""
    options = engine.session_options
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "ort")
    return ort.InferenceSession(str(engine.graph), options, providers=list(engine.providers))


def run_labels(engine: Engine, depths: tuple[int, ...], new_tokens: int) -> list[str]:
    """Run every depth's prefill and decode steps; the label of each session run, in order."""
    labels: list[str] = []
    phase = ""
    real_run = engine._run

    def counted(*args: Any, **kwargs: Any) -> Any:
        labels.append(phase)
        return real_run(*args, **kwargs)

    engine._run = counted  # type: ignore[method-assign]
    for depth in depths:
        state = engine.new_state()
        phase = "prefill"
        engine.forward(state, filler_prompt(max(depth, 1)))
        phase = f"decode@{depth}"
        for index in range(new_tokens):
            engine.forward(state, [42 + index])
    return labels


def node_class(event: dict[str, Any]) -> str:
    """A node's name with its layer number taken out (``/model/layers.N/mlp/up_proj/MatMul_Q4``):
    the same node of every layer counts as one class."""
    return re.sub(r"layers\.\d+", "layers.N", event["name"].removesuffix("_kernel_time"))


def operator(event: dict[str, Any]) -> str:
    """A node's operator type (``MatMulNBits``)."""
    return str(event["args"]["op_name"])


def summarise(events: list[dict[str, Any]], labels: list[str],
              group: Callable[[dict[str, Any]], str] = operator) -> dict[str, Any]:
    """Per decode depth: median step time and node time by ``group`` (ms per step, share of the
    nodes' time, nodes per step)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) != len(labels):
        raise click.ClickException(f"profiler recorded {len(runs)} runs, the engine made {len(labels)}")
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    result: dict[str, Any] = {}
    for label in dict.fromkeys(labels):
        if not label.startswith("decode"):
            continue
        windows = [(r["ts"], r["ts"] + r["dur"]) for r, name in zip(runs, labels) if name == label]
        by_op: dict[str, float] = defaultdict(float)
        count: dict[str, int] = defaultdict(int)
        for event in nodes:
            if any(start <= event["ts"] <= end for start, end in windows):
                key = group(event)
                by_op[key] += event["dur"]
                count[key] += 1
        steps = len(windows)
        step_us = statistics.median(end - start for start, end in windows)
        total = sum(by_op.values())
        result[label] = {
            "steps": steps, "step_ms": round(step_us / 1000, 3),
            "nodes_ms": round(total / steps / 1000, 3),
            "ops": {op: {"ms_per_step": round(us / steps / 1000, 3), "share": round(us / total, 4),
                         "nodes": count[op] // steps}
                    for op, us in sorted(by_op.items(), key=lambda item: -item[1])},
        }
    return result


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True)
@click.option("--depths", default="0,4032", show_default=True, help="Tokens of context before the decode steps.")
@click.option("--new-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--by", type=click.Choice(["op", "node"]), default="op", show_default=True,
              help="Group node times by operator type, or by node with the layer number taken out.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the JSON here.")
def main(bundle: Path, threads: int, depths: str, new_tokens: int, by: str, out: Path | None) -> None:
    """Time each ONNX Runtime operator of a bundle's decode steps after each depth of context."""
    depth_list = tuple(int(d) for d in depths.split(","))
    engine = Engine(bundle, threads=threads)
    with tempfile.TemporaryDirectory() as folder:
        engine.session = profiling_session(engine, Path(folder))
        labels = run_labels(engine, depth_list, new_tokens)
        events = json.loads(Path(engine.session.end_profiling()).read_text())
    report = {"bundle": str(bundle), "threads": threads, "new_tokens": new_tokens,
              "onnxruntime": ort.__version__, "by": by,
              "depths": summarise(events, labels, operator if by == "op" else node_class)}
    text = json.dumps(report, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()
