"""Rewrites of an ``--include-mtp`` export that let the engine draft with Qwen3.5's MTP head on the CPU.

onnxruntime-genai's builder writes, for a checkpoint with an MTP head, a main graph whose LM head runs
over every position (verifying a draft needs the last two) and ``mtp.onnx``, the draft: one decoder
layer plus the tied 248,320-row LM head. Measured on the 0.8B int4 at 2 threads (docs/benchmarks.md,
``bench/mtp_cost.py``), that draft costs 0.41 of a decode step, which no acceptance rate a CPU sees pays
back. Two rewrites make drafting pay:

**The main graph keeps the logits of the last ``logits_to_keep`` positions** (a new int64 [1] input):
prefill asks for one, as the pruned graph of a plain build computes, and a verify step for two. The
``hidden_states`` output (the final norm, all positions) stays: the draft reads it.

**``draft.onnx``: the MTP graph with a head over the first DRAFT_ROWS token ids, for the last
position only, fed embeddings** (where the lookup is one the engine replays). Token ids follow the
tokenizer's merge order, so the first ones are roughly the most frequent (the idea of FR-Spec,
arXiv 2502.14856): the draft costs 0.07-0.09 of a decode step instead of 0.30-0.55, and cost the trained
fixture 1 % of its acceptance. The cut rows are the leading bytes of the tied table, declared as
initializers over the same stored bytes (nothing is copied). The embedding lookup goes, as in the
main engine's embeds graph: the engine reads the same table's rows itself.
``mtp.onnx`` stays as the builder wrote it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.builder.graph_memory import alias_reshaped_weights, save, store_kv_cache_fp16, without_embedding_lookup
from edgekit.errors import EdgekitError
from edgekit.runtime.engine import KEEP_INPUT
from edgekit.runtime.speculative import DRAFT_GRAPH

DRAFT_ROWS = 16384
_INT64_MAX = np.iinfo(np.int64).max


def _lm_head(graph: onnx.GraphProto, graph_name: str) -> onnx.NodeProto:
    heads = [n for n in graph.node if "logits" in n.output and n.op_type in ("MatMulNBits", "MatMul")]
    if len(heads) != 1:
        raise EdgekitError(f"{graph_name}: expected one MatMul or MatMulNBits producing 'logits', found {len(heads)}")
    return heads[0]


def _cut_rows(graph: onnx.GraphProto, head: onnx.NodeProto, rows: int) -> None:
    """Make the quantized head compute its first ``rows`` outputs only, reading the leading bytes of
    its stored weights: no copy."""
    n_attribute = next(a for a in head.attribute if a.name == "N")
    initializers = {t.name: t for t in graph.initializer}
    for index, name in enumerate(head.input):
        if index == 0 or name not in initializers:
            continue
        tensor = initializers[name]
        if tensor.data_location != TensorProto.EXTERNAL or tensor.dims[0] != n_attribute.i:
            raise EdgekitError(f"mtp.onnx: the LM head's {name} is not a stored [vocabulary, ...] tensor")
        stored = {e.key: e.value for e in tensor.external_data}
        # The first rows of a row-major tensor are its leading bytes: same file and offset, shorter.
        alias = onnx.TensorProto()
        alias.CopyFrom(tensor)
        alias.name = f"{name}.rows{rows}"
        alias.dims[0] = rows
        for entry in alias.external_data:
            if entry.key == "length":
                entry.value = str(int(stored["length"]) * rows // n_attribute.i)
        graph.initializer.append(alias)
        head.input[index] = alias.name
    n_attribute.i = rows


def _slice_columns(graph: onnx.GraphProto, head: onnx.NodeProto, rows: int) -> None:
    """An unquantized head (fp32, fp16 bundles: for exactness, not speed) stores [hidden, vocabulary]:
    its first columns are no byte prefix, so its output is cut instead."""
    full = "logits/all"
    head.output[0] = full
    graph.node.append(helper.make_node("Slice", [full, f"{full}/start", f"{full}/end", f"{full}/axes"], ["logits"],
                                       name=f"{full}/Slice"))
    graph.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), f"{full}/{k}")
                              for k, v in (("start", 0), ("end", rows), ("axes", 2))])


def _logits_dims(graph: onnx.GraphProto, positions: str | int, rows: int | None = None) -> None:
    """Declare the ``logits`` output as [batch, ``positions``, ``rows`` or its vocabulary]."""
    logits = next(o for o in graph.output if o.name == "logits")
    dims = logits.type.tensor_type.shape.dim
    if isinstance(positions, str):
        dims[1].dim_param = positions
    else:
        dims[1].dim_value = positions
    if rows is not None:
        dims[2].dim_value = rows


def _move_last(graph: onnx.GraphProto, node: onnx.NodeProto) -> onnx.NodeProto:
    """Move ``node`` after the nodes appended for its new inputs (node order must stay topological);
    return the graph's copy, which is what later edits must change."""
    graph.node.remove(node)
    graph.node.append(node)
    return graph.node[-1]


