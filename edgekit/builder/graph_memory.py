"""Rewrites of the model builder's graph that cut what it holds in memory on the device.

None rewrites the weights file; :func:`lighten` loads ``model.onnx`` once, applies them, and saves
it with a second graph beside it. Each is bit-exact or measured:

**Reshaped weights as second names for the same bytes.**
The builder shares Qwen3.5's tied embedding between the LM head and the embedding lookup: the LM
head's MatMulNBits reads ``lm_head.MatMul.weight_Q4`` [vocab, blocks, blob] and the
GatherBlockQuantized reads a ``Reshape`` of it to [vocab, K/2]. ONNX Runtime constant-folds that
Reshape at load time into a new in-memory tensor: a private copy of the whole quantized vocabulary
(121 MiB on the 0.8B, 242 MiB on the 2B) that stays resident, although a token's lookup reads one row.

A reshape of a contiguous tensor only changes its dims, so the reshaped tensor can be declared as
another initializer over the same offset and length of ``model.onnx.data``. ONNX Runtime maps
external data from the file, so the lookup then reads the page cache's copy, and only the rows
prompts touch stay resident. The data file is not rewritten; only ``model.onnx`` changes.

**An fp16 KV cache.**
The KV cache is the one part of a Qwen3.5 bundle's memory that grows with the context: 24 KiB per
token in fp32 on the 0.8B (96 MiB at 4,096 tokens). llama.cpp keeps it in fp16 by default; so do we.
Each GroupQueryAttention gets its query, key and value cast to fp16 (ONNX Runtime's CPU kernel runs
in fp16 then, reading and appending the cache in place) and its output cast back to fp32; the
``past_key_values.*`` inputs and ``present.*`` outputs become fp16. Measured on the 0.8B int4 after
a 3,000-token prompt: mean KL 0.0002 against the fp32 cache (the int4 weights cost 0.19), prefill
and decode speed within noise. Everything else in the graph stays as it was.

**An int8 KV cache in the engine's graph.**
ONNX Runtime's GroupQueryAttention also keeps its cache in int8 with one fixed scale per channel
(``k_quant_type``/``v_quant_type`` PER_CHANNEL), quantizing new keys and values as it appends them.
The scales come from calibration at build time (:mod:`edgekit.builder.kv_quant`). On the 0.8B int4
with a 4,032-token prompt: mean KL 0.0002 against an fp32 cache (the same as fp16), the cache 24 MiB
instead of 48, the prefill's peak 25 MiB lower still, and decode at that context 3.5x as fast as
with the fp16 cache (docs/benchmarks.md). Only the embeds graph gets it: onnxruntime-genai keeps the
fp16 cache of ``model.onnx``.

**A second graph without the embedding lookup.**
Even reading the page cache's copy, the lookup maps whole folios around each row it reads (~150 MiB
after a 4,000-token prompt of varied text on the 0.8B). ``model.embeds.onnx`` is the same graph
taking ``inputs_embeds`` instead of ``input_ids``, with the table's place in the weights file in its
metadata; the engine reads rows itself (:mod:`edgekit.runtime.embedding`). ``model.onnx`` keeps the
lookup, so onnxruntime-genai runs the bundle as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import EdgekitError
from edgekit.runtime.embedding import INPUT as EMBEDS_INPUT
from edgekit.runtime.embedding import LAYOUT_KEY, embeds_graph

_ATTENTION = "GroupQueryAttention"


def lighten(model_path: Path, kv_cache_fp16: bool) -> None:
    """Apply the rewrites to ``model_path`` (the fp16 KV cache when ``kv_cache_fp16``) and write its
    embeds variant beside it where the lookup allows one. Each file is replaced atomically: a failed
    write leaves the old graph."""
    model = onnx.load(str(model_path), load_external_data=False)
    changed = alias_reshaped_weights(model)
    if kv_cache_fp16:
        changed += store_kv_cache_fp16(model)
    if changed:
        save(model, model_path)
    variant = without_embedding_lookup(model)
    if variant is not None:
        save(variant, embeds_graph(model_path))


def save(model: onnx.ModelProto, path: Path) -> None:
    """Write a graph (its weights stay where its external data says) atomically: a failed write
    leaves the old file."""
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)


def _target_dims(dims: list[int], shape: np.ndarray, allowzero: bool) -> list[int] | None:
    """ONNX Reshape's output dims for input ``dims`` and ``shape``, or None when they are inconsistent."""
    # A 0 copies the input's dim at that index unless allowzero is set.
    out = [dims[i] if d == 0 and not allowzero and i < len(dims) else d for i, d in enumerate(shape.tolist())]
    if out.count(-1) > 1:
        return None
    total = int(np.prod(dims))
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return out if int(np.prod(out)) == total else None


