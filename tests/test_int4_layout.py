"""edgekit's Int4Layout op (x86-64): the same products as MatMulNBits on every shape and kernel, the
build's layout graphs, the engine's choice and fallback, and the op on the trained fixture's gate."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.builder.int4_layout import BLOCK, repack
from edgekit.builder.pipeline import BuildRequest, build
from edgekit.errors import EdgekitError
from edgekit.kernels import int4_layout
from edgekit.kernels.int4_layout import DATA, DOMAIN, KERNEL_ENV, OP, layout_graph
from edgekit.profiles import Quality, load_profile
from edgekit.runtime import quality_check
from edgekit.runtime.engine import Engine, GenerationStats
from edgekit.runtime.resident import session_options
from edgekit.runtime.tokenizer import ChatTokenizer
from tests.conftest import write_profile
from tests.test_trained import trained_checkpoint  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the op has x86-64 kernels only")
KERNELS = ["avx2", "avx512-vnni"]


@pytest.fixture(scope="module")
def x86_bundle(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The trained fixture as the x86-64 profile builds it, with its own gate and the MTP draft."""
    return build(BuildRequest(profile=load_profile("x86-64"), model=str(trained_checkpoint), include_mtp=True,
                              output=tmp_path_factory.mktemp("dist"), text_only=True)).path


