"""Safe image decoding: bounded bytes and pixels, EXIF orientation, RGB on white."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, Path, bytes, Image.Image]

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
# Resizing the short side to the model's input size blows a 1 x 2,000,000 strip up to gigabytes;
# no product photo is that thin.
DEFAULT_MAX_ASPECT = 50.0


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is a short machine-readable cause."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT


def read_image_bytes(source: str | Path | bytes, limits: ImageLimits) -> bytes:
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageDecodeError("missing", f"image file not found: {path}") from None
        except OSError as exc:
            raise ImageDecodeError("unreadable", f"cannot read {path}: {exc.strerror}") from None
        if size > limits.max_bytes:
            raise ImageDecodeError("too_large", f"image is {size} bytes; the limit is {limits.max_bytes}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageDecodeError("unreadable", f"cannot read {path}: {exc.strerror}") from None
    if len(data) == 0:
        raise ImageDecodeError("empty", "image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError("too_large", f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    return data


def image_data(source: ImageSource, limits: ImageLimits) -> bytes | Image.Image:
    """Bytes to decode (read from disk if a path), or an already-decoded image as is."""
    return source if isinstance(source, Image.Image) else read_image_bytes(source, limits)


def content_hash(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes | Image.Image, limits: ImageLimits) -> Image.Image:
    """Decode to an RGB image, refusing decompression bombs before any pixel is decoded."""
    if isinstance(data, Image.Image):
        img = data
    else:
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageDecodeError("not_an_image", "not a recognised image format") from None
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError("too_many_pixels", str(exc)) from None
        except Exception as exc:  # Pillow raises many types on hostile headers
            raise ImageDecodeError("broken", f"cannot open image: {exc}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("broken", "image has no pixels")
    if width * height > limits.max_pixels:
        raise ImageDecodeError(
            "too_many_pixels", f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels"
        )
    if max(width, height) > limits.max_aspect * min(width, height):
        raise ImageDecodeError(
            "bad_shape", f"image is {width}x{height} pixels; sides may differ by at most {limits.max_aspect:g}x"
        )
    try:
        img.seek(0)  # animated images: the first frame stands for the product
    except (EOFError, AttributeError, ValueError):
        pass
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from None
    except Exception as exc:
        raise ImageDecodeError("broken", f"cannot decode image: {exc}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Product shots and icons with alpha are shown on white; composite the same way.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than clip.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() or 1.0
        return Image.fromarray((arr * (255.0 / peak)).astype("uint8")).convert("RGB")
    return img.convert("RGB")
