"""Token embeddings read from the bundle's weights file with ``pread`` instead of through a mapping.

The exported graph looks up token embeddings itself (a GatherBlockQuantized over the tied,
4-bit vocabulary table), and ONNX Runtime reads that table through a memory mapping of the weights
file. Each row a prompt touches then maps whole page-cache folios around it, which count in the
process's RSS: ~150 MiB after a 4,000-token prompt of varied text on the 0.8B (a row is 640 bytes;
the kernel mapped ~40 KiB per distinct token). The build therefore also writes a second graph
(``<decoder>.embeds.onnx``, same weights file) that takes ``inputs_embeds``, and records in it where
the table's rows lie; the engine reads the rows it needs with ``pread`` (copies, nothing mapped) and
dequantizes them exactly as the graph's op would. ``model.onnx`` stays as it was for
onnxruntime-genai.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError

# Metadata key of the embeds graph under which the build records the table's layout (a JSON object).
LAYOUT_KEY = "edgekit.embedding"
INPUT = "inputs_embeds"
_DTYPES = {"uint8": np.uint8, "float32": np.float32, "float16": np.float16}


def embeds_graph(graph: Path) -> Path:
    """Where the build writes the embeds variant of the decoder graph ``graph``."""
    return graph.with_name(f"{graph.stem}.embeds{graph.suffix}")


class _Rows:
    """Fixed-size rows of one tensor stored row-major in a file."""

    def __init__(self, folder: Path, spec: dict[str, Any], rows: int) -> None:
        if Path(spec["file"]).name != spec["file"]:
            raise EdgekitError(f"{folder}: embedding table file {spec['file']!r} must be a file of the bundle folder")
        self.path = folder / spec["file"]
        self.offset = int(spec["offset"])
        self.row_bytes = int(spec["row_bytes"])
        self.dtype = np.dtype(_DTYPES[spec["dtype"]])
        try:
            self.file = self.path.open("rb", buffering=0)  # a file object: closed with the table
        except OSError as exc:
            raise EdgekitError(f"{self.path}: cannot open the embedding table ({exc.strerror})") from exc
        size = os.fstat(self.file.fileno()).st_size
        if self.offset + rows * self.row_bytes > size:
            self.file.close()
            raise EdgekitError(f"{self.path}: {size} bytes, too short for the embedding table recorded in the graph "
                               f"({rows} rows of {self.row_bytes} bytes from offset {self.offset})")

    def read(self, ids: np.ndarray) -> np.ndarray:
        """The rows ``ids`` as an array [len(ids), row_bytes / itemsize]."""
        fd = self.file.fileno()
        raw = b"".join(os.pread(fd, self.row_bytes, self.offset + int(i) * self.row_bytes) for i in ids)
        return np.frombuffer(raw, self.dtype).reshape(len(ids), -1)


class EmbeddingTable:
    """The token embedding table of an embeds graph, looked up row by row from the weights file."""

    def __init__(self, folder: Path, layout: dict[str, Any]) -> None:
        """``layout`` is the JSON the build stored under :data:`LAYOUT_KEY` in the embeds graph."""
        try:
            self.rows = int(layout["rows"])
            self.hidden = int(layout["hidden"])
            self.bits = int(layout.get("bits", 0))
            self.block_size = int(layout.get("block_size", 0))
            self.zero_point = float(layout.get("zero_point", 0))
            self._weights = _Rows(folder, layout["weights"], self.hidden if layout.get("transposed") else self.rows)
            self._scales = _Rows(folder, layout["scales"], self.rows) if self.bits else None
            # fp32 exports store the table as the tied LM head's [hidden, vocab]: a token's row is a
            # column there, read through a mapping (fp32 bundles are the exact reference, not what
            # devices run, so its pages in RSS matter less than elsewhere).
            self._columns = (np.memmap(self._weights.path, self._weights.dtype, "r", self._weights.offset,
                                       (self.hidden, self.rows)) if layout.get("transposed") else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgekitError(f"{folder}: the embeds graph's {LAYOUT_KEY} metadata is incomplete ({exc!r})") from exc
        self.dtype = self._scales.dtype if self._scales else self._weights.dtype

    @classmethod
    def from_metadata(cls, folder: Path, metadata: dict[str, str]) -> EmbeddingTable:
        """The table described by a session's custom metadata map."""
        try:
            layout = json.loads(metadata[LAYOUT_KEY])
        except (KeyError, json.JSONDecodeError) as exc:
            raise EdgekitError(f"{folder}: the embeds graph lacks valid {LAYOUT_KEY} metadata ({exc!r})") from exc
        return cls(folder, layout)

    def lookup(self, ids: Sequence[int]) -> np.ndarray:
        """Embeddings of ``ids``: [1, len(ids), hidden], as the graph's lookup op computes them."""
        index = np.asarray(ids, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.rows):
            bad = int(index[(index < 0) | (index >= self.rows)][0])
            raise EdgekitError(f"token id {bad} is outside the embedding table (0..{self.rows - 1})")
        # A prompt repeats tokens: read each distinct row once.
        unique, inverse = np.unique(index, return_inverse=True)
        if self._columns is not None:
            return np.ascontiguousarray(self._columns[:, unique].T[inverse])[None]
        weights = self._weights.read(unique)
        if self._scales is None:
            return weights[inverse][None]
        if self.bits == 4:  # two per byte, the first in the low nibble
            values = np.empty((len(unique), weights.shape[1] * 2), np.uint8)
            values[:, 0::2] = weights & 0x0F
            values[:, 1::2] = weights >> 4
        else:
            values = weights
        scales = np.repeat(self._scales.read(unique).astype(np.float32), self.block_size, axis=1)[:, : self.hidden]
        rows = ((values.astype(np.float32) - np.float32(self.zero_point)) * scales).astype(self.dtype)
        return rows[inverse][None]
