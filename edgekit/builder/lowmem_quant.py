"""Run onnxruntime-genai's model builder with weight quantization done one tensor at a time.

The builder's own int4/int8 pass serialises the whole float graph to one ModelProto and quantizes
that: every weight exists in fp32 at once beside the bf16 checkpoint (the 2B model peaked at
15.8-20.7 GB). This module replaces that pass, for the builder's default (MLAS round-to-nearest)
quantizer, with the same quantizer applied node by node on the builder's in-memory graph, dropping
each float weight as soon as its quantized form exists. The result is the same graph with the same
bytes; other quantization setups (RTN, k-quant, mixed precision, QDQ) keep the builder's own pass.

It also takes two options of its own:
- ``--lm-head-block-size N``: the LM head (and, when the embedding is tied, the embedding lookup that
  shares its bytes) quantized with blocks of N while every other weight keeps the builder's block
  size. The head is the largest single weight (a quarter of the 0.8B's) and is read in full for
  every generated token.
- ``--weight-bits 2``: every weight but the LM head in 2 bits (MatMulNBits ``bits=2``). The head
  keeps the builder's 4 bits, as llama.cpp's Q2_K keeps its output tensor wider, and because the
  tied embedding's GatherBlockQuantized reads the head's bytes and only takes 4 bits.

Run as ``python -m edgekit.builder.lowmem_quant [--lm-head-block-size N] [--weight-bits 2] <model builder arguments>``.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

import onnx
import onnx_ir as ir
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer
from onnxruntime.quantization.quant_utils import QuantFormat


def _streamable(model: Any) -> bool:
    """Whether the builder would use the plain default quantizer, which we reproduce exactly."""
    return (
        getattr(model, "quantization_algo", "default") == "default"
        and not getattr(model, "int4_customized_weight_config", None)
        and not getattr(model, "exact_quant_overrides", None)
        and not getattr(model, "exact_quant_override_names", None)
        and not model.quant_attrs["use_qdq"]
        and model.quant_type is None
    )


LM_HEAD = "/lm_head/MatMul"


def _quantizer(attrs: dict, block_size: int, bits: int) -> DefaultWeightOnlyQuantizer:
    return DefaultWeightOnlyQuantizer(
        DefaultWeightOnlyQuantConfig(
            block_size=block_size,
            is_symmetric=attrs["is_symmetric"],
            accuracy_level=attrs["accuracy_level"],
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=tuple(attrs["op_types_to_quantize"]),
            bits=bits,
        )
    )


def quantize_in_place(model: Any, lm_head_block_size: int | None = None, weight_bits: int | None = None) -> ir.Model:
    """Quantize ``model.model``'s eligible MatMul weights node by node; return the graph.

    ``lm_head_block_size`` quantizes the LM head with its own block size, ``weight_bits`` every
    other weight with its own bit width (see the module notes).
    """
    attrs = model.quant_attrs
    quantizer = _quantizer(attrs, attrs["matmul_block_size"], weight_bits or attrs["bits"])
    head_quantizer = _quantizer(attrs, lm_head_block_size or attrs["matmul_block_size"], attrs["bits"])
    graph = model.model.graph
    excluded = set(attrs["nodes_to_exclude"])
    for node in list(graph):
        if node.op_type != "MatMul" or node.name in excluded or "MatMul" not in attrs["op_types_to_quantize"]:
            continue
        weight = node.inputs[1]
        if weight is None or weight.const_value is None:
            continue
        # The float weight exists in full only here, for this one tensor.
        holder = onnx.GraphProto()
        holder.initializer.append(ir.serde.serialize_tensor(weight.const_value))
        chosen = head_quantizer if node.name == LM_HEAD else quantizer
        [replacement] = chosen.quantize(ir.serde.serialize_node(node), [holder])
        if replacement.op_type == "MatMul":
            continue  # the quantizer declined (e.g. not 2-D): keep the float MatMul
        inputs = [node.inputs[0]]
        for tensor in list(holder.initializer)[1:]:
            # make_value returns the value other nodes already name (the tied embedding's
            # GatherBlockQuantized reads the LM head's quantized weight by name).
            value = model.make_value(tensor.name)
            # Copied out as numpy: a tensor wrapping the proto would keep `holder`, and with it the
            # float weight, alive for the rest of the build.
            value.const_value = ir.Tensor(onnx.numpy_helper.to_array(tensor), name=tensor.name)
            value.dtype = value.const_value.dtype
            value.shape = ir.Shape(value.const_value.shape)
            graph.register_initializer(value)
            inputs.append(value)
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in replacement.attribute}
        new_node = ir.node(replacement.op_type, inputs=inputs, attributes=attributes, domain=replacement.domain,
                           name=replacement.name, num_outputs=1)
        old_output, new_output = node.outputs[0], new_node.outputs[0]
        new_output.dtype, new_output.shape = old_output.dtype, old_output.shape
        graph.insert_after(node, new_node)
        ir.convenience.replace_all_uses_with(old_output, new_output, replace_graph_outputs=True)
        new_output.name = old_output.name
        graph.remove(node, safe=True)
        if not weight.uses():
            # Drop every reference, including the builder's name -> value map, so the float
            # weight (and the checkpoint tensor its lazy conversion holds) is freed now.
            graph.initializers.pop(weight.name)
            model.values.pop(weight.name, None)
            weight.const_value = None
    if lm_head_block_size:
        _match_tied_lookup(graph, lm_head_block_size)
    return model.model


def _match_tied_lookup(graph: ir.Graph, block_size: int) -> None:
    """Give the tied embedding's GatherBlockQuantized the LM head's block size: it reads the head's
    quantized weight and scales, whose layout the block size decides."""
    for node in graph:
        if node.op_type == "GatherBlockQuantized" and any(
            value is not None and value.name is not None and value.name.startswith("lm_head.") for value in node.inputs
        ):
            node.attributes["block_size"] = ir.AttrInt64("block_size", block_size)


def _own_option(name: str) -> int | None:
    """Take ``name N`` out of the command line (the builder would refuse it); return N."""
    if name not in sys.argv:
        return None
    at = sys.argv.index(name)
    value = int(sys.argv[at + 1])
    del sys.argv[at : at + 2]
    return value


def main() -> None:
    """Patch the builder's quantization pass, then run the builder's command line."""
    import onnxruntime_genai.models.builder  # noqa: F401  (puts the builder's own modules on sys.path)
    from builders import base

    lm_head_block_size, weight_bits = _own_option("--lm-head-block-size"), _own_option("--weight-bits")
    original = base.Model.to_nbits

    def to_nbits(self: Any) -> ir.Model:
        if _streamable(self):
            return quantize_in_place(self, lm_head_block_size, weight_bits)
        if lm_head_block_size or weight_bits:
            raise SystemExit(
                "--lm-head-block-size and --weight-bits need the default quantization algorithm (no k_quant, rtn or mixed precision)"
            )
        return original(self)

    base.Model.to_nbits = to_nbits
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