def keep_last_logits(model: onnx.ModelProto) -> None:
    """Make the main graph's LM head run over the last ``logits_to_keep`` positions only, in place."""
    graph = model.graph
    head = _lm_head(graph, "model.onnx")
    hidden = head.input[0]
    kept = f"{hidden}/last"
    graph.node.extend([
        helper.make_node("Neg", [KEEP_INPUT], [f"{kept}/start"], name=f"{kept}/Neg"),
        helper.make_node("Slice", [hidden, f"{kept}/start", f"{kept}/end", f"{kept}/axes"], [kept], name=f"{kept}/Slice"),
    ])
    graph.initializer.extend([numpy_helper.from_array(np.array([_INT64_MAX], np.int64), f"{kept}/end"),
                              numpy_helper.from_array(np.array([1], np.int64), f"{kept}/axes")])
    head.input[0] = kept
    graph.input.append(helper.make_tensor_value_info(KEEP_INPUT, TensorProto.INT64, [1]))
    _logits_dims(graph, "logits_positions")
    _move_last(graph, head)


def draft_graph(mtp: onnx.ModelProto, rows: int = DRAFT_ROWS) -> onnx.ModelProto:
    """The draft graph from the builder's ``mtp.onnx`` (loaded without its weights): embeddings in,
    logits of the first ``rows`` token ids for the last position out."""
    graph = mtp.graph
    head = _lm_head(graph, "mtp.onnx")
    # Only the last position's draft is read.
    last = f"{head.input[0]}/last"
    graph.node.append(helper.make_node("Gather", [head.input[0], f"{last}/index"], [last], name=f"{last}/Gather", axis=1))
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{last}/index"))
    head.input[0] = last
    head = _move_last(graph, head)
    if head.op_type == "MatMulNBits":
        _cut_rows(graph, head, rows)
    else:
        _slice_columns(graph, head, rows)
    _logits_dims(graph, 1, rows)
    alias_reshaped_weights(mtp)
    store_kv_cache_fp16(mtp)  # its own cache: 8 instead of 16 MiB at 4,096 tokens on the 0.8B
    # Where the engine cannot replay the lookup (an unquantized table is a Transpose of the head's)
    # the draft keeps it and takes token ids.
    return without_embedding_lookup(mtp) or mtp


def prepare(bundle: Path, rows: int = DRAFT_ROWS) -> None:
    """Rewrite ``bundle``'s model.onnx for verify steps and write its draft.onnx (before the build's
    other graph rewrites, which then carry ``logits_to_keep`` into the embeds graph)."""
    main = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    keep_last_logits(main)
    save(main, bundle / "model.onnx")
    save(draft_graph(onnx.load(str(bundle / "mtp.onnx"), load_external_data=False), rows), bundle / DRAFT_GRAPH)
