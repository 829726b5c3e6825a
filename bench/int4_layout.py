"""edgekit's Int4Layout op (0.5625 byte per weight) against ONNX Runtime's MatMulNBits on x86, measured.

On x86, ONNX Runtime (MLAS) packs MatMulNBits' block-32 int4 weights for its int8 kernels at 0.75 byte
per weight: an fp32 scale and an fp32 block sum beside every 32 weights, in anonymous memory. The
``edgekit.int4`` Int4Layout op (``edgekit/kernels/``) reads 0.5625 byte per weight where the weights
file is mapped; x86-64 bundles carry their graphs on both (docs/platform-facts.md). Two measurements,
each side in its own process, alternating which goes first, ``--rounds`` times, medians and the ratio
of every round:

- ``--size 0.8b|2b``: one pass over every int4 matmul of a decode step (1 row), a two-token verify
  step (2) and a 64-token prefill chunk (64), as one ONNX Runtime session of MatMulNBits nodes (block
  32, accuracy level 4, as the profiles build them) against the same weights as Int4Layout nodes.
  Weights are random nibbles with scales exact in fp16 (both sides compute with the same numbers); the
  op's outputs are checked against MatMulNBits on three matrices first.
- ``--bundle PATH``: edgekit's engine on an x86-64 bundle (``edgekit build --profile x86-64``), once on
  its Int4Layout graph and once on its MatMulNBits graph (``EDGEKIT_INT4_KERNEL=off``): prefill and
  decode tok/s over ``--runs`` generations of 128/64 tokens, resident memory after loading, after the
  runs and at its peak, and the device quality check against the build's fp32 reference (meaningful on
  a trained fixture's bundle).

``--kernel avx2`` times the op's AVX2 kernel on a CPU that also has AVX-512 VNNI.

    python bench/int4_layout.py --size 0.8b --rounds 3 --threads 2
    python bench/int4_layout.py --bundle dist/x86-08 --rounds 3 --runs 4
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.kernels.int4_layout import DOMAIN, KERNEL_ENV, OP, register

ROWS = (1, 2, 64)
# MLAS's x86 int8-compute packing per weight (measured: docs/arm64.md, one LM-head-shaped node); the
# layout's is the builder's BLOCK_BYTES per 16 x 32 weights.
MLAS_BYTES_PER_WEIGHT = 0.75
BLOCK = 32


def shapes(size: str) -> list[tuple[int, int]]:
    """(N, K) of every int4 matmul one token runs through, from the fixture's dimensions."""
    # Here, not at the top: the fixtures import torch, which the engine's side must not carry.
    from edgekit.fixtures.checkpoint import SIZES, VOCAB_SIZE

    d = SIZES[size]
    linear = 3 * d.linear_heads * d.linear_head_dim
    mlp = [(d.intermediate, d.hidden), (d.intermediate, d.hidden), (d.hidden, d.intermediate)]
    linear_layer = [(linear, d.hidden), (d.linear_heads * d.linear_head_dim, d.hidden),
                    (d.hidden, d.linear_heads * d.linear_head_dim), *mlp]
    full_layer = [(2 * d.heads * d.head_dim, d.hidden), (d.kv_heads * d.head_dim, d.hidden),
                  (d.kv_heads * d.head_dim, d.hidden), (d.hidden, d.heads * d.head_dim), *mlp]
    out: list[tuple[int, int]] = []
    for layer in range(d.layers):
        out += full_layer if (layer + 1) % 4 == 0 else linear_layer
    return [*out, (VOCAB_SIZE, d.hidden)]


