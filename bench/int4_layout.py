"""Could a 0.5625-byte int4 layout close the x86 memory gap without costing speed? Measured.

On x86, ONNX Runtime (MLAS) packs MatMulNBits' block-32 int4 weights for its int8 kernels at 0.75 byte
per weight: an fp32 scale and an fp32 block sum beside every 32 weights. That is what keeps the 0.8B
daemon above the 800 MB target on x86 with MTP or a grammar index resident (docs/benchmarks.md), where
the Pi 5's KleidiAI layout stays under it. ``bench/int4_layout.c`` is an ONNX Runtime custom op
(``edgekit.int4`` Int4Layout) with an AVX-512 VNNI kernel on a 0.5625-byte layout: 4-bit data and an
fp16 scale per block, the block sum computed on the fly, columns interleaved in groups of 16 as
llama.cpp repacks Q4_0, threads from ONNX Runtime's own pool. Two measurements, each side in its own
process, alternating which goes first, ``--rounds`` times, medians and the ratio of every round:

- ``--size 0.8b|2b``: one pass over every int4 matmul of a decode step (1 row), a two-token verify
  step (2) and a 64-token prefill chunk (64), as one ONNX Runtime session of MatMulNBits nodes (block
  32, accuracy level 4, as the profiles build them) against the same weights as Int4Layout nodes.
  Weights are random nibbles with scales exact in fp16 (both sides compute with the same numbers); the
  op's outputs are checked against MatMulNBits on three matrices first.
- ``--bundle PATH``: edgekit's engine on a built bundle and on a copy whose block-32 MatMulNBits nodes
  are Int4Layout nodes (weights repacked into ``model.int4.data``): prefill and decode tok/s over
  ``--runs`` generations of 128/64 tokens, resident memory after loading, after the runs and at its
  peak, and the device quality check against the build's fp32 reference (meaningful on a trained
  fixture's bundle). The copy's manifest no longer matches its files; it lives in a temporary folder.

Needs gcc and a CPU with AVX-512 VNNI. Not part of edgekit's runtime (docs/benchmarks.md, session 18).

    python bench/int4_layout.py --size 0.8b --rounds 3 --threads 2
    python bench/int4_layout.py --bundle dist/plain-08 --rounds 3 --runs 4
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SOURCE = Path(__file__).with_suffix(".c")
DOMAIN = "edgekit.int4"
BLOCK = 32
ROWS = (1, 2, 64)
# MLAS's x86 int8-compute packing per weight (measured: docs/arm64.md, one LM-head-shaped node), and
# the layout's: 16 bytes of nibbles and a 2-byte scale per 32 weights.
MLAS_BYTES_PER_WEIGHT = 0.75
LAYOUT_BYTES_PER_WEIGHT = 18 / 32


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


def repack(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MatMulNBits' [N, K/32, 16] bytes (element 2j in byte j's low nibble) into the kernel's layout."""
    n, blocks, _ = packed.shape
    groups = n // 16
    q = np.empty((n, blocks, BLOCK), np.uint8)
    q[..., 0::2], q[..., 1::2] = packed & 15, packed >> 4
    q = q.reshape(groups, 16, blocks, 4, 2, 4)  # group, column, block, word, half, byte: weight 8*word + 4*half + byte
    words = (q[:, :, :, :, 0, :] | (q[:, :, :, :, 1, :] << 4)).transpose(0, 2, 3, 1, 4).reshape(groups, blocks, 256)
    fp16 = scales.astype(np.float16).reshape(groups, 16, blocks).transpose(0, 2, 1).copy().view(np.uint8)
    return np.concatenate([words, fp16.reshape(groups, blocks, 32)], axis=2).reshape(-1)


