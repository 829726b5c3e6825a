"""Estimate the RAM a bundle needs on a device, before anything heavy is built.

weights (quantized as the profile says) + KV cache for the profile's whole context (the runtime
preallocates it) + the linear-attention layers' fixed recurrent state + runtime overhead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgekit.builder.checkpoint import ModelShape
from edgekit.errors import EdgekitError
from edgekit.profiles import DeviceProfile, Quantization

MIB = 1024**2
# ONNX Runtime's arenas, the Python interpreter and our runtime modules: measured ~150 MiB RSS before
# the model's weights on x86-64; rounded up for other platforms' allocators.
RUNTIME_OVERHEAD = 200 * MIB


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by component; ``total`` is what must fit in the profile's model budget."""

    weights: int
    kv_cache: int
    state: int
    activations: int
    overhead: int
    budget: int
    # The vision encoder, when the bundle has one: its weights and one image of the profile's largest
    # size (it loads on the first image; text-only traffic never pays this).
    vision: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.state + self.activations + self.overhead + self.vision

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in asdict(self).items() if k != "budget")
        return f"{self.total / MIB:.0f} MiB ({parts}) against a budget of {self.budget / MIB:.0f} MiB"


def weight_bytes(shape: ModelShape, quantization: Quantization, io_bytes: int, block_sums: bool = False) -> int:
    """Resident bytes of the weights.

    Quantized exports store tied embeddings once, block-quantized and shared by the embedding lookup
    (read from the mapped file) and the LM head; each block carries one scale in the graph's I/O
    precision. ``block_sums``: ONNX Runtime's CPU kernels for accuracy level 4 (int8 compute) repack
    every block with a second fp32 value, the block's sum: 0.75 bytes per weight at block 32
    (measured: 537 MiB resident for the 0.8B's 751 M quantized weights).
    """
    q = quantization
    if q.precision in ("int2", "int4", "int8"):
        bits = {"int2": 2, "int4": 4, "int8": 8}[q.precision]
        # int2 keeps the LM head (the tied embedding) in 4 bits: see edgekit.builder.lowmem_quant.
        head_bits = 4 if q.precision == "int2" else bits
        per_block = io_bytes * (2 if block_sums else 1)
        head_block = q.lm_head_block_size or q.block_size
        return int(shape.matmul_params() * (bits / 8 + per_block / q.block_size)
                   + shape.embedding_params() * (head_bits / 8 + per_block / head_block))
    dense = {"fp32": 4, "fp16": 2}[q.precision]
    embeddings = shape.embedding_params() * (1 if shape.tied_embeddings else 2)
    return (shape.matmul_params() + embeddings) * dense


def vision_bytes(shape: ModelShape, profile: DeviceProfile) -> int:
    """The vision encoder's weights in the profile's precision (builder/vision.py) and the
    activations of one image of the profile's largest size; 0 without one."""
    vision = shape.vision
    if vision is None or not profile.vision.enabled:
        return 0
    if profile.quantization.precision == "fp32":
        per_weight = 4
    else:
        per_weight = 2 if profile.execution_provider == "cuda" else 1
    return (vision.matmul_params() * per_weight + vision.other_params() * 4
            + vision.activation_bytes(profile.vision.max_pixels))


def estimate(shape: ModelShape, profile: DeviceProfile, context_length: int | None = None) -> MemoryEstimate:
    """Estimate the memory of ``shape`` built and served with ``profile`` (with its vision encoder
    when the profile enables one and the model has it)."""
    context = context_length or profile.context_length
    q = profile.quantization
    # CPU graphs compute in fp32; CUDA int4/fp16 graphs in fp16.
    io_bytes = 4 if profile.execution_provider == "cpu" or q.precision == "fp32" else 2
    cpu_int8 = profile.execution_provider == "cpu" and q.accuracy_level == 4
    if cpu_int8 and q.int4_layout and q.precision == "int4" and q.block_size == 32:
        # edgekit's Int4Layout op (x86-64): an fp16 scale per block and no block sum, read where the
        # file is mapped: 0.5625 byte per weight.
        weights = weight_bytes(shape, q, 2)
    else:
        weights = weight_bytes(shape, q, io_bytes, block_sums=cpu_int8)
    return MemoryEstimate(
        weights=weights,
        kv_cache=shape.kv_bytes_per_token({"int8": 1, "fp16": 2}.get(q.kv_cache, io_bytes)) * context,
        # Each step overwrites the state in place: one set per sequence.
        state=shape.state_bytes(io_bytes),
        # One step's logits over the vocabulary plus a prefill chunk's hidden activations.
        activations=shape.vocab * 4 * 2 + 512 * shape.intermediate * 4 * 4,
        overhead=RUNTIME_OVERHEAD,
        budget=profile.model_budget_bytes,
        vision=vision_bytes(shape, profile),
    )


def check_fits(shape: ModelShape, profile: DeviceProfile, model: str, context_length: int | None = None) -> MemoryEstimate:
    """Return the estimate, or raise with the numbers when the model does not fit the device."""
    found = estimate(shape, profile, context_length)
    if not found.fits:
        text_only = ""
        if found.vision and found.total - found.vision <= found.budget:
            text_only = f"build --text-only (without its vision encoder, {found.vision / MIB:.0f} MiB, it fits), "
        raise EdgekitError(
            f"{model} does not fit profile {profile.name} ({profile.ram_gb:g} GB RAM, {profile.ram_share:.0%} for the model): "
            f"needs {found.describe()}; {text_only}choose a smaller model, a shorter context, a device with more RAM, "
            "or pass --force"
        )
    return found
