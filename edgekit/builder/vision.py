"""Export a checkpoint's vision encoder (``model.visual``) to ``vision.onnx`` for one device profile.

onnxruntime-genai's model builder exports the text model only, so the encoder goes through
``torch.onnx.export``. transformers' own forward splits attention by ``cu_seqlens`` with
``.tolist()``, which a trace would freeze to one image size; the module below runs the same
submodules (patch embedding, learned positions, rotary embedding, blocks, merger) for one image
at a time, where the attention spans all patches, and takes the grid-dependent inputs that
transformers precomputes (``transformers.vision_utils``) as graph inputs. The runtime computes
them in numpy (:mod:`edgekit.runtime.vision`). The export is checked against transformers' own
``model.visual`` in fp32 on several grids before anything is written.

We use the TorchScript exporter (``dynamo=False``): the module is traceable, and the dynamo exporter
would add onnxscript to the build extra for no gain here. Attention is exported as ONNX Runtime's
``com.microsoft.MultiHeadAttention``, whose CPU kernel is a flash attention: it never holds the
patches x patches scores, which the plain MatMul-Softmax-MatMul graph materialises per head (on the
0.8B at 896 x 672: a run's peak +128 MiB instead of +323 MiB, and 12% faster; docs/vision.md).

Precision per profile: fp32 where the text model is fp32 (exactness), fp16 for CUDA, and otherwise
int8 (ONNX Runtime's dynamic quantization of the MatMul weights, per channel): on the 0.8B's encoder
a quarter of the size and about twice as fast as fp32 on this CPU (docs/vision.md has the figures).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.builder.checkpoint import VISION_PREFIX, Checkpoint
from edgekit.errors import EdgekitError
from edgekit.profiles import DeviceProfile
from edgekit.runtime.images import PREPROCESSOR_FILE, Patches, Preprocessing
from edgekit.runtime.vision import INPUTS, METADATA_KEY, VISION_GRAPH, VisionSpec, encoder_feed

# Grids (in patches) the export is checked on: square, wide, tall, and one odd in merged units.
CHECK_GRIDS: tuple[tuple[int, int], ...] = ((4, 4), (6, 10), (12, 4), (10, 14))
OPSET = 17


@dataclass(frozen=True)
class VisionReport:
    """How the exported encoder compares with transformers' fp32 ``model.visual``."""

    precision: str
    grids: int
    min_cosine: float  # of the image embeddings, per grid
    max_relative_error: float  # largest |export - reference| over the reference's largest |value|
    bytes: int
    passed: bool
    reason: str


def encoder_precision(profile: DeviceProfile) -> str:
    """The encoder's precision on this profile's device (see the module docstring)."""
    if profile.quantization.precision == "fp32":
        return "fp32"
    if profile.execution_provider == "cuda":
        return "fp16"
    return "int8"


def preprocessing(checkpoint: Checkpoint) -> tuple[Preprocessing, bool]:
    """The checkpoint's image processor settings, and whether they came from its own
    ``preprocessor_config.json`` (False: transformers' Qwen3-VL defaults, see Preprocessing)."""
    path = checkpoint.path / PREPROCESSOR_FILE
    if path.is_file():
        return Preprocessing.from_file(path), True
    vision = checkpoint.config["vision_config"]
    return Preprocessing(patch_size=int(vision.get("patch_size", 16)),
                         temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
                         merge_size=int(vision.get("spatial_merge_size", 2))), False


