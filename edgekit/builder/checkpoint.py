"""Find a Qwen3.5 checkpoint (local folder or Hugging Face id) and read what the build needs from it.

Hub ids go through ``huggingface_hub.snapshot_download``, so its cache, revisions, tokens and offline
mode (``HF_HUB_OFFLINE=1``) behave as users know them. Anything that is not a Qwen3.5 checkpoint, or
whose weights cannot be read, is refused before the expensive export starts.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.validation import read_json

ARCHITECTURE = "Qwen3_5ForConditionalGeneration"
# What a build reads; READMEs and the video processor's config stay on the hub.
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                "preprocessor_config.json"]
VISION_PREFIX = "model.visual."
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class VisionShape:
    """The vision encoder's dimensions, enough to size its weights and its activations per image."""

    depth: int
    hidden: int
    intermediate: int
    heads: int
    out_hidden: int
    patch_size: int
    temporal_patch_size: int
    channels: int
    positions: int
    merge_size: int

    def matmul_params(self) -> int:
        """Parameters in the blocks' and the merger's projections (what int8 quantizes)."""
        h, merged = self.hidden, self.hidden * self.merge_size ** 2
        return self.depth * (4 * h * h + 2 * h * self.intermediate) + merged * merged + merged * self.out_hidden

    def other_params(self) -> int:
        """The patch embedding and the learned position table (kept in float)."""
        return self.hidden * self.channels * self.temporal_patch_size * self.patch_size ** 2 + self.positions * self.hidden

    def activation_bytes(self, max_pixels: int) -> int:
        """Peak activations for the largest image, linear in its patches: the exported attention is a
        flash attention (builder/vision.py). Measured on the 0.8B at 2,352 patches: +128 MiB; this
        rule says 188 MB."""
        patches = max_pixels // self.patch_size ** 2
        return patches * (4 * self.intermediate + 10 * self.hidden) * 4


@dataclass(frozen=True)
class ModelShape:
    """The text model's dimensions, enough to size weights, KV cache and recurrent state."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    full_attention_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    linear_key_heads: int
    linear_value_heads: int
    linear_key_dim: int
    linear_value_dim: int
    conv_kernel: int
    tied_embeddings: bool
    vision: VisionShape | None = None  # None: the config declares no vision tower

    @property
    def linear_layers(self) -> int:
        return self.layers - self.full_attention_layers

    def matmul_params(self) -> int:
        """Parameters in the decoder's projection matrices (what MatMulNBits quantizes), LM head excluded."""
        h = self.hidden
        qk = self.linear_key_heads * self.linear_key_dim
        v = self.linear_value_heads * self.linear_value_dim
        linear = h * (2 * qk + v) + h * v + 2 * h * self.linear_value_heads + v * h
        # Qwen3.5's attention output is gated: q_proj yields queries and gates, twice the width.
        full = h * 2 * self.heads * self.head_dim + 2 * h * self.kv_heads * self.head_dim + self.heads * self.head_dim * h
        mlp = 3 * h * self.intermediate
        return self.linear_layers * linear + self.full_attention_layers * full + self.layers * mlp

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        return 2 * self.full_attention_layers * self.kv_heads * self.head_dim * dtype_bytes

    def state_bytes(self, dtype_bytes: int = 4) -> int:
        """Fixed per-sequence state of the linear-attention layers: recurrent matrices and conv windows."""
        recurrent = self.linear_value_heads * self.linear_key_dim * self.linear_value_dim
        conv_dim = 2 * self.linear_key_heads * self.linear_key_dim + self.linear_value_heads * self.linear_value_dim
        conv = conv_dim * (self.conv_kernel - 1)
        return self.linear_layers * (recurrent + conv) * dtype_bytes


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint folder and what we know of it."""

    path: Path
    model_id: str
    revision: str | None
    shape: ModelShape
    has_mtp: bool
    weight_files: tuple[str, ...]
    config: dict
    has_vision: bool = False  # the vision tower's weights (``model.visual.*``) are there


def resolve(model: str, revision: str | None = None, config_only: bool = False) -> tuple[Path, str, str | None]:
    """Return (folder, model id, revision) for a local folder or a Hugging Face id.

    ``config_only`` fetches just ``config.json`` from the hub, so a model that cannot fit the device
    is refused before gigabytes are downloaded. A hub download needs the ``build`` extra's
    huggingface_hub; offline mode serves from its cache.
    """
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise EdgekitError(f"model {model}: expected a checkpoint folder, got a file")
        return local.resolve(), model, revision
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise EdgekitError(f"model {model}: no such folder, and not a Hugging Face id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        folder = snapshot_download(repo_id=model, revision=revision,
                                   allow_patterns=["config.json"] if config_only else HUB_PATTERNS)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise EdgekitError(f"model {model}: not found on the Hugging Face Hub ({type(exc).__name__})") from exc
    except LocalEntryNotFoundError as exc:
        raise EdgekitError(
            f"model {model}: not in the local Hugging Face cache and the hub cannot be reached "
            "(offline?); pass a local checkpoint folder instead"
        ) from exc
    except HfHubHTTPError as exc:
        raise EdgekitError(f"model {model}: download failed: {exc}".splitlines()[0]) from exc
    folder_path = Path(folder)
    # The snapshot folder is named after the commit: record what was actually built.
    return folder_path, model, folder_path.name


def read_config(folder: Path) -> tuple[dict, ModelShape]:
    """Read and check ``folder/config.json`` as a Qwen3.5 config; return it and the text model's shape."""
    config_path = folder / "config.json"
    config = read_json(config_path, f"model {folder}: no config.json; not a Hugging Face checkpoint folder")
    architectures = config.get("architectures") or []
    if config.get("model_type") != "qwen3_5" or ARCHITECTURE not in architectures:
        found = ", ".join(architectures) or config.get("model_type") or "unknown"
        raise EdgekitError(
            f"{config_path}: not a Qwen3.5 checkpoint (found {found}; expected model_type qwen3_5, "
            f"architecture {ARCHITECTURE}, as Qwen/Qwen3.5-0.8B and Qwen/Qwen3.5-2B have)"
        )
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise EdgekitError(f"{config_path}: field 'text_config' missing; a Qwen3.5 config nests the text model there")
    return config, _shape(text, config, config_path)


