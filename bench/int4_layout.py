"""Could a 0.5625-byte int4 layout close the x86 memory gap without costing speed? Measured, one pass.

On x86, ONNX Runtime (MLAS) packs MatMulNBits' block-32 int4 weights for its int8 kernels at 0.75 byte
per weight: an fp32 scale and an fp32 block sum beside every 32 weights. That is what keeps the 0.8B
daemon above the 800 MB target on x86 with MTP or a grammar index resident (docs/benchmarks.md), where
the Pi 5's KleidiAI layout stays under it. ``bench/int4_layout.c`` is a small AVX-512 VNNI kernel on a
0.5625-byte layout (4-bit data and an fp16 scale per block, the block sum computed on the fly; columns
interleaved in groups of 16 as llama.cpp repacks Q4_0). This script times one pass over every int4
matmul of a decode step, a two-token verify step and a 64-token prefill chunk of the 0.8B (or 2B):

- ``mlas``: one ONNX Runtime session holding every matmul as a MatMulNBits node (block 32, accuracy
  level 4, as the profiles build them);
- ``layout``: the same weights repacked, through the kernel (OpenMP, spinning like ONNX Runtime's pool).

Weights are random (random nibbles, random scales exactly representable in fp16: both sides compute
with the same numbers), so the speed is the real shapes' and nothing else. Each side runs in its own
process, alternating which goes first, ``--rounds`` times; medians per round and the ratio per round are
reported. The kernel's outputs are checked against MatMulNBits on three matrices first (both quantize
the activations to int8 per block of 32; they differ only in that rounding).

Needs gcc with OpenMP and a CPU with AVX-512 VNNI. Not part of edgekit's runtime: a kernel would enter
it as an ONNX Runtime custom op, with threads from ONNX Runtime's pool (docs/benchmarks.md, session 18).

    python bench/int4_layout.py --size 0.8b --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.fixtures.checkpoint import SIZES, VOCAB_SIZE

SOURCE = Path(__file__).with_suffix(".c")
BLOCK = 32
ROWS = (1, 2, 64)
# MLAS's x86 int8-compute packing per weight (measured: docs/arm64.md, one LM-head-shaped node).
MLAS_BYTES_PER_WEIGHT = 0.75


def shapes(size: str) -> list[tuple[int, int]]:
    """(N, K) of every int4 matmul one token runs through, from the fixture's dimensions."""
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
    layout = np.concatenate([words, fp16.reshape(groups, blocks, 32)], axis=2).reshape(-1)
    buffer = np.empty(layout.size + 64, np.uint8)  # the kernel loads 64-byte-aligned words
    start = -buffer.ctypes.data % 64
    aligned = buffer[start:start + layout.size]
    aligned[:] = layout
    return aligned