def weights(size: str) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Seeded random MatMulNBits weights: ([N, K/32, 16] nibbles with zero point 8, [N, K/32] scales)."""
    rng = np.random.default_rng(0)
    out = []
    for n, k in shapes(size):
        packed = rng.integers(0, 256, size=(n, k // BLOCK, BLOCK // 2), dtype=np.uint8)
        scales = rng.uniform(0.002, 0.02, size=(n, k // BLOCK)).astype(np.float16).astype(np.float32)
        out.append((n, k, packed, scales))
    return out


def matmul_node(kind: str, i: int, n: int, k: int, packed: np.ndarray, scales: np.ndarray) -> tuple[Any, list[Any]]:
    """Matmul ``i`` of input ``a{k}`` as ``kind`` (``mlas``: MatMulNBits; ``layout``: Int4Layout), with its weights."""
    from onnx import helper, numpy_helper

    if kind == "mlas":
        node = helper.make_node("MatMulNBits", [f"a{k}", f"b{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=4)
        return node, [numpy_helper.from_array(packed, f"b{i}"), numpy_helper.from_array(scales.reshape(-1), f"s{i}")]
    from onnx import helper, numpy_helper

    from edgekit.builder.int4_layout import repack

    node = helper.make_node(OP, [f"a{k}", f"l{i}"], [f"y{i}"], domain=DOMAIN, N=n, K=k)
    return node, [numpy_helper.from_array(repack(packed, scales), f"l{i}")]


def session(mats: list[tuple[int, int, np.ndarray, np.ndarray]], kind: str, threads: int) -> Any:
    """One ONNX Runtime session holding every matmul of ``mats`` as ``kind``, fed by one input per K."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs: dict[int, Any] = {}
    nodes: list[Any] = []
    initializers: list[Any] = []
    outputs: list[Any] = []
    for i, (n, k, packed, scales) in enumerate(mats):
        inputs.setdefault(k, helper.make_tensor_value_info(f"a{k}", TensorProto.FLOAT, ["m", k]))
        node, weights_of_node = matmul_node(kind, i, n, k, packed, scales)
        nodes.append(node)
        initializers += weights_of_node
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", n]))
    graph = helper.make_graph(nodes, "int4", list(inputs.values()), outputs, initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid(DOMAIN, 1)]
    return ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(), options(threads, kind == "layout"))


def options(threads: int, layout: bool) -> Any:
    """edgekit's own session settings (the engine's), with the op's library registered for ``layout``."""
    from edgekit.runtime.resident import session_options

    settings = session_options(threads)
    if layout:
        register(settings)
    return settings


def median_ms(run: Callable[[], object], reps: int) -> float:
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def pass_side(kind: str, size: str, threads: int) -> dict[str, Any]:
    """One process's passes over every matmul of ``size``: milliseconds per pass for each row count."""
    mats = weights(size)
    rng = np.random.default_rng(1)
    activations = {m: {k: rng.standard_normal((m, k), dtype=np.float32) for k in {k for _, k, _, _ in mats}} for m in ROWS}
    count = sum(n * k for n, k, _, _ in mats)
    from edgekit.builder.int4_layout import BLOCK_BYTES, GROUP

    per_weight = BLOCK_BYTES / (GROUP * BLOCK) if kind == "layout" else MLAS_BYTES_PER_WEIGHT
    result: dict[str, Any] = {"weights": count, "weight_mib": count * per_weight / 2**20}
    if kind == "layout":
        # Against MatMulNBits on three matrices first: the same weights give the same outputs.
        first, a = mats[:3], activations[ROWS[-1]]
        feed = {f"a{k}": a[k] for k in {k for _, k, _, _ in first}}
        expected = session(first, "mlas", threads).run(None, feed)
        found = session(first, "layout", threads).run(None, feed)
        result["max_rel_diff_vs_mlas"] = max(float(np.abs(f - e).max() / np.abs(e).max()) for f, e in zip(found, expected))
    timed = session(mats, kind, threads)
    del mats
    for m in ROWS:
        feed = {f"a{k}": x for k, x in activations[m].items()}
        result[str(m)] = median_ms(functools.partial(timed.run, None, feed), 5 if m > 2 else 15)
    return result


def bundle_side(kind: str, bundle: Path, threads: int, runs: int) -> dict[str, Any]:
    """edgekit's engine on ``bundle`` (its Int4Layout graph for ``layout``, its MatMulNBits graph for
    ``mlas``: :func:`side_env` says which): tok/s medians over ``runs`` 128/64 generations, resident
    memory, and the device quality check against the build's reference."""
    import psutil

    import edgekit.runtime.engine as engine_module
    from edgekit.bench import direct_run
    from edgekit.profiles import Quality
    from edgekit.runtime import quality_check
    from edgekit.runtime.resident import trim_heap

    process = psutil.Process()
    engine = engine_module.Engine(bundle, threads=threads)
    if (engine.int4_kernel is None) != (kind == "mlas"):
        sys.exit(f"{bundle}: no Int4Layout graph to run ({engine.int4_fallback or 'build it with --profile x86-64'})")
    trim_heap()
    loaded = process.memory_info().rss / 2**20
    figures = [direct_run(engine, 128, 64) for _ in range(runs + 1)][1:]  # the first warms up
    trim_heap()
    result = {"prefill_tps": statistics.median(f["prefill_tps"] for f in figures),
              "decode_tps": statistics.median(f["decode_tps"] for f in figures),
              "rss_loaded_mib": loaded, "rss_after_runs_mib": process.memory_info().rss / 2**20,
              "peak_rss_mib": int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024}
    reference = quality_check.Reference.read(bundle)
    if reference is not None:
        check = quality_check.run(engine, reference, Quality(min_top1_agreement=0.0, max_mean_kl=float("inf")))
        result["quality"] = {"positions": check.positions, "top1_agreement": check.top1_agreement, "mean_kl": check.mean_kl}
    return {**result, "int4_layout": engine.int4_kernel}


