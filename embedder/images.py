"""Safe image decoding: bounded bytes and pixels, EXIF orientation, RGB on white."""

from __future__ import annotations

import hashlib
import io
import os
import stat
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
    """The bytes of an image given as bytes or a path, within `limits.max_bytes`.

    Only regular files are read, and never more than the limit: a catalog row (or a file swapped
    for a symlink after indexing) naming /dev/zero, a FIFO or /proc/... must not exhaust memory or
    block the reader, and st_size is 0 for all of those.
    """
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        try:
            info = path.stat()
        except FileNotFoundError:
            raise ImageDecodeError("missing", f"image file not found: {path}") from None
        except OSError as exc:
            raise ImageDecodeError("unreadable", f"cannot read {path}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
            raise ImageDecodeError("unreadable", f"{path} is not a regular file ({kind})")
        if info.st_size > limits.max_bytes:
            raise ImageDecodeError("too_large", f"image is {info.st_size} bytes; the limit is {limits.max_bytes}")
        try:
            # O_NONBLOCK: should the path have become a FIFO since the stat, open() must not wait.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise ImageDecodeError("unreadable", f"{path} is not a regular file")
                data = fh.read(limits.max_bytes + 1)
        except OSError as exc:
            raise ImageDecodeError("unreadable", f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) == 0:
        raise ImageDecodeError("empty", "image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        if not isinstance(source, bytes):  # the file grew since the stat; the read stopped at limit + 1
            raise ImageDecodeError("too_large", f"image is over the {limits.max_bytes}-byte limit")
        raise ImageDecodeError("too_large", f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    return data


def image_data(source: ImageSource, limits: ImageLimits) -> bytes | Image.Image:
    """Bytes to decode (read from disk if a path), or an already-decoded image as is."""
    return source if isinstance(source, Image.Image) else read_image_bytes(source, limits)


def content_hash(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read afresh in 1 MiB blocks (published artifacts are checked with
    it: a file corrupted in place can keep its size and mtime, so no cache may answer)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def decode_image(data: bytes | Image.Image, limits: ImageLimits) -> Image.Image:
    """Decode to an RGB image, refusing decompression bombs before any pixel is decoded."""
    if isinstance(data, Image.Image):
        img = data
    else:
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            kind = _claimed_format(data)
            if kind:  # the signature of an image format, but Pillow cannot even read its header
                raise ImageDecodeError("broken", f"a damaged {kind} file: its header cannot be read") from None
            raise ImageDecodeError("not_an_image", _unrecognised(data)) from None
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


# The one list of image formats Prism accepts (uploads, catalog files, search queries); error
# messages, the API schema and the README name these.
ACCEPTED_IMAGE_FORMATS = ("PNG", "JPEG", "WebP", "GIF", "BMP", "TIFF")
ACCEPTED_IMAGE_FORMATS_TEXT = ", ".join(ACCEPTED_IMAGE_FORMATS[:-1]) + " or " + ACCEPTED_IMAGE_FORMATS[-1]

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)


def _claimed_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _SIGNATURES if data.startswith(magic)), None)


def _unrecognised(data: bytes) -> str:
    head = data[:1024].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head) or b"<!doctype svg" in head:
        # Rasterising SVG would mean running a renderer (external references, scripts, entity
        # expansion) on untrusted input; product photos are raster images anyway.
        return f"not a recognised image format: SVG (vector) images are not supported; send {ACCEPTED_IMAGE_FORMATS_TEXT}"
    return f"not a recognised image format; send {ACCEPTED_IMAGE_FORMATS_TEXT}"


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Product shots and icons with alpha are shown on white; composite the same way.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16/32-bit greyscale: map the format's range to 8 bits (Pillow's own conversion clips at
        # 255). Not by the image's brightest pixel: that would brighten a dark photo and make its
        # embedding differ from the same photo saved with 8 bits.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            low, high = float(arr.min()), float(arr.max())  # 32-bit values of no known range
            arr = (arr - low) * (255.0 / ((high - low) or 1.0))
        elif img.mode == "I" and arr.max() <= 255:
            pass  # 8-bit values held in a 32-bit image (e.g. convert("I") of an "L" image)
        else:
            arr = arr / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype("uint8")).convert("RGB")
    return img.convert("RGB")
