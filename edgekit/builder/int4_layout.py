"""x86 bundles' Int4Layout graphs: the engine's graphs with their block-32 int4 matmuls on edgekit's op.

On x86, ONNX Runtime packs MatMulNBits' int4 weights at 0.75 byte per weight into anonymous memory at
load; the ``edgekit.int4`` Int4Layout op (:mod:`edgekit.kernels.int4_layout`) reads 0.5625 from the
mapped weights file, and decodes the 0.8B about 1.6x as fast on AVX-512 (docs/benchmarks.md,
session 19). For every graph the engine runs (the embeds graph, the draft), this writes a
copy beside it (``<graph>.int4.onnx``) whose qualifying MatMulNBits nodes are Int4Layout nodes, with
their weights repacked into one file, ``int4.data``. The originals stay: the engine falls back to them
where the op cannot run, and ``model.onnx`` stays onnxruntime-genai's. The cost is disk: the matmul
weights are stored twice (in the layout, 0.5625 byte per weight).

A node qualifies when it is a 4-bit, block-32 MatMulNBits at accuracy level 4 (the op quantizes
activations to int8 per block of 32, as MLAS's level 4 does) without zero points, group index or bias,
N a multiple of 16 and its weights and scales in external data. Scales are stored in fp16: on the
trained fixture this moved mean KL against the fp32 reference from 0.001338 to 0.001336.

The layout, per group of 16 output columns and block of 32 weights along K: 256 bytes of nibbles
(byte 4c + t of 64-byte word j holds column c's weights 8j + t, low nibble, and 8j + 4 + t, high
nibble; zero point 8), then the 16 columns' fp16 scales. Groups follow each other, so the first rows
of a matrix are the first bytes of its layout: the draft's head, the main head's first 16,384 rows,
reads the main head's bytes (nothing is stored twice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgekit.builder.graph_memory import external_entries, save
from edgekit.kernels.int4_layout import DATA, DOMAIN, OP, layout_graph

BLOCK = 32
GROUP = 16
# Per group of 16 columns and block of 32: 16 columns x (16 bytes of nibbles + a 2-byte scale) = 288.
BLOCK_BYTES = GROUP * (BLOCK // 2 + 2)
_ALIGN = 4096  # each tensor on its own page: mapped without a neighbour's bytes


def repack(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MatMulNBits' [N, K/32, 16] bytes (element 2j in byte j's low nibble) and [N, K/32] scales in the
    op's layout, as one flat uint8 array (N/16 x K/32 x 288 bytes)."""
    n, blocks, _ = packed.shape
    groups = n // GROUP
    q = np.empty((n, blocks, BLOCK), np.uint8)
    q[..., 0::2], q[..., 1::2] = packed & 15, packed >> 4
    q = q.reshape(groups, GROUP, blocks, 4, 2, 4)  # group, column, block, word, half, byte: weight 8*word + 4*half + byte
    words = (q[:, :, :, :, 0, :] | (q[:, :, :, :, 1, :] << 4)).transpose(0, 2, 3, 1, 4).reshape(groups, blocks, 256)
    fp16 = scales.astype(np.float16).reshape(groups, GROUP, blocks).transpose(0, 2, 1).copy().view(np.uint8)
    return np.concatenate([words, fp16.reshape(groups, blocks, 2 * GROUP)], axis=2).reshape(-1)


def _stored(tensor: onnx.TensorProto) -> tuple[str, int, int] | None:
    """(file, offset, length) of an external tensor; None when it is inline or its length is not recorded."""
    entries = external_entries(tensor)
    if entries is None or "length" not in entries:
        return None
    return entries["location"], int(entries.get("offset", 0)), int(entries["length"])


def _read(folder: Path, stored: tuple[str, int, int], dtype: type) -> np.ndarray:
    location, offset, length = stored
    with open(folder / location, "rb") as f:
        f.seek(offset)
        return np.frombuffer(f.read(length), dtype)


