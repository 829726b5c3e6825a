"""The build's memory rewrites of the exported graph: shared weight bytes, the fp16 and int8 KV caches
and the embeds variant whose token embeddings the engine reads from the weights file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.builder.checkpoint import read_config
from edgekit.builder.graph_memory import (
    alias_reshaped_weights,
    rotary_pairs,
    save,
    store_kv_cache_fp16,
    store_kv_cache_int8,
    without_embedding_lookup,
)
from edgekit.builder.kv_quant import kv_scales
from edgekit.errors import EdgekitError
from edgekit.kernels.int4_layout import KERNEL_ENV
from edgekit.runtime.agreement import Agreement, forced_logits
from edgekit.runtime.embedding import INPUT, LAYOUT_KEY, EmbeddingTable, embeds_graph
from edgekit.runtime.engine import Engine


def _reshape_gather_model(folder: Path) -> Path:
    """weight [6, 4] in external data -> Reshape to [3, 0 -> 8] -> Gather rows: the builder's pattern in small."""
    weight = numpy_helper.from_array(np.arange(24, dtype=np.float32).reshape(6, 4), "weight")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([3, -1], np.int64))),
         helper.make_node("Reshape", ["weight", "shape"], ["table"]),
         helper.make_node("Gather", ["table", "ids"], ["rows"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, 8])], [weight])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    return path


def _rewrite(path: Path, rewrite) -> int:
    """Apply one rewrite to the graph file at ``path``; return its count."""
    model = onnx.load(str(path), load_external_data=False)
    count = rewrite(model)
    onnx.save(model, str(path))
    return count


def _run(path: Path, ids: list[int]) -> np.ndarray:
    return ort.InferenceSession(str(path)).run(None, {"ids": np.array(ids, np.int64)})[0]


def test_reshaped_weight_becomes_a_second_name_for_the_same_bytes(tmp_path: Path) -> None:
    path = _reshape_gather_model(tmp_path)
    data = (tmp_path / "model.onnx.data").read_bytes()
    before = _run(path, [2, 0, 1])
    assert _rewrite(path, alias_reshaped_weights) == 1
    model = onnx.load(str(path), load_external_data=False)
    assert [n.op_type for n in model.graph.node] == ["Gather"]
    alias = next(t for t in model.graph.initializer if t.name == model.graph.node[0].input[0])
    assert list(alias.dims) == [3, 8]
    original = next(t for t in model.graph.initializer if t.name == "weight")
    assert {e.key: e.value for e in alias.external_data} == {e.key: e.value for e in original.external_data}
    assert (tmp_path / "model.onnx.data").read_bytes() == data  # the weights file is untouched
    np.testing.assert_array_equal(_run(path, [2, 0, 1]), before)
    assert _rewrite(path, alias_reshaped_weights) == 0  # nothing left to do