def mlas_session(mats: list[tuple[int, int, np.ndarray, np.ndarray]], threads: int) -> Any:
    """One ONNX Runtime session with every matmul as a MatMulNBits node, fed by one input per K."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inputs, nodes, initializers, outputs = {}, [], [], []
    for i, (n, k, packed, scales) in enumerate(mats):
        inputs.setdefault(k, helper.make_tensor_value_info(f"a{k}", TensorProto.FLOAT, ["m", k]))
        nodes.append(helper.make_node("MatMulNBits", [f"a{k}", f"b{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=4))
        initializers += [numpy_helper.from_array(packed, f"b{i}"), numpy_helper.from_array(scales.reshape(-1), f"s{i}")]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", n]))
    graph = helper.make_graph(nodes, "int4", list(inputs.values()), outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(model.SerializeToString(), options)


def kernel(library: Path) -> Callable[..., int]:
    lib = ctypes.CDLL(str(library))
    lib.int4_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.int4_matmul.restype = ctypes.c_int
    return lib.int4_matmul


def median_ms(run: Callable[[], object], reps: int) -> float:
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def side(name: str, size: str, threads: int, library: Path) -> dict[str, Any]:
    """One process's pass: milliseconds per pass over all matmuls, for each row count."""
    mats = weights(size)
    rng = np.random.default_rng(1)
    activations = {m: {k: rng.standard_normal((m, k), dtype=np.float32) for k in {k for _, k, _, _ in mats}} for m in ROWS}
    result: dict[str, Any] = {"side": name, "weights": sum(n * k for n, k, _, _ in mats)}
    if name == "mlas":
        session = mlas_session(mats, threads)
        del mats
        for m in ROWS:
            feed = {f"a{k}": a for k, a in activations[m].items()}
            result[str(m)] = median_ms(lambda feed=feed: session.run(None, feed), 5 if m > 2 else 15)
        return result
    matmul = kernel(library)
    check = mlas_session(mats[:3], 1)
    layouts = [(n, k, repack(packed, scales)) for n, k, packed, scales in mats]
    del mats
    a = activations[ROWS[-1]]
    reference = check.run(None, {f"a{k}": x for k, x in a.items() if f"a{k}" in {i.name for i in check.get_inputs()}})
    worst = 0.0
    for (n, k, layout), expected in zip(layouts[:3], reference):
        y = np.empty((ROWS[-1], n), np.float32)
        assert matmul(a[k].ctypes.data, ROWS[-1], n, k, layout.ctypes.data, y.ctypes.data) == 0
        worst = max(worst, float(np.abs(y - expected).max() / np.abs(expected).max()))
    result["max_rel_diff_vs_mlas"] = worst
    result["layout_mib"] = sum(layout.nbytes for _, _, layout in layouts) / 2**20
    for m in ROWS:
        outs = [np.empty((m, n), np.float32) for n, _, _ in layouts]

        def one_pass(m: int = m, outs: list[np.ndarray] = outs) -> None:
            for (n, k, layout), y in zip(layouts, outs):
                matmul(activations[m][k].ctypes.data, m, n, k, layout.ctypes.data, y.ctypes.data)

        result[str(m)] = median_ms(one_pass, 5 if m > 2 else 15)
    return result


def compile_kernel(folder: Path) -> Path:
    flags = Path("/proc/cpuinfo").read_text()
    if "avx512_vnni" not in flags or "f16c" not in flags:
        sys.exit("bench/int4_layout.py: this CPU has no AVX-512 VNNI (or F16C); the kernel is written for it")
    library = folder / "libint4_layout.so"
    subprocess.run(["gcc", "-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma", "-fopenmp",
                    "-shared", "-fPIC", "-o", str(library), str(SOURCE)], check=True)
    return library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("0.8b", "2b"), default="0.8b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=("mlas", "layout"), help=argparse.SUPPRESS)
    parser.add_argument("--library", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.size, args.threads, args.library)))
        return
    with tempfile.TemporaryDirectory() as folder:
        library = compile_kernel(Path(folder))
        # OpenMP spins between calls like ONNX Runtime's pool does; each side has the CPU to itself.
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "active"}
        rounds = []
        for r in range(args.rounds):
            order = ("mlas", "layout") if r % 2 == 0 else ("layout", "mlas")
            found = {}
            for name in order:
                run = subprocess.run([sys.executable, __file__, "--side", name, "--size", args.size, "--threads", str(args.threads),
                                      "--library", str(library)], env=env, check=True, capture_output=True, text=True)
                found[name] = json.loads(run.stdout.strip().splitlines()[-1])
            rounds.append(found)
            print(f"round {r + 1}: " + "  ".join(f"{m} rows {found['mlas'][str(m)]:.2f} / {found['layout'][str(m)]:.2f} ms"
                                                 for m in ROWS), file=sys.stderr, flush=True)
    layout = rounds[0]["layout"]
    report = {
        "size": args.size, "threads": args.threads, "rounds": args.rounds, "weights": layout["weights"],
        "layout_mib": round(layout["layout_mib"], 1),
        "mlas_mib": round(layout["weights"] * MLAS_BYTES_PER_WEIGHT / 2**20, 1),
        "max_rel_diff_vs_mlas": layout["max_rel_diff_vs_mlas"],
        "ms_per_pass": {str(m): {"mlas": statistics.median(r["mlas"][str(m)] for r in rounds),
                                 "layout": statistics.median(r["layout"][str(m)] for r in rounds),
                                 "speedup_per_round": [round(r["mlas"][str(m)] / r["layout"][str(m)], 3) for r in rounds]}
                        for m in ROWS},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