@dataclass
class _Writer:
    """Appends repacked matrices to ``int4.data``; a matrix whose stored weights and scales start where
    an earlier one's did (with the same K and at most its rows) is that one's leading bytes."""

    folder: Path
    written: dict[tuple[str, int, str, int, int], tuple[int, int]] = field(default_factory=dict)
    size: int = 0

    def place(self, b: tuple[str, int, int], s: tuple[str, int, int], scale_type: type, n: int, k: int) -> tuple[int, int] | None:
        """(offset, length) of the node's layout in ``int4.data``, written now unless already there;
        None where its fp32 scales do not survive fp16."""
        length = n // GROUP * (k // BLOCK) * BLOCK_BYTES
        key = (b[0], b[1], s[0], s[1], k)
        if key in self.written and self.written[key][1] >= n:
            return self.written[key][0], length
        scales = _read(self.folder, s, scale_type).astype(np.float32)
        half = scales.astype(np.float16)
        if not np.all(np.isfinite(half)) or np.any((half == 0) & (scales != 0)):
            return None
        packed = _read(self.folder, b, np.uint8).reshape(n, k // BLOCK, BLOCK // 2)
        offset = -(-self.size // _ALIGN) * _ALIGN
        with open(self.folder / DATA, "r+b" if self.size else "wb") as f:
            f.seek(offset)
            f.write(repack(packed, scales.reshape(n, k // BLOCK)).tobytes())
        self.size = offset + length
        self.written[key] = (offset, n)
        return offset, length


def _qualifies(node: onnx.NodeProto, attributes: dict[str, Any], initializers: dict[str, onnx.TensorProto]) -> bool:
    inputs = list(node.input)
    return (node.op_type == "MatMulNBits" and attributes.get("bits", 4) == 4 and attributes.get("block_size") == BLOCK
            and attributes.get("accuracy_level", 0) == 4 and not any(inputs[3:])
            and attributes.get("N", 0) % GROUP == 0 and attributes.get("K", 0) % BLOCK == 0
            and all(name in initializers and _stored(initializers[name]) is not None for name in inputs[1:3])
            and initializers[inputs[2]].data_type in (TensorProto.FLOAT, TensorProto.FLOAT16))


def _rewrite(model: onnx.ModelProto, writer: _Writer) -> int:
    """Turn ``model``'s qualifying nodes into Int4Layout nodes over ``int4.data``, in place; returns how many."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    count = 0
    replaced: set[str] = set()
    for index, node in enumerate(list(graph.node)):
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not _qualifies(node, attributes, initializers):
            continue
        n, k = attributes["N"], attributes["K"]
        weights, scales = initializers[node.input[1]], initializers[node.input[2]]
        scale_type = np.float16 if scales.data_type == TensorProto.FLOAT16 else np.float32
        b, s = _stored(weights), _stored(scales)
        assert b is not None and s is not None
        placed = writer.place(b, s, scale_type, n, k)
        if placed is None:
            continue
        name = f"{node.input[1]}.int4"
        tensor = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[placed[1]], data_location=TensorProto.EXTERNAL)
        for key, value in (("location", DATA), ("offset", str(placed[0])), ("length", str(placed[1]))):
            tensor.external_data.add(key=key, value=value)
        graph.initializer.append(tensor)
        layout = helper.make_node(OP, [node.input[0], name], list(node.output), name=node.name, domain=DOMAIN, N=n, K=k)
        replaced.update(node.input[1:3])
        graph.node[index].CopyFrom(layout)  # ``node`` is this message: read it before
        count += 1
    used = {name for n in graph.node for name in n.input}
    for name in replaced - used:
        graph.initializer.remove(initializers[name])
    if count:
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return count


def write(folder: Path, graphs: list[Path]) -> int:
    """Write the Int4Layout copy of each of ``graphs`` (in ``folder``; the main graph first, so a draft's
    head can share its bytes) and ``int4.data``; returns how many nodes became Int4Layout nodes in all.
    Writes nothing where none qualifies."""
    writer = _Writer(folder)
    total = 0
    for graph in graphs:
        model = onnx.load(str(graph), load_external_data=False)
        count = _rewrite(model, writer)
        if count:
            save(model, layout_graph(graph))
        total += count
    return total
