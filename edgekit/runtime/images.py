"""Images for the vision encoder, without torch: decode safely with Pillow, then resize, normalise and
cut patches with numpy exactly as transformers' PIL-based Qwen image processor does.

The reference is ``Qwen2VLImageProcessorPil`` (what transformers picks for ``qwen3_5`` when asked
for its "pil" backend); its default "fast" processor needs torchvision. Given the same RGB image,
ours produces the same ``pixel_values`` bit for bit (tests/test_vision.py checks varied sizes and
aspect ratios): both resize with Pillow's bicubic filter on 8-bit data.

Decoding is where untrusted bytes meet a C library, so it is guarded: the format and the
dimensions are read from the header, and an image with too many pixels is refused before it is
decoded (a small file can claim a huge canvas: a decompression bomb).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    from PIL import Image

# Pillow is imported by the functions that decode: a daemon that never sees an image never loads it
# (3.6 MiB of RSS, against a text-only target with little to spare; docs/vision.md).

PREPROCESSOR_FILE = "preprocessor_config.json"
FORMATS = ("JPEG", "PNG", "WEBP")
_MIME = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}


class ImageError(EdgekitError):
    """An image the device refuses: corrupt, of an unsupported format, or over a limit."""


@dataclass(frozen=True)
class ImageLimits:
    """What one image may be: bytes as sent, and pixels as its header declares them (before resizing)."""

    max_bytes: int = 4 * 1024 * 1024
    max_pixels: int = 40_000_000  # a 48 MP phone photo is over; a 4K frame (8.3 MP) is well under

    def check_size(self, size: int, where: str) -> None:
        if size > self.max_bytes:
            raise ImageError(f"{where}: image of {size} bytes exceeds the limit of {self.max_bytes} bytes")


@dataclass(frozen=True)
class Preprocessing:
    """The image processor's settings, as a checkpoint's ``preprocessor_config.json`` states them."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    min_pixels: int = 65_536
    max_pixels: int = 16_777_216

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this (a merged patch's side in pixels)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_file(cls, path: Path) -> Preprocessing:
        """Read a ``preprocessor_config.json`` (the fields the Qwen image processor uses)."""
        try:
            data = json.loads(path.read_text())
            size = data.get("size") or {}
            return cls(
                patch_size=int(data.get("patch_size", cls.patch_size)),
                temporal_patch_size=int(data.get("temporal_patch_size", cls.temporal_patch_size)),
                merge_size=int(data.get("merge_size", cls.merge_size)),
                mean=_triple(data.get("image_mean", cls.mean)),
                std=_triple(data.get("image_std", cls.std)),
                min_pixels=int(data.get("min_pixels") or size.get("shortest_edge", cls.min_pixels)),
                max_pixels=int(data.get("max_pixels") or size.get("longest_edge", cls.max_pixels)),
            )
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
            raise EdgekitError(f"{path}: not a usable image processor config ({exc})") from exc

    def to_json(self) -> dict:
        """The config as transformers' processor reads it."""
        return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
                "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                "merge_size": self.merge_size, "image_mean": list(self.mean), "image_std": list(self.std),
                "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
                "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "do_convert_rgb": True, "resample": 3}


def _triple(values: object) -> tuple[float, float, float]:
    if not (isinstance(values, list | tuple) and len(values) == 3):
        raise ValueError(f"expected three channel values, got {values!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


@dataclass
class Patches:
    """An image cut for the encoder: ``pixel_values`` [patches, channels x temporal x patch x patch],
    in merge-block order, and its grid (temporal, height, width) in patches."""

    pixel_values: np.ndarray
    grid: tuple[int, int, int]
    merge_size: int

    @property
    def tokens(self) -> int:
        """How many embeddings (prompt tokens) the encoder makes of it."""
        t, h, w = self.grid
        return t * h * w // (self.merge_size * self.merge_size)


def data_url_bytes(url: str, where: str) -> bytes:
    """The image in a ``data:image/...;base64,`` URL. Remote URLs are refused: the device fetches nothing."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0][:20] if ":" in url else "no scheme"
        raise ImageError(f"{where}: only data: URLs and sha256: references to uploaded images are accepted "
                         f"(got {scheme}); the device never fetches a URL")
    head, sep, body = url[5:].partition(",")
    mime, _, encoding = head.partition(";")
    if not sep or encoding != "base64":
        raise ImageError(f"{where}: a data URL must be 'data:<image type>;base64,<data>'")
    if mime.lower() not in _MIME:
        raise ImageError(f"{where}: image type {mime or '(none)'!r} is not supported (JPEG, PNG or WebP)")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{where}: the data URL's base64 does not decode ({exc})") from None


def open_image(data: bytes, limits: ImageLimits, where: str) -> Image.Image:
    """Read an image's header and check it against ``limits``; nothing is decoded yet."""
    from PIL import Image, UnidentifiedImageError

    limits.check_size(len(data), where)
    with warnings.catch_warnings():
        # Our own pixel limit applies; Pillow's bomb warning would only repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
        except UnidentifiedImageError:
            raise ImageError(f"{where}: not an image, or not one of {', '.join(FORMATS)}") from None
        except Image.DecompressionBombError as exc:  # Pillow's own limit, far above ours, checked at open
            raise ImageError(f"{where}: image declares more pixels than the limit of {limits.max_pixels} pixels ({exc})") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"{where}: cannot read the image header ({exc})") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageError(f"{where}: image of {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels")
    if width < 1 or height < 1 or max(width, height) / min(width, height) > 200:
        raise ImageError(f"{where}: image of {width}x{height} pixels: the aspect ratio must be under 200:1")
    return image


def load_rgb(data: bytes, limits: ImageLimits, where: str) -> Image.Image:
    """Decode an image to 8-bit RGB: EXIF orientation applied, the first frame of an animation,
    transparency composited onto white (as transformers does), CMYK and palettes converted."""
    from PIL import Image, ImageOps

    image = open_image(data, limits, where)
    try:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # 16-bit and float greyscale: scale to 8 bits rather than clip.
            image = Image.fromarray(_to_uint8(np.asarray(image)), mode="L")
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{where}: the image is corrupt or truncated ({exc})") from None


def _to_uint8(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    top = 65535.0 if values.max(initial=0) > 255 else 255.0
    return np.clip(np.rint(values * 255.0 / top), 0, 255).astype(np.uint8)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size the image is resized to: sides multiples of ``factor``, pixels within the bounds,
    the aspect ratio kept as nearly as those allow (transformers' rule, step for step)."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess(image: Image.Image, processing: Preprocessing) -> Patches:
    """Resize an RGB image to the model's pixel bounds, normalise it and cut it into patches."""
    from PIL import Image

    height, width = smart_resize(image.height, image.width, processing.factor, processing.min_pixels,
                                 processing.max_pixels)
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    # transformers rescales in float64 and normalises in float32: the same steps give the same bits.
    rescaled = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    normalised = (rescaled - np.asarray(processing.mean, np.float32)) / np.asarray(processing.std, np.float32)
    pixels = normalised.transpose(2, 0, 1)  # channels first
    p, m, t = processing.patch_size, processing.merge_size, processing.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    patches = pixels.reshape(3, grid_h // m, m, p, grid_w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    # One frame, repeated to fill the temporal patch as the processor does for still images.
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return Patches(np.ascontiguousarray(patches.reshape(grid_h * grid_w, 3 * t * p * p)), (1, grid_h, grid_w), m)
