"""The build's memory rewrites of the exported graph: shared weight bytes and the fp16 KV cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgekit.build.graph_memory import alias_reshaped_weights, store_kv_cache_fp16
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
    assert _rewrite(half / "model.onnx", store_kv_cache_fp16) > 0
    assert _rewrite(half / "model.onnx", store_kv_cache_fp16) == 0  # already fp16
    exact, rounded = Engine(fp32_bundle), Engine(half)
    state = rounded.new_state()
    assert {a.dtype for name, a in state.past.items() if name.startswith("past_key_values")} == {np.dtype(np.float16)}
    assert {a.dtype for name, a in state.past.items() if not name.startswith("past_key_values")} == {np.dtype(np.float32)}

    def run(engine: Engine) -> np.ndarray:
        state = engine.new_state()
        steps = [engine.forward(state, list(range(1000, 1300)))]
        steps += [engine.forward(state, [2000 + i]) for i in range(8)]
        return np.stack(steps)

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    a, b = run(exact), run(rounded)
    assert np.abs(a - b).max() > 0  # the cache really is rounded...
    p, q = log_softmax(a), log_softmax(b)
    assert float((np.exp(p) * (p - q)).sum(-1).mean()) < 1e-3  # ...at a cost far below int4's (~0.19 on the 0.8B)