def test_bundle_embedding_reads_the_lm_head_bytes(host_bundle: Path) -> None:
    """The tied embedding's lookup reads the LM head's stored weight, not a load-time copy of it."""
    model = onnx.load(str(host_bundle / "model.onnx"), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    [gather] = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    table = initializers[gather.input[0]]
    head = initializers["lm_head.MatMul.weight_Q4"]
    assert [(e.key, e.value) for e in table.external_data] == [(e.key, e.value) for e in head.external_data]
    assert not [n for n in model.graph.node if n.op_type == "Reshape" and n.input[0] in initializers]


def test_fp16_kv_cache_is_close_to_fp32(fp32_bundle: Path, tmp_path: Path) -> None:
    """The fp16 cache changes the logits far less than int4 weights do, through prefill and decode."""
    half = Path(shutil.copytree(fp32_bundle, tmp_path / "half"))
    # fp32 exports look rows up in a Transpose of the LM head; their embeds variant reads those rows
    # as columns of the stored head, and it is the graph the engine runs.
    graph = embeds_graph(half / "model.onnx")
    layout = json.loads(next(p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props
                             if p.key == LAYOUT_KEY))
    assert layout["transposed"] is True and layout["rows"] == 248320
    assert _rewrite(graph, store_kv_cache_fp16) > 0
    assert _rewrite(graph, store_kv_cache_fp16) == 0  # already fp16
    exact, rounded = Engine(fp32_bundle), Engine(half)
    state = rounded.new_state()
    assert {a.dtype for name, a in state.past.items() if name.startswith("past_key_values")} == {np.dtype(np.float16)}
    assert {a.dtype for name, a in state.past.items() if not name.startswith("past_key_values")} == {np.dtype(np.float32)}

    a, b = forced_logits(exact, PROMPT, FOLLOW), forced_logits(rounded, PROMPT, FOLLOW)
    assert np.abs(a - b).max() > 0  # the cache really is rounded...
    assert Agreement.of([(a, b)]).mean_kl < 1e-3  # ...at a cost far below int4's (~0.19 on the 0.8B)


# 300 prompt tokens, then 8 decode steps: prefill and decode both go through the cache.
PROMPT, FOLLOW = list(range(1000, 1300)), [2000 + i for i in range(9)]


def test_int8_kv_cache_is_close_to_fp16(host_bundle: Path, tmp_path: Path) -> None:
    """The engine's graph keeps its cache in int8 with calibrated scales, at a cost far below int4
    weights through prefill and decode; model.onnx keeps fp16 for onnxruntime-genai."""
    graphs = {path.name: onnx.load(str(path), load_external_data=False)
              for path in (host_bundle / "model.onnx", embeds_graph(host_bundle / "model.onnx"))}
    types = {name: {v.type.tensor_type.elem_type for v in m.graph.input if v.name.startswith("past_key_values.")}
             for name, m in graphs.items()}
    assert types == {"model.onnx": {TensorProto.FLOAT16}, "model.embeds.onnx": {TensorProto.INT8}}
    half = Path(shutil.copytree(host_bundle, tmp_path / "half"))
    embeds_graph(half / "model.onnx").unlink()  # the engine now runs model.onnx: the same export, fp16 cache
    quantized = Engine(host_bundle)
    assert {a.dtype for name, a in quantized.new_state().past.items() if name.startswith("past_key_values")} == {
        np.dtype(np.int8)}

    a, b = forced_logits(Engine(half), PROMPT, FOLLOW), forced_logits(quantized, PROMPT, FOLLOW)
    assert np.abs(a - b).max() > 0  # the cache really is quantized...
    assert Agreement.of([(a, b)]).mean_kl < 1e-3  # ...at a cost far below int4's (~0.19 on the 0.8B)


def test_calibration_gives_each_rotary_pair_its_norm(bundle_copy: Path, tiny_checkpoint: Path) -> None:
    """Every key cache is found behind its rotary op, and both channels of a rotary pair get the
    pair's largest norm: at another position the rotation can put all of it in either channel."""
    _, shape = read_config(tiny_checkpoint)
    model = onnx.load(str(bundle_copy / "model.onnx"), load_external_data=False)
    pairs = rotary_pairs(model)
    keys = sorted(n.input[3] for n in model.graph.node if n.op_type == "GroupQueryAttention")
    assert sorted(pairs) == keys and len(keys) == shape.full_attention_layers
    [(dims, interleaved)] = set(pairs.values())
    assert 0 < dims <= shape.head_dim and not interleaved
    with pytest.raises(EdgekitError, match="calibration needs the graph's float cache"):
        kv_scales(bundle_copy, pairs)  # the engine's graph is int8 already
    embeds_graph(bundle_copy / "model.onnx").unlink()  # as calibration sees it: model.onnx's fp16 cache
    scales = kv_scales(bundle_copy, pairs)
    assert sorted(scales) == sorted(keys + [k.replace(".key", ".value") for k in keys])
    for key in keys:
        first, second = scales[key][..., : dims // 2], scales[key][..., dims // 2 : dims]
        np.testing.assert_array_equal(first, second)
        assert scales[key].shape == (1, shape.kv_heads, 1, shape.head_dim)
        value = scales[key.replace(".key", ".value")]
        assert not np.array_equal(value[..., : dims // 2], value[..., dims // 2 : dims])  # values are not rotated


def test_int8_kv_cache_needs_a_scale_for_every_cache(host_bundle: Path) -> None:
    model = onnx.load(str(host_bundle / "model.onnx"), load_external_data=False)
    key = next(n.input[3] for n in model.graph.node if n.op_type == "GroupQueryAttention")
    with pytest.raises(EdgekitError, match=f"no KV cache scales for {key}"):
        store_kv_cache_int8(model, {})


def _lookup_model(folder: Path, kind: str) -> Path:
    """A graph whose ``input_ids`` feed one embedding lookup over a table in external data, as the
    builder writes them: a plain Gather (fp32), or GatherBlockQuantized at 4 or 8 bits."""
    rng = np.random.default_rng(0)
    rows, hidden, block = 300, 48, 16
    if kind == "gather":
        tables = [numpy_helper.from_array(rng.standard_normal((rows, hidden)).astype(np.float32), "table")]
        lookup = helper.make_node("Gather", ["table", "input_ids"], ["embedded"])
    else:
        bits = int(kind[-1])
        data = rng.integers(0, 256, (rows, hidden * bits // 8), dtype=np.uint8)
        scales = rng.random((rows, hidden // block)).astype(np.float32)
        tables = [numpy_helper.from_array(data, "table"), numpy_helper.from_array(scales, "scales")]
        lookup = helper.make_node("GatherBlockQuantized", ["table", "input_ids", "scales"], ["embedded"],
                                  domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
    graph = helper.make_graph(
        [lookup, helper.make_node("Mul", ["embedded", "two"], ["out"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [*tables, numpy_helper.from_array(np.array(2, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path = folder / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


@pytest.mark.parametrize("kind", ["gather", "block4", "block8"])
def test_embeds_variant_reads_the_same_rows(tmp_path: Path, kind: str) -> None:
    """Rows read from the weights file, dequantized in numpy, equal the lookup op's output bit for bit."""
    path = _lookup_model(tmp_path, kind)
    variant = without_embedding_lookup(onnx.load(str(path), load_external_data=False))
    assert variant is not None
    assert [i.name for i in variant.graph.input] == [INPUT]
    assert [n.op_type for n in variant.graph.node] == ["Mul"]
    assert "table" not in {t.name for t in variant.graph.initializer}  # nothing left to map it
    onnx.save(variant, str(embeds_graph(path)))
    session = ort.InferenceSession(str(embeds_graph(path)))
    table = EmbeddingTable.from_metadata(tmp_path, session.get_modelmeta().custom_metadata_map)
    ids = [[0, 299, 7, 7, 150, 3]]
    expected = ort.InferenceSession(str(path)).run(None, {"input_ids": np.array(ids, np.int64)})[0]
    got = session.run(None, {INPUT: table.lookup(ids[0])})[0]
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    with pytest.raises(EdgekitError, match="token id 300 is outside the embedding table"):
        table.lookup([1, 300])


def test_no_variant_when_the_ids_feed_more_than_the_lookup(tmp_path: Path) -> None:
    path = _lookup_model(tmp_path, "block4")
    model = onnx.load(str(path), load_external_data=False)
    model.graph.node.append(helper.make_node("Shape", ["input_ids"], ["ids_shape"]))
    assert without_embedding_lookup(model) is None


def test_table_shorter_than_recorded_is_refused(tmp_path: Path) -> None:
    path = _lookup_model(tmp_path, "block4")
    variant = without_embedding_lookup(onnx.load(str(path), load_external_data=False))
    layout = {p.key: p.value for p in variant.metadata_props}
    with (tmp_path / "model.onnx.data").open("r+b") as data:
        data.truncate(1000)
    with pytest.raises(EdgekitError, match="model.onnx.data: 1000 bytes, too short for the embedding table"):
        EmbeddingTable.from_metadata(tmp_path, layout)
    with pytest.raises(EdgekitError, match=LAYOUT_KEY):
        EmbeddingTable.from_metadata(tmp_path, {})
    outside = json.loads(layout[LAYOUT_KEY])
    outside["weights"]["file"] = "../model.onnx.data"
    with pytest.raises(EdgekitError, match="must be a file of the bundle folder"):
        EmbeddingTable(tmp_path, outside)


def test_bundle_engine_runs_the_embeds_graph_exactly(host_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundle carries the embeds variant and the engine runs it; before its cache became int8,
    its logits through prefill and decode equal those of the graph that looks tokens up itself (what
    onnxruntime-genai runs). Both on MatMulNBits: the host bundle's Int4Layout graph is an x86 one's
    (test_int4_layout.py)."""
    monkeypatch.setenv(KERNEL_ENV, "off")
    assert INPUT in {i.name for i in Engine(host_bundle).session.get_inputs()}
    plain = Path(shutil.copytree(host_bundle, tmp_path / "plain"))
    save(without_embedding_lookup(onnx.load(str(plain / "model.onnx"), load_external_data=False)),
         embeds_graph(plain / "model.onnx"))
    lookup = Path(shutil.copytree(host_bundle, tmp_path / "lookup"))
    embeds_graph(lookup / "model.onnx").unlink()
    ours, theirs = Engine(plain), Engine(lookup)
    assert INPUT in {i.name for i in ours.session.get_inputs()}
    assert "input_ids" in {i.name for i in theirs.session.get_inputs()}
    prompt = [int(i) for i in np.random.default_rng(3).integers(0, 248000, 200)]

    def run(engine: Engine) -> np.ndarray:
        state = engine.new_state()
        steps = [engine.forward(state, prompt)]
        steps += [engine.forward(state, [int(np.argmax(steps[-1]))]) for _ in range(6)]
        return np.stack(steps)

    assert np.array_equal(run(ours), run(theirs))