def alias_reshaped_weights(model: onnx.ModelProto) -> int:
    """Turn each Reshape of an external-data initializer by a constant shape into an initializer over
    the same stored bytes, in place; return how many Reshapes were replaced."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1

    outputs = {o.name for o in graph.output}
    replaced: dict[str, str] = {}  # Reshape output -> alias initializer name
    dropped = []
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[0] not in initializers or node.output[0] in outputs:
            continue
        weight = initializers[node.input[0]]
        if weight.data_location != onnx.TensorProto.EXTERNAL:
            continue
        shape_source = constants.get(node.input[1])
        if shape_source is None:
            continue
        shape = numpy_helper.to_array(shape_source.attribute[0].t)
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        dims = _target_dims(list(weight.dims), shape, allowzero)
        if dims is None:
            continue
        alias = onnx.TensorProto()
        alias.CopyFrom(weight)
        alias.name = f"{weight.name}.as_{'x'.join(map(str, dims))}"
        del alias.dims[:]
        alias.dims.extend(dims)
        graph.initializer.append(alias)
        replaced[node.output[0]] = alias.name
        dropped.append(node)
        if consumers.get(node.input[1]) == 1:
            dropped.append(shape_source)
    if not replaced:
        return 0
    for node in dropped:
        graph.node.remove(node)
    _rename_inputs(graph, replaced)
    return len(replaced)


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Point every node input named in ``renames`` at its new name."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def _keep(field: Any, wanted: Any) -> None:
    """Keep the entries of a repeated protobuf ``field`` for which ``wanted(entry)`` holds, in order."""
    kept = [entry for entry in field if wanted(entry)]
    del field[:]
    field.extend(kept)


def _kv_name(name: str) -> bool:
    return name.startswith(("past_key_values.", "present.")) and name.endswith((".key", ".value"))


def _kv_values(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The KV cache's graph inputs and outputs."""
    return [v for v in [*graph.input, *graph.output] if _kv_name(v.name)]


def _retype_kv_cache(graph: onnx.GraphProto, element: int) -> None:
    """Declare the KV cache's graph inputs and outputs as ``element``."""
    for value in _kv_values(graph):
        value.type.tensor_type.elem_type = element
    # Shape-inference records of the cache would now contradict the retyped graph outputs.
    _keep(graph.value_info, lambda v: not _kv_name(v.name))


def store_kv_cache_fp16(model: onnx.ModelProto) -> int:
    """Make the graph's KV cache fp16, in place; return how many attention nodes changed.

    A graph whose cache is already fp16 (CUDA exports) is left alone.
    """
    graph = model.graph
    caches = _kv_values(graph)
    if not caches or all(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in caches):
        return 0
    if any(v.type.tensor_type.elem_type != TensorProto.FLOAT for v in caches):
        raise EdgekitError("model.onnx: the KV cache tensors (past_key_values.*, present.*) are neither all fp32 nor all fp16")
    nodes = []
    changed = 0
    for node in graph.node:
        if node.op_type != _ATTENTION:
            nodes.append(node)
            continue
        # query, key, value: the cache inputs (3, 4) are graph inputs, retyped below.
        for index in range(3):
            half = f"{node.input[index]}/fp16"
            nodes.append(helper.make_node("Cast", [node.input[index]], [half], to=TensorProto.FLOAT16, name=f"{half}/Cast"))
            node.input[index] = half
        output = node.output[0]
        node.output[0] = f"{output}/fp16"
        nodes.append(node)
        nodes.append(helper.make_node("Cast", [node.output[0]], [output], to=TensorProto.FLOAT, name=f"{output}/Cast"))
        changed += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _retype_kv_cache(graph, TensorProto.FLOAT16)
    return changed