def inspect(folder: Path, model_id: str | None = None, revision: str | None = None) -> Checkpoint:
    """Check that ``folder`` holds a readable Qwen3.5 checkpoint (config, tokenizer, weights) and describe it."""
    config, shape = read_config(folder)
    text = config["text_config"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise EdgekitError(f"model {folder}: {name} missing; the bundle needs the checkpoint's tokenizer")
    tensors = _read_safetensors_headers(folder)
    has_mtp = int(text.get("mtp_num_hidden_layers", 0) or 0) > 0 and any(n.startswith("mtp.") for n in tensors)
    if not any(n.endswith("embed_tokens.weight") for n in tensors):
        raise EdgekitError(f"model {folder}: the weights hold no embed_tokens tensor; incomplete checkpoint")
    return Checkpoint(
        path=folder,
        model_id=model_id or str(folder),
        revision=revision,
        shape=shape,
        has_mtp=has_mtp,
        weight_files=tuple(sorted({f for f in tensors.values()})),
        config=config,
        has_vision=isinstance(config.get("vision_config"), dict) and any(n.startswith(VISION_PREFIX) for n in tensors),
    )


def _shape(text: dict, config: dict, where: Path) -> ModelShape:
    def need(key: str) -> int:
        value = text.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise EdgekitError(f"{where}: field 'text_config.{key}' must be a positive integer (got {value!r})")
        return value

    layers = need("num_hidden_layers")
    layer_types = text.get("layer_types") or []
    if len(layer_types) != layers:
        raise EdgekitError(f"{where}: field 'text_config.layer_types' must list {layers} layers (got {len(layer_types)})")
    return ModelShape(
        vocab=need("vocab_size"),
        hidden=need("hidden_size"),
        intermediate=need("intermediate_size"),
        layers=layers,
        full_attention_layers=layer_types.count("full_attention"),
        heads=need("num_attention_heads"),
        kv_heads=need("num_key_value_heads"),
        head_dim=need("head_dim"),
        linear_key_heads=need("linear_num_key_heads"),
        linear_value_heads=need("linear_num_value_heads"),
        linear_key_dim=need("linear_key_head_dim"),
        linear_value_dim=need("linear_value_head_dim"),
        conv_kernel=need("linear_conv_kernel_dim"),
        tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        vision=_vision_shape(config.get("vision_config"), where),
    )


def _vision_shape(vision: object, where: Path) -> VisionShape | None:
    if not isinstance(vision, dict):
        return None

    def need(key: str, default: int | None = None) -> int:
        value = vision.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise EdgekitError(f"{where}: field 'vision_config.{key}' must be a positive integer (got {value!r})")
        return value

    return VisionShape(depth=need("depth"), hidden=need("hidden_size"), intermediate=need("intermediate_size"),
                       heads=need("num_heads"), out_hidden=need("out_hidden_size"), patch_size=need("patch_size", 16),
                       temporal_patch_size=need("temporal_patch_size", 2), channels=need("in_channels", 3),
                       positions=need("num_position_embeddings"), merge_size=need("spatial_merge_size", 2))


def _read_safetensors_headers(folder: Path) -> dict[str, str]:
    """Map tensor name to file, checking each file's header and that its data is all there."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EdgekitError(f"model {folder}: no *.safetensors weights (only safetensors checkpoints are supported)")
    names: dict[str, str] = {}
    for file in files:
        size = file.stat().st_size
        try:
            with file.open("rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                if header_len > min(size - 8, 100 * 1024**2):
                    raise ValueError("header length beyond the file")
                header = json.loads(handle.read(header_len))
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise EdgekitError(f"{file}: corrupt safetensors file ({exc})") from exc
        end = 0
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                begin, stop = meta["data_offsets"]
                count = 1
                for dim in meta["shape"]:
                    count *= dim
                if stop - begin != count * _SAFETENSORS_DTYPE_BYTES[meta["dtype"]]:
                    raise ValueError(f"tensor {name} has {stop - begin} bytes for shape {meta['shape']}")
            except (KeyError, TypeError, ValueError) as exc:
                raise EdgekitError(f"{file}: corrupt safetensors header ({exc})") from exc
            end = max(end, stop)
            names[name] = file.name
        if 8 + header_len + end != size:
            raise EdgekitError(
                f"{file}: corrupt or truncated safetensors file ({size} bytes, header promises {8 + header_len + end})"
            )
    return names
