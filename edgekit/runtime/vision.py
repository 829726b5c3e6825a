"""The vision encoder of a bundle, and where its embeddings go in a prompt.

The build exports ``model.visual`` (patch embedding, blocks, merger) as ``vision.onnx``. Its inputs
that depend on the image's grid are computed here in numpy, exactly as transformers computes them:
the bilinear taps that resample the learned position table to the grid, and each patch's (row,
column) for the 2-D rotary embedding. One image per run, so the attention spans all its patches and
no ``cu_seqlens`` is needed.

In the prompt, an image is ``<|vision_start|>`` + one ``<|image_pad|>`` per embedding +
``<|vision_end|>``. The text model reads the encoder's embeddings in place of the pads, with
M-RoPE positions on three rows (temporal, height, width): from the image's start position p, the
embedding at merged row r and column c sits at (p, p + r, p + c), and the text after the image
resumes at p + max(rows, columns). From there on a position is no longer a token index.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgekit.errors import EdgekitError
from edgekit.runtime.images import PREPROCESSOR_FILE, Patches, Preprocessing
from edgekit.runtime.resident import session_options

VISION_GRAPH = "vision.onnx"
METADATA_KEY = "edgekit.vision"  # the graph's custom metadata: a JSON object (VisionSpec)
INPUTS = ("pixel_values", "interp_indices", "interp_weights", "position_ids")
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


@dataclass(frozen=True)
class VisionSpec:
    """What the runtime needs to feed the encoder graph, stored in the graph itself at build time."""

    num_grid_per_side: int  # the learned position table is this many patches square
    merge_size: int
    out_hidden: int
    precision: str  # fp32, fp16 or int8

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_metadata(cls, graph: Path, metadata: dict[str, str]) -> VisionSpec:
        try:
            data = json.loads(metadata[METADATA_KEY])
            return cls(int(data["num_grid_per_side"]), int(data["merge_size"]), int(data["out_hidden"]),
                       str(data["precision"]))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise EdgekitError(f"{graph}: the vision graph lacks valid {METADATA_KEY} metadata ({exc!r})") from exc


def patch_rows_cols(grid: tuple[int, int, int], merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Each patch's row and column in the image grid, in the encoder's merge-block order."""
    t, h, w = grid
    within = np.arange(t * h * w, dtype=np.int64) % (h * w)
    blocks_w = w // merge
    row = (within // (merge * merge * blocks_w)) * merge + (within // merge) % merge
    col = ((within // (merge * merge)) % blocks_w) * merge + within % merge
    return row, col


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (align_corners) from ``size`` grid positions into a ``side``-long table, in
    float32 as transformers computes them (so the weights are bit-identical)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0, None)
    return taps, weights.astype(np.float32)


def encoder_feed(patches: Patches, spec: VisionSpec) -> dict[str, np.ndarray]:
    """The encoder graph's inputs for one image."""
    side = spec.num_grid_per_side
    _, h, w = patches.grid
    row, col = patch_rows_cols(patches.grid, spec.merge_size)
    h_taps, h_weights = _axis_taps(row, h, side)
    w_taps, w_weights = _axis_taps(col, w, side)
    return {
        "pixel_values": patches.pixel_values,
        "interp_indices": (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4),
        "interp_weights": (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4),
        "position_ids": np.stack([row, col], axis=-1),
    }


@dataclass
class ImageSpan:
    """An image's embeddings and where they go: ``offset`` is the index, in the prompt's ids, of its
    first ``<|image_pad|>``; ``grid`` is in patches (temporal, height, width)."""

    offset: int
    embeds: np.ndarray  # [tokens, hidden]
    grid: tuple[int, int, int]
    merge: int

    @property
    def rows_cols(self) -> tuple[int, int]:
        """The merged grid: how many embedding rows and columns the image makes."""
        return self.grid[1] // self.merge, self.grid[2] // self.merge


def prompt_positions(start: int, count: int, images: Sequence[ImageSpan] = ()) -> tuple[np.ndarray, int]:
    """M-RoPE positions [3, count] for ``count`` tokens whose first sits at position ``start``, and the
    position of the token after them (transformers' ``get_rope_index``)."""
    positions = np.empty((3, count), np.int64)
    cursor, at = start, 0
    for span in sorted(images, key=lambda s: s.offset):
        text = span.offset - at
        positions[:, at : span.offset] = np.arange(cursor, cursor + text)
        cursor += text
        rows, cols = span.rows_cols
        end = span.offset + rows * cols
        positions[0, span.offset : end] = cursor
        positions[1, span.offset : end] = cursor + np.repeat(np.arange(rows), cols)
        positions[2, span.offset : end] = cursor + np.tile(np.arange(cols), rows)
        cursor += max(rows, cols)
        at = end
    positions[:, at:] = np.arange(cursor, cursor + count - at)
    return positions, cursor + count - at


class VisionEncoder:
    """A bundle's vision encoder, loaded on the first image and released after ``idle_s`` unused
    (its weights are most of a vision bundle's extra memory: about 0.1 GB in int8 on the 0.8B)."""

    def __init__(self, folder: Path, threads: int | None = None, max_pixels: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        """``max_pixels``: resize images to at most this many pixels (the bundle's profile's cap) where
        that is below the image processor's own bound. ``providers``: ONNX Runtime's execution
        providers, in order (a CUDA bundle's fp16 encoder runs where its text model does)."""
        self.graph = folder / VISION_GRAPH
        if not self.graph.is_file():
            raise EdgekitError(f"{folder}: this bundle has no vision encoder ({VISION_GRAPH}); it was built text-only")
        processing = Preprocessing.from_file(folder / PREPROCESSOR_FILE)
        if max_pixels is not None and max_pixels < processing.max_pixels:
            processing = replace(processing, max_pixels=max_pixels, min_pixels=min(processing.min_pixels, max_pixels))
        self.processing = processing
        self.threads = threads or 0
        self.providers = list(providers)
        self._session: ort.InferenceSession | None = None
        self._spec: VisionSpec | None = None
        self._lock = threading.Lock()
        self.last_used = 0.0

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def _load(self) -> tuple[ort.InferenceSession, VisionSpec]:
        if self._session is None or self._spec is None:
            try:
                session = ort.InferenceSession(str(self.graph), session_options(self.threads), providers=self.providers)
            except Exception as exc:  # onnxruntime raises its own exception types per failure
                raise EdgekitError(f"{self.graph}: cannot load the vision encoder ({exc})") from exc
            self._spec = VisionSpec.from_metadata(self.graph, session.get_modelmeta().custom_metadata_map)
            self._session = session
        return self._session, self._spec

    def encode(self, patches: Patches) -> np.ndarray:
        """The image's embeddings [tokens, out_hidden], float32."""
        with self._lock:
            session, spec = self._load()
            self.last_used = time.monotonic()
            if patches.merge_size != spec.merge_size:
                raise EdgekitError(f"{self.graph}: patches merged by {patches.merge_size}, the encoder merges by {spec.merge_size}")
            embeds = session.run(None, encoder_feed(patches, spec))[0]
            self.last_used = time.monotonic()
            return embeds.astype(np.float32, copy=False)

    def release(self) -> bool:
        """Unload the encoder (it loads again on the next image); True when it was loaded."""
        with self._lock:
            loaded = self._session is not None
            self._session = None
            return loaded

    def release_if_idle(self, idle_s: float) -> bool:
        """Unload when no image came for ``idle_s`` seconds; True when it did."""
        if self._session is None or time.monotonic() - self.last_used < idle_s:
            return False
        return self.release()


def place_images(ids: list[int], pad_id: int, images: Sequence[Patches], encoder: VisionEncoder) -> tuple[list[int], list[ImageSpan]]:
    """Expand each ``<|image_pad|>`` of a rendered prompt into one pad per embedding of its image (in
    order of appearance) and encode the images; return the ids and where the embeddings go."""
    pads = [i for i, token in enumerate(ids) if token == pad_id]
    if len(pads) != len(images):
        raise EdgekitError(f"the prompt holds {len(pads)} image placeholders for {len(images)} images "
                           "(an image_pad token typed as text, or a chat template that drops images)")
    expanded: list[int] = []
    spans: list[ImageSpan] = []
    at = 0
    for pad, patches in zip(pads, images):
        expanded += ids[at:pad]
        embeds = encoder.encode(patches)
        spans.append(ImageSpan(len(expanded), embeds, patches.grid, patches.merge_size))
        expanded += [pad_id] * len(embeds)
        at = pad + 1
    return expanded + ids[at:], spans