def rotary_pairs(model: onnx.ModelProto) -> dict[str, tuple[int, bool]]:
    """For each attention node's key cache (its ``past_key_values.*.key`` input): the rotary dims the
    key went through before it (MRotaryEmbedding or RotaryEmbedding), and whether pairs interleave.

    A rotation mixes each pair of channels by a position-dependent angle, so a pair's channels can
    reach the pair's norm at some position even where calibration never saw it there.
    """
    producers = {out: n for n in model.graph.node for out in n.output}
    pairs = {}
    for node in model.graph.node:
        if node.op_type != _ATTENTION:
            continue
        source = producers.get(node.input[1])
        while source is not None and source.op_type == "Cast":
            source = producers.get(source.input[0])
        if source is not None and source.op_type in ("MRotaryEmbedding", "RotaryEmbedding"):
            attributes = {a.name: helper.get_attribute_value(a) for a in source.attribute}
            if attributes.get("rotary_embedding_dim"):
                pairs[node.input[3]] = (int(attributes["rotary_embedding_dim"]), bool(attributes.get("interleaved", 0)))
    return pairs


def store_kv_cache_int8(model: onnx.ModelProto, scales: dict[str, np.ndarray]) -> int:
    """Make the graph's KV cache int8 with fixed per-channel ``scales``, in place; return how many
    attention nodes changed.

    ``scales`` maps each ``past_key_values.*`` input to its float32 scales [1, kv_heads, 1, head_size]
    (a stored value is ``round(x / scale)`` clipped to int8). The cache must be fp16 or fp32 before.
    """
    graph = model.graph
    if any(v.type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) for v in _kv_values(graph)):
        raise EdgekitError("model.onnx: the KV cache to quantize must be fp32 or fp16")
    changed = 0
    for node in graph.node:
        if node.op_type != _ATTENTION:
            continue
        names = [node.input[3], node.input[4]]
        missing = [name for name in names if name not in scales]
        if missing:
            raise EdgekitError(f"no KV cache scales for {', '.join(missing)}")
        for name in names:
            graph.initializer.append(numpy_helper.from_array(np.asarray(scales[name], np.float32), f"{name}.scale"))
        # k_scale and v_scale are inputs 12 and 13; the optional ones before stay empty.
        node.input.extend([""] * (12 - len(node.input)))
        node.input.extend([f"{name}.scale" for name in names])
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        changed += 1
    _retype_kv_cache(graph, TensorProto.INT8)
    return changed


