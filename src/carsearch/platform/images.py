"""Opening untrusted images safely: one decoder for training data, ingest and uploads.

Every image is fully decoded (so truncation shows up here, not later in a batch),
checked against per-call byte and pixel limits, and converted to 8-bit RGB
(greyscale, CMYK, palette, 16-bit; transparency is composited onto white).
Anything unusable raises `ImageRejectedError` whose `reason` starts with a short kind
("empty", "not-an-image", "truncated", "corrupt", "too-large", "too-many-pixels",
"decompression-bomb", "unreadable") followed by ": " and a detail.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from carsearch.platform.errors import ImageRejectedError

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 50_000_000

REJECTION_KINDS: tuple[str, ...] = (
    "empty",
    "not-an-image",
    "truncated",
    "corrupt",
    "too-large",
    "too-many-pixels",
    "decompression-bomb",
    "unreadable",
)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def rejection_kind(reason: str) -> str:
    """The short kind at the start of an `ImageRejectedError.reason`."""
    return reason.split(":", 1)[0].strip()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _wide_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit or float greyscale scaled into 8 bits (a plain convert clips)."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.size and arr.max() > 255):
        arr = arr / 257.0
    elif img.mode == "F" and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB version of a loaded image (transparency composited onto white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _WIDE_MODES:
        return _wide_to_l(img).convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _classify(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    low = text.lower()
    if "truncated" in low or isinstance(exc, EOFError) or "end of file" in low:
        return f"truncated: {text}"
    return f"corrupt: {type(exc).__name__}: {text}"


def _oriented(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # EXIF is metadata: never reject an image over it
        return img


def _decode(fp: IO[bytes], name: str, *, max_pixels: int) -> tuple[Image.Image, str]:
    """Open, size-check and fully decode one image; returns (RGB image, source mode)."""
    with warnings.catch_warnings():
        # PIL warns above its global limit and raises above twice that: both are
        # rejections here, on top of the per-call `max_pixels` check below.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageRejectedError(
                        f"too-many-pixels: {width}x{height} is over the limit of "
                        f"{max_pixels} pixels",
                        name,
                    )
                img.load()
                mode = img.mode
                rgb = to_rgb(_oriented(img))
                if rgb is img:
                    rgb = img.copy()
        except ImageRejectedError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejectedError(f"decompression-bomb: {exc}", name) from None
        except UnidentifiedImageError:
            raise ImageRejectedError("not-an-image: no decoder recognises it", name) from None
        except MemoryError:
            raise ImageRejectedError("too-many-pixels: out of memory decoding it", name) from None
        except Exception as exc:  # an untrusted-input boundary: any decoder failure
            raise ImageRejectedError(_classify(exc), name) from None
    return rgb, mode


def load_image_with_mode(
    path: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[Image.Image, str]:
    """Like `load_image`, also returning the mode the file was stored in ("L", "CMYK" ...)."""
    path = Path(path)
    name = str(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageRejectedError(f"unreadable: {exc.strerror or exc}", name) from None
    if size == 0:
        raise ImageRejectedError("empty: zero-byte file", name)
    if size > max_bytes:
        raise ImageRejectedError(f"too-large: {size} bytes is over the limit of {max_bytes}", name)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ImageRejectedError(f"unreadable: {exc.strerror or exc}", name) from None
    with fh:
        return _decode(fh, name, max_pixels=max_pixels)


def load_image(
    path: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Open an image file as fully decoded 8-bit RGB, or raise ImageRejectedError."""
    return load_image_with_mode(path, max_pixels=max_pixels, max_bytes=max_bytes)[0]


def load_image_bytes(
    data: bytes,
    *,
    name: str = "upload",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Decode an uploaded image held in memory, with the same checks as `load_image`."""
    if not data:
        raise ImageRejectedError("empty: zero bytes", name)
    if len(data) > max_bytes:
        raise ImageRejectedError(
            f"too-large: {len(data)} bytes is over the limit of {max_bytes}", name
        )
    return _decode(io.BytesIO(data), name, max_pixels=max_pixels)[0]


def clamp_box(
    box: tuple[float, float, float, float], size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) clamped to an image of `size`; None if nothing is left."""
    width, height = size
    left = min(max(round(box[0]), 0), width)
    top = min(max(round(box[1]), 0), height)
    right = min(max(round(box[2]), 0), width)
    bottom = min(max(round(box[3]), 0), height)
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


def crop_box(img: Image.Image, box: tuple[float, float, float, float] | None) -> Image.Image:
    """Crop to a (left, top, right, bottom) box in PIL's convention, clamped to the image.

    A box that leaves nothing inside the image (or None) gives the whole image back.
    """
    if box is None:
        return img
    clamped = clamp_box(box, img.size)
    if clamped is None or clamped == (0, 0, img.width, img.height):
        return img
    return img.crop(clamped)