def _load_visual(checkpoint: Checkpoint):  # -> Qwen3_5VisionModel (transformers is imported lazily)
    """The checkpoint's vision tower alone, in fp32: the text model's weights stay on disk."""
    import torch
    from safetensors import safe_open
    from transformers import Qwen3_5Config
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    config = Qwen3_5Config(**checkpoint.config).vision_config
    with torch.device("cpu"):
        model = Qwen3_5VisionModel(config)  # type: ignore[arg-type]  # a Qwen3_5VisionConfig once constructed
    weights = {}
    for name in checkpoint.weight_files:
        with safe_open(str(checkpoint.path / name), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if key.startswith(VISION_PREFIX):
                    weights[key[len(VISION_PREFIX):]] = handle.get_tensor(key).float()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise EdgekitError(f"model {checkpoint.model_id}: the vision tower's weights do not match its config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.float().eval()


def _one_image_module(visual):
    """``visual``'s forward for one image, with the grid-dependent tensors as inputs."""
    import torch
    import torch.nn.functional as F
    from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb_vision

    class Attention(torch.autograd.Function):
        """Attention over all patches of q, k, v [1, patches, heads x head_dim]: computed by torch
        while tracing, exported as ONNX Runtime's fused op."""

        @staticmethod
        def forward(ctx, q, k, v, heads: int, scale: float):
            n = q.shape[1]
            q, k, v = (x.reshape(1, n, heads, -1).transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            return out.transpose(1, 2).reshape(1, n, -1)

        @staticmethod
        def symbolic(g, q, k, v, heads: int, scale: float):
            out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads, scale_f=scale)
            out.setType(q.type())  # the output is shaped like the queries
            return out

    class OneImage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = visual

        def forward(self, pixel_values, interp_indices, interp_weights, position_ids):
            v = self.visual
            hidden = v.patch_embed(pixel_values)
            hidden = hidden + (v.pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1)
            cos, sin = v.rotary_pos_emb(hidden, position_ids)
            for block in v.blocks:
                attn = block.attn
                x = block.norm1(hidden)
                n = x.shape[0]
                q, k, values = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
                out = Attention.apply(q.reshape(1, n, -1), k.reshape(1, n, -1), values.reshape(1, n, -1),
                                      attn.num_heads, attn.scaling)
                hidden = hidden + attn.proj(out[0])
                hidden = hidden + block.mlp(block.norm2(hidden))
            return v.merger(hidden)

    return OneImage().eval()


def _random_patches(grid: tuple[int, int], processing: Preprocessing, seed: int) -> Patches:
    rng = np.random.default_rng(seed)
    h, w = grid
    width = 3 * processing.temporal_patch_size * processing.patch_size ** 2
    # Normalised pixels lie in [-1, 1] with the usual mean/std of 0.5.
    return Patches(rng.uniform(-1, 1, (h * w, width)).astype(np.float32), (1, h, w), processing.merge_size)


def export(checkpoint: Checkpoint, bundle: Path, profile: DeviceProfile, work: Path) -> VisionReport:
    """Write ``vision.onnx`` and ``preprocessor_config.json`` into ``bundle``; return the encoder's
    parity against transformers (the caller gates on ``passed``)."""
    import torch
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    processing, _ = preprocessing(checkpoint)
    visual = _load_visual(checkpoint)
    precision = encoder_precision(profile)
    spec = VisionSpec(num_grid_per_side=visual.num_grid_per_side, merge_size=visual.spatial_merge_size,
                      out_hidden=int(checkpoint.config["vision_config"]["out_hidden_size"]), precision=precision)
    example = _random_patches(CHECK_GRIDS[0], processing, 0)
    feed = {name: torch.from_numpy(value) for name, value in encoder_feed(example, spec).items()}
    fp32 = work / "vision.fp32.onnx"
    dynamic = {name: {0: "patches"} for name in INPUTS} | {"image_embeds": {0: "tokens"}}
    with torch.inference_mode(), warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and its tracer's notes would scribble over the
        # build's progress display; the export is checked against transformers below.
        warnings.simplefilter("ignore")
        torch.onnx.export(_one_image_module(visual), tuple(feed[name] for name in INPUTS), str(fp32), dynamo=False,
                          input_names=list(INPUTS), output_names=["image_embeds"], dynamic_axes=dynamic,
                          opset_version=OPSET, custom_opsets={"com.microsoft": 1})
    graph = work / VISION_GRAPH
    _convert(fp32, graph, precision)
    _stamp(graph, spec)

    # The reference: transformers' own forward over the grid (its helpers, its attention split).
    references = []
    with torch.inference_mode():
        for i, grid in enumerate(CHECK_GRIDS):
            patches = _random_patches(grid, processing, i + 1)
            thw = torch.tensor([patches.grid])
            reference = visual(torch.from_numpy(patches.pixel_values), grid_thw=thw).pooler_output.numpy()
            # Our numpy grid inputs must equal transformers' helpers, bit for bit.
            ours = encoder_feed(patches, spec)
            indices, weights = get_vision_interpolation_indices_and_weights(
                thw, num_grid_per_side=spec.num_grid_per_side, mode="bilinear", align_corners=True,
                spatial_merge_size=spec.merge_size)
            positions = get_vision_position_ids(thw, spec.merge_size)
            if not (np.array_equal(ours["interp_indices"], indices.numpy()) and np.array_equal(ours["interp_weights"], weights.numpy())
                    and np.array_equal(ours["position_ids"], positions.numpy())):
                raise EdgekitError(f"the runtime's vision grid inputs differ from transformers' for grid {grid}: "
                                   "this transformers version computes them differently")
            references.append((patches, reference))
    del visual
    report = compare(graph, references, precision)
    bundle_graph = bundle / VISION_GRAPH
    os.replace(graph, bundle_graph)
    (bundle / PREPROCESSOR_FILE).write_text(json.dumps(processing.to_json(), indent=2) + "\n")
    return report


def _convert(fp32: Path, out: Path, precision: str) -> None:
    if precision == "fp32":
        os.replace(fp32, out)
        return
    if precision == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
        onnx.save(model, str(out))
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Its advice to pre-process the model (for static quantization) goes to the root logger, which
    # would print it over the build's progress display.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
    finally:
        logging.disable(logging.NOTSET)


def _stamp(graph: Path, spec: VisionSpec) -> None:
    """Record in the graph what the runtime needs to feed it."""
    import onnx

    model = onnx.load(str(graph))
    model.metadata_props.add(key=METADATA_KEY, value=spec.to_json())
    onnx.save(model, str(graph))


def compare(graph: Path, references: list[tuple[Patches, np.ndarray]], precision: str) -> VisionReport:
    """Run ``graph`` on each reference's patches; fp32 must match to float rounding, other precisions
    keep a cosine of at least 0.99 per image."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    spec = VisionSpec.from_metadata(graph, session.get_modelmeta().custom_metadata_map)
    cosines, errors = [], []
    for patches, reference in references:
        out = session.run(None, encoder_feed(patches, spec))[0].astype(np.float64)
        ref = reference.astype(np.float64)
        cosines.append(float((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref))))
        errors.append(float(np.abs(out - ref).max() / np.abs(ref).max()))
    min_cosine, max_error = min(cosines), max(errors)
    if precision == "fp32":
        passed = max_error < 1e-4
        reason = f"max relative error {max_error:.1e} {'<' if passed else '>='} 1e-4 against transformers fp32"
    else:
        passed = min_cosine >= 0.99
        reason = f"min cosine {min_cosine:.4f} {'>=' if passed else '<'} 0.99 against transformers fp32"
    return VisionReport(precision, len(references), round(min_cosine, 6), float(f"{max_error:.3g}"),
                        graph.stat().st_size, passed, reason)