def side_env(kind: str, kernel: str) -> dict[str, str]:
    """The environment of one side's process: the op off for ``mlas``, its AVX2 kernel if asked."""
    env = {k: v for k, v in os.environ.items() if k != KERNEL_ENV}
    if kind == "mlas":
        env[KERNEL_ENV] = "off"
    elif kernel == "avx2":
        env[KERNEL_ENV] = "avx2"
    return env


def rounds_of(args: argparse.Namespace, extra: Callable[[str], list[str]]) -> list[dict[str, Any]]:
    """``args.rounds`` rounds, each running both sides in their own processes (``extra(kind)``: the
    side's own arguments), alternating which goes first."""
    rounds = []
    for r in range(args.rounds):
        found = {}
        for kind in ("mlas", "layout") if r % 2 == 0 else ("layout", "mlas"):
            run = subprocess.run([sys.executable, __file__, "--side", kind, "--threads", str(args.threads),
                                  *extra(kind)], check=True, capture_output=True, text=True, env=side_env(kind, args.kernel))
            found[kind] = json.loads(run.stdout.strip().splitlines()[-1])
        rounds.append(found)
        print(f"round {r + 1}: {json.dumps(found)}", file=sys.stderr, flush=True)
    return rounds


def medians(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Both sides' median of ``key``, and per round how many times better the layout does: MLAS / layout
    for times and memory, layout / MLAS for rates (tok/s)."""
    rate = key.endswith("tps")
    return {"mlas": statistics.median(r["mlas"][key] for r in rounds),
            "layout": statistics.median(r["layout"][key] for r in rounds),
            "layout_gain_per_round": [round((r["layout"][key] / r["mlas"][key]) if rate else (r["mlas"][key] / r["layout"][key]), 3)
                                         for r in rounds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("0.8b", "2b"), default="0.8b", help="matmul passes over this fixture's shapes")
    parser.add_argument("--bundle", type=Path, help="instead: edgekit's engine on this x86-64 bundle's two graphs")
    parser.add_argument("--runs", type=int, default=4, help="generations per side and round (--bundle)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=("mlas", "layout"), help=argparse.SUPPRESS)
    parser.add_argument("--kernel", choices=("default", "avx2"), default="default", help="the op's kernel: this CPU's best, or AVX2")
    args = parser.parse_args()
    if args.side and args.bundle:
        print(json.dumps(bundle_side(args.side, args.bundle, args.threads, args.runs)))
        return
    if args.side:
        print(json.dumps(pass_side(args.side, args.size, args.threads)))
        return
    if args.bundle:
        rounds = rounds_of(args, lambda kind: ["--bundle", str(args.bundle), "--runs", str(args.runs)])
        keys = ("prefill_tps", "decode_tps", "rss_loaded_mib", "rss_after_runs_mib", "peak_rss_mib")
        layout_nodes = json.loads((args.bundle / "manifest.json").read_text())["recipe"].get("int4_layout_nodes", 0)
        report = {"bundle": str(args.bundle), "int4_layout_nodes": layout_nodes, "kernel": rounds[0]["layout"]["int4_layout"],
                  "threads": args.threads, "rounds": args.rounds, **{key: medians(rounds, key) for key in keys},
                  "quality": {kind: rounds[0][kind].get("quality") for kind in ("mlas", "layout")}}
    else:
        rounds = rounds_of(args, lambda kind: ["--size", args.size])
        layout = rounds[0]["layout"]
        report = {"size": args.size, "kernel": args.kernel, "threads": args.threads, "rounds": args.rounds,
                  "weights": layout["weights"], "layout_mib": round(layout["weight_mib"], 1),
                  "mlas_mib": round(rounds[0]["mlas"]["weight_mib"], 1),
                  "max_rel_diff_vs_mlas": layout["max_rel_diff_vs_mlas"],
                  "ms_per_pass": {str(m): medians(rounds, str(m)) for m in ROWS}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