def matmul_node(kind: str, i: int, n: int, k: int, packed: np.ndarray, scales: np.ndarray) -> tuple[Any, list[Any]]:
    """Matmul ``i`` of input ``a{k}`` as ``kind`` (``mlas``: MatMulNBits; ``layout``: Int4Layout), with its weights."""
    from onnx import helper, numpy_helper

    if kind == "mlas":
        node = helper.make_node("MatMulNBits", [f"a{k}", f"b{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=4)
        return node, [numpy_helper.from_array(packed, f"b{i}"), numpy_helper.from_array(scales.reshape(-1), f"s{i}")]
    node, initializer = layout_node(f"a{k}", f"b{i}", [f"y{i}"], packed, scales)
    return node, [initializer]


def layout_node(a: str, b: str, outputs: list[str], packed: np.ndarray, scales: np.ndarray, name: str = "") -> tuple[Any, Any]:
    """An Int4Layout node of input ``a`` and its repacked weights, the initializer ``b``."""
    from onnx import helper, numpy_helper

    n, blocks, _ = packed.shape
    node = helper.make_node("Int4Layout", [a, b], outputs, name=name, domain=DOMAIN, N=n, K=blocks * BLOCK)
    return node, numpy_helper.from_array(repack(packed, scales), b)


def session(mats: list[tuple[int, int, np.ndarray, np.ndarray]], kind: str, threads: int, library: Path) -> Any:
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
    return ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(), options(threads, library))


def options(threads: int, library: Path) -> Any:
    """edgekit's own session settings (the engine's), with the op's library registered."""
    from edgekit.runtime.resident import session_options

    settings = session_options(threads)
    settings.register_custom_ops_library(str(library))
    return settings


def median_ms(run: Callable[[], object], reps: int) -> float:
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def pass_side(kind: str, size: str, threads: int, library: Path) -> dict[str, Any]:
    """One process's passes over every matmul of ``size``: milliseconds per pass for each row count."""
    mats = weights(size)
    rng = np.random.default_rng(1)
    activations = {m: {k: rng.standard_normal((m, k), dtype=np.float32) for k in {k for _, k, _, _ in mats}} for m in ROWS}
    count = sum(n * k for n, k, _, _ in mats)
    per_weight = LAYOUT_BYTES_PER_WEIGHT if kind == "layout" else MLAS_BYTES_PER_WEIGHT
    result: dict[str, Any] = {"weights": count, "weight_mib": count * per_weight / 2**20}
    if kind == "layout":
        # Against MatMulNBits on three matrices first: the same weights give the same outputs.
        first, a = mats[:3], activations[ROWS[-1]]
        feed = {f"a{k}": a[k] for k in {k for _, k, _, _ in first}}
        expected = session(first, "mlas", threads, library).run(None, feed)
        found = session(first, "layout", threads, library).run(None, feed)
        result["max_rel_diff_vs_mlas"] = max(float(np.abs(f - e).max() / np.abs(e).max()) for f, e in zip(found, expected))
    timed = session(mats, kind, threads, library)
    del mats
    for m in ROWS:
        feed = {f"a{k}": x for k, x in activations[m].items()}
        result[str(m)] = median_ms(functools.partial(timed.run, None, feed), 5 if m > 2 else 15)
    return result


def rewrite(bundle: Path, out: Path) -> int:
    """Copy ``bundle`` to ``out`` with the graph's block-32 int4 MatMulNBits nodes as Int4Layout nodes
    (weights repacked into ``model.int4.data``); returns how many were rewritten. The copy's manifest
    no longer matches its files: it is for this measurement only."""
    import onnx
    from onnx import helper, numpy_helper

    shutil.copytree(bundle, out)
    graph_file = next(out / name for name in ("model.embeds.onnx", "model.onnx") if (out / name).is_file())
    model = onnx.load(str(bundle / graph_file.name), load_external_data=True)
    initializers = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    rewritten = 0
    for index, node in enumerate(model.graph.node):
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = [name for name in node.input if name]
        if (node.op_type != "MatMulNBits" or attributes.get("bits") != 4 or attributes.get("block_size") != BLOCK
                or len(inputs) != 3 or attributes["N"] % 16 or attributes["K"] % BLOCK
                or any(uses[name] != 1 for name in inputs[1:])):
            continue
        n, k = attributes["N"], attributes["K"]
        packed = numpy_helper.to_array(initializers[inputs[1]]).reshape(n, k // BLOCK, BLOCK // 2)
        scales = numpy_helper.to_array(initializers[inputs[2]]).astype(np.float32).reshape(n, k // BLOCK)
        for name in inputs[1:]:
            model.graph.initializer.remove(initializers[name])
        layout, initializer = layout_node(inputs[0], inputs[1] + ".int4", list(node.output), packed, scales, node.name)
        model.graph.initializer.append(initializer)
        model.graph.node.remove(node)
        model.graph.node.insert(index, layout)
        rewritten += 1
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    graph_file.unlink()
    onnx.save_model(model, str(graph_file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.int4.data", size_threshold=1024)
    return rewritten


def bundle_side(kind: str, bundle: Path, threads: int, library: Path, runs: int) -> dict[str, Any]:
    """edgekit's engine on ``bundle`` (its Int4Layout copy for ``layout``): tok/s medians over ``runs``
    128/64 generations, resident memory, and the device quality check against the build's reference."""
    import psutil

    import edgekit.runtime.engine as engine_module
    from edgekit.bench import direct_run
    from edgekit.profiles import Quality
    from edgekit.runtime import quality_check
    from edgekit.runtime.resident import trim_heap

    if kind == "layout":
        def with_library(threads: int) -> Any:
            return options(threads, library)

        # The engine builds its sessions with this function; replaced for this measurement only.
        engine_module.session_options = with_library
    process = psutil.Process()
    engine = engine_module.Engine(bundle, threads=threads)
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
    return result


def compile_kernel(folder: Path) -> Path:
    flags = Path("/proc/cpuinfo").read_text()
    if "avx512_vnni" not in flags or "f16c" not in flags:
        sys.exit("bench/int4_layout.py: this CPU has no AVX-512 VNNI (or F16C); the kernel is written for it")
    library = folder / "libint4_layout.so"
    subprocess.run(["gcc", "-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma",
                    "-shared", "-fPIC", "-o", str(library), str(SOURCE)], check=True)
    return library


def rounds_of(args: argparse.Namespace, library: Path, extra: Callable[[str], list[str]]) -> list[dict[str, Any]]:
    """``args.rounds`` rounds, each running both sides in their own processes (``extra(kind)``: the
    side's own arguments), alternating which goes first."""
    rounds = []
    for r in range(args.rounds):
        found = {}
        for kind in ("mlas", "layout") if r % 2 == 0 else ("layout", "mlas"):
            run = subprocess.run([sys.executable, __file__, "--side", kind, "--threads", str(args.threads),
                                  "--library", str(library), *extra(kind)], check=True, capture_output=True, text=True)
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
    parser.add_argument("--bundle", type=Path, help="instead: edgekit's engine on this bundle and on its Int4Layout copy")
    parser.add_argument("--runs", type=int, default=4, help="generations per side and round (--bundle)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=("mlas", "layout"), help=argparse.SUPPRESS)
    parser.add_argument("--library", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side and args.bundle:
        print(json.dumps(bundle_side(args.side, args.bundle, args.threads, args.library, args.runs)))
        return
    if args.side:
        print(json.dumps(pass_side(args.side, args.size, args.threads, args.library)))
        return
    with tempfile.TemporaryDirectory() as folder:
        library = compile_kernel(Path(folder))
        if args.bundle:
            copy = Path(folder) / "int4-layout"
            count = rewrite(args.bundle, copy)
            print(f"{count} MatMulNBits nodes of {args.bundle} as Int4Layout", file=sys.stderr, flush=True)
            rounds = rounds_of(args, library, lambda kind: ["--bundle", str(copy if kind == "layout" else args.bundle),
                                                            "--runs", str(args.runs)])
            keys = ("prefill_tps", "decode_tps", "rss_loaded_mib", "rss_after_runs_mib", "peak_rss_mib")
            report = {"bundle": str(args.bundle), "rewritten": count, "threads": args.threads, "rounds": args.rounds,
                      **{key: medians(rounds, key) for key in keys},
                      "quality": {kind: rounds[0][kind].get("quality") for kind in ("mlas", "layout")}}
        else:
            rounds = rounds_of(args, library, lambda kind: ["--size", args.size])
            layout = rounds[0]["layout"]
            report = {"size": args.size, "threads": args.threads, "rounds": args.rounds, "weights": layout["weights"],
                      "layout_mib": round(layout["weight_mib"], 1),
                      "mlas_mib": round(rounds[0]["mlas"]["weight_mib"], 1),
                      "max_rel_diff_vs_mlas": layout["max_rel_diff_vs_mlas"],
                      "ms_per_pass": {str(m): medians(rounds, str(m)) for m in ROWS}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