def external_entries(tensor: onnx.TensorProto) -> dict[str, str] | None:
    """A tensor's external-data entries (location, offset, length), or None when it is stored inline."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    entries = {e.key: e.value for e in tensor.external_data}
    return entries if "location" in entries else None


def _rows_spec(tensor: onnx.TensorProto, dtype: str) -> dict[str, Any] | None:
    """Where the rows of a 2-D external tensor lie: file, offset, bytes per row, element type."""
    stored = external_entries(tensor)
    if stored is None or len(tensor.dims) != 2:
        return None
    itemsize = np.dtype(dtype).itemsize
    return {"file": stored["location"], "offset": int(stored.get("offset", 0)), "row_bytes": tensor.dims[1] * itemsize,
            "dtype": dtype}


_ELEMENT: dict[int, str] = {TensorProto.UINT8: "uint8", TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}


def _lookup_layout(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto],
                   transposes: dict[str, onnx.NodeProto]) -> dict[str, Any] | None:
    """The layout :class:`edgekit.runtime.embedding.EmbeddingTable` needs to replay ``node``, or None
    for a lookup it does not cover (zero points, another axis, an inline table). ``transposes``: the
    graph's 2-D Transpose nodes by output, for a float table stored as the tied LM head's [hidden, vocab]."""
    table = initializers.get(node.input[0])
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    transpose = transposes.get(node.input[0])
    if table is None and transpose is not None and node.op_type == "Gather" and attributes.get("axis", 0) == 0:
        # fp32 exports tie the table to the LM head's weight and gather from its transpose.
        stored = initializers.get(transpose.input[0])
        if stored is None or len(stored.dims) != 2 or stored.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            return None
        weights = _rows_spec(stored, _ELEMENT[stored.data_type])
        return weights and {"rows": stored.dims[1], "hidden": stored.dims[0], "weights": weights, "transposed": True}
    if table is None or len(table.dims) != 2:
        return None
    if node.op_type == "Gather" and attributes.get("axis", 0) == 0 and table.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
        weights = _rows_spec(table, _ELEMENT[table.data_type])
        return weights and {"rows": table.dims[0], "hidden": table.dims[1], "weights": weights}
    if node.op_type != "GatherBlockQuantized" or len(node.input) != 3 or table.data_type != TensorProto.UINT8:
        return None
    bits = attributes.get("bits", 4)
    if bits not in (4, 8) or attributes.get("gather_axis", 0) != 0 or attributes.get("quantize_axis", 1) not in (1, -1):
        return None
    scales = initializers.get(node.input[2])
    if scales is None or scales.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        return None
    weights, scale_rows = _rows_spec(table, "uint8"), _rows_spec(scales, _ELEMENT[scales.data_type])
    if weights is None or scale_rows is None or scales.dims[0] != table.dims[0]:
        return None
    # ONNX Runtime's convention for unsigned data without zero points: the middle of the range.
    return {"rows": table.dims[0], "hidden": table.dims[1] * 8 // bits, "bits": bits,
            "block_size": attributes.get("block_size", 128), "zero_point": 1 << (bits - 1),
            "weights": weights, "scales": scale_rows}


def without_embedding_lookup(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``model`` that takes ``inputs_embeds`` [batch, sequence, hidden] in place of
    ``input_ids`` and its lookup node, with that lookup's table layout in its metadata; None when
    ``input_ids`` feeds anything but one lookup this project can replay."""
    lookups = [n for n in model.graph.node if "input_ids" in n.input]
    if len(lookups) != 1 or list(lookups[0].input).index("input_ids") != 1:
        return None
    [lookup] = lookups
    transposes = {n.output[0]: n for n in model.graph.node if n.op_type == "Transpose"
                  and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([], [[1, 0]])}
    layout = _lookup_layout(lookup, {t.name: t for t in model.graph.initializer}, transposes)
    if layout is None:
        return None
    variant = onnx.ModelProto()
    variant.CopyFrom(model)
    graph = variant.graph
    graph.node.remove(next(n for n in graph.node if n.name == lookup.name and n.output == lookup.output))
    _rename_inputs(graph, {lookup.output[0]: EMBEDS_INPUT})
    if not any(lookup.input[0] in n.input for n in graph.node):
        _keep(graph.initializer, lambda t: t.name != lookup.input[0])
        # A transpose that only fed the lookup goes too (ONNX Runtime would fold it into a copy of the table).
        _keep(graph.node, lambda n: not (n.op_type == "Transpose" and lookup.input[0] in n.output))
    # The lookup yields the scales' type (the table's own for a plain Gather).
    element = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[layout.get("scales", layout["weights"])["dtype"]]
    position = [i.name for i in graph.input].index("input_ids")
    embeds = helper.make_tensor_value_info(EMBEDS_INPUT, element, ["batch_size", "sequence_length", layout["hidden"]])
    graph.input[position].CopyFrom(embeds)
    _keep(graph.value_info, lambda v: v.name != lookup.output[0])
    variant.metadata_props.add(key=LAYOUT_KEY, value=json.dumps(layout))
    return variant