def _session(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], widths: set[int],
             outputs: list[str]) -> ort.InferenceSession:
    """A session of ``nodes`` with an input ``a{K}`` [batch, rows, K] per width and the op registered."""
    inputs = [helper.make_tensor_value_info(f"a{k}", TensorProto.FLOAT, ["batch", "rows", k]) for k in sorted(widths)]
    graph = helper.make_graph(nodes, "int4", inputs, [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(DOMAIN, 1)])
    options = session_options(2)
    int4_layout.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _weights(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, size=(n, k // BLOCK, BLOCK // 2), dtype=np.uint8)
    # Scales exact in fp16: both ops then multiply by the same numbers.
    scales = rng.uniform(0.002, 0.02, size=(n, k // BLOCK)).astype(np.float16).astype(np.float32)
    return packed, scales


def _use_kernel(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if kernel == "avx512-vnni":
        monkeypatch.delenv(KERNEL_ENV, raising=False)
        if int4_layout.kernel() != kernel:
            pytest.skip("this CPU has no AVX-512 VNNI")
    else:
        monkeypatch.setenv(KERNEL_ENV, kernel)
    assert int4_layout.kernel() == kernel


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_op_computes_what_matmulnbits_does_on_every_shape(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One graph per kernel, MatMulNBits (block 32, accuracy level 4: int8 activations per block, as
    the op) beside Int4Layout on the same weights: column groups from 1 to 224, K from one block to
    112, and row counts that take every path of the kernel (4, 2 and 1 rows at a time, and a
    prompt chunk's heap scratch)."""
    _use_kernel(kernel, monkeypatch)
    shapes = [(16, 32), (48, 96), (160, 1024), (3584, 1024), (1024, 3584)]
    nodes, initializers, outputs = [], [], []
    for i, (n, k) in enumerate(shapes):
        packed, scales = _weights(n, k, i)
        nodes.append(helper.make_node("MatMulNBits", [f"a{k}", f"b{i}", f"s{i}"], [f"want{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=4))
        nodes.append(helper.make_node(OP, [f"a{k}", f"l{i}"], [f"got{i}"], domain=DOMAIN, N=n, K=k))
        initializers += [numpy_helper.from_array(packed, f"b{i}"), numpy_helper.from_array(scales.reshape(-1), f"s{i}"),
                         numpy_helper.from_array(repack(packed, scales), f"l{i}")]
        outputs += [f"want{i}", f"got{i}"]
    widths = {k for _, k in shapes}
    session = _session(nodes, initializers, widths, outputs)
    rng = np.random.default_rng(7)
    for rows in (1, 2, 3, 5, 7, 64):
        feed = {f"a{k}": rng.standard_normal((1, rows, k), dtype=np.float32) for k in widths}
        found = dict(zip(outputs, session.run(outputs, feed)))
        for i, (n, _) in enumerate(shapes):
            want, got = found[f"want{i}"], found[f"got{i}"]
            assert got.shape == want.shape == (1, rows, n)
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), ((n, _), rows, np.abs(got - want).max())


def test_the_op_refuses_bad_attributes_and_weights_by_name() -> None:
    packed, scales = _weights(16, 64, 0)
    weights = numpy_helper.from_array(repack(packed, scales), "w")
    with pytest.raises(Exception, match="N must be a positive multiple of 16 and K of 32"):
        _session([helper.make_node(OP, ["a64", "w"], ["y"], domain=DOMAIN, N=24, K=64)], [weights], {64}, ["y"])
    short = numpy_helper.from_array(repack(packed, scales)[:-1], "w")
    session = _session([helper.make_node(OP, ["a64", "w"], ["y"], domain=DOMAIN, N=16, K=64)], [short], {64}, ["y"])
    with pytest.raises(Exception, match=r"input B must be 1-D with N/16 x K/32 x 288 bytes"):
        session.run(None, {"a64": np.ones((1, 1, 64), np.float32)})


def test_without_the_library_the_engine_runs_the_matmulnbits_graph_and_says_why(
        host_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The host profile (x86-64) builds both graphs; a device whose edgekit has no library (an install
    built with EDGEKIT_NATIVE=0) or that turns the op off runs MatMulNBits, with the same figures."""
    manifest = json.loads((host_bundle / "manifest.json").read_text())
    assert manifest["recipe"]["int4_layout_nodes"] > 0
    assert layout_graph(host_bundle / "model.embeds.onnx").is_file() and (host_bundle / DATA).is_file()
    ids = list(range(1000, 1032))
    with_op = Engine(host_bundle)
    assert with_op.int4_kernel in KERNELS and with_op.int4_fallback is None
    assert with_op.graph == layout_graph(host_bundle / "model.embeds.onnx")
    logits = with_op.forward(with_op.new_state(), ids)
    monkeypatch.setattr(int4_layout, "LIBRARY", tmp_path / "missing.so")
    without = Engine(host_bundle)
    assert without.int4_kernel is None and "has no missing.so" in str(without.int4_fallback)
    assert without.graph == host_bundle / "model.embeds.onnx"
    fallback = without.forward(without.new_state(), ids)
    assert np.abs(fallback - logits).max() <= 1e-4 * np.abs(logits).max()
    with pytest.raises(EdgekitError, match=r"edgekit.int4 Int4Layout op cannot run here: this edgekit install has no missing.so"):
        int4_layout.register(ort.SessionOptions())
    monkeypatch.undo()
    monkeypatch.setenv(KERNEL_ENV, "off")
    assert Engine(host_bundle).int4_fallback == f"{KERNEL_ENV}=off"


@pytest.mark.slow
def test_the_draft_reads_the_main_heads_bytes_and_drafting_changes_no_token(x86_bundle: Path) -> None:
    """The MTP draft's head is the main head's first rows: in the layout too, the same bytes of
    int4.data, so drafting maps no second copy. The op computes every row alike however many it is
    given, so a verify step's tokens are the ones single steps choose: greedy drafting on int4 gives
    plain decoding's tokens."""
    def head(graph: str) -> dict[str, str]:
        model = onnx.load(str(x86_bundle / graph), load_external_data=False)
        node = next(n for n in model.graph.node if "logits" in n.output)
        assert node.op_type == OP
        tensor = next(t for t in model.graph.initializer if t.name == node.input[1])
        return {e.key: e.value for e in tensor.external_data}

    main, draft = head("model.embeds.int4.onnx"), head("draft.int4.onnx")
    assert main["location"] == draft["location"] == DATA and main["offset"] == draft["offset"]
    assert int(draft["length"]) < int(main["length"])
    engine = Engine(x86_bundle)
    assert engine.drafter is not None and engine.int4_kernel is not None
    assert Path(engine.drafter.session._model_path).name == "draft.int4.onnx"
    tokenizer = ChatTokenizer(x86_bundle)
    for text in ("def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, item):"):
        ids = tokenizer.encode(text)
        stats = GenerationStats()
        drafted = list(engine.generate(ids, 40, stats=stats))
        assert drafted == list(engine.generate(ids, 40, speculative=False)), text
        assert stats.acceptance is not None and stats.acceptance > 0, text


def test_an_aarch64_profile_cannot_ask_for_the_op(tmp_path: Path) -> None:
    profile = write_profile(tmp_path, "pi-layout", base="raspberry-pi-5", int4_layout=True)
    with pytest.raises(EdgekitError, match=r"field 'quantization.int4_layout' is for x86_64"):
        load_profile(str(profile))


@pytest.mark.slow
def test_on_the_trained_fixture_both_graphs_pass_the_gate_with_the_same_figures(
        x86_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The x86-64 profile's own gate on a model whose predictions mean something: the build checks the
    Int4Layout graph, and the device check reads the same figures on both kernels and on MatMulNBits."""
    bundle = x86_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quality"]["passed"] and manifest["quality"]["top1_agreement"] >= 0.8, manifest["quality"]
    # Every matmul of the 4-layer fixture and its head (3 linear-attention layers of 6 matmuls, an
    # attention layer of 5: fused qkv, o and the MLP's 3), and the draft's fc, layer and head.
    assert manifest["recipe"]["int4_layout_nodes"] == 3 * 6 + 5 + 1 + (1 + 5 + 1)
    reference = quality_check.Reference.read(bundle)
    assert reference is not None
    figures = {}
    for kernel in ("default", "avx2", "off"):
        if kernel == "default":
            monkeypatch.delenv(KERNEL_ENV, raising=False)
        else:
            monkeypatch.setenv(KERNEL_ENV, kernel)
        engine = Engine(bundle)
        assert (engine.int4_kernel is None) == (kernel == "off")
        check = quality_check.run(engine, reference, Quality(min_top1_agreement=0.8, max_mean_kl=0.012))
        figures[kernel] = (check.top1_agreement, check.mean_kl, check.passed)
    print(figures)
    assert all(passed for _, _, passed in figures.values()), figures
    # The two kernels compute the same numbers, in the same order.
    assert figures["default"] == figures["avx2"], figures
    assert abs(figures["default"][1] - figures["off"][1]) <= 0.1 * figures["off"][1], figures
