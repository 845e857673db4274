"""Opening untrusted images safely: one decoder for training data, ingest and uploads.

Every image is fully decoded (so truncation shows up here, not later in a batch),
checked against per-call byte and pixel limits, and converted to 8-bit RGB
(greyscale, CMYK, palette, 16-bit; transparency is composited onto white).

Bounded decoding. Given ``max_side``, the image comes back with its longer side at most
that many pixels: a JPEG is decoded at a reduced scale by libjpeg itself (Pillow's
``draft``: 1/2, 1/4 or 1/8 of the size, never below the bound), other formats are
reduced right after decoding, before any conversion. Every path that embeds an image
(ingest, re-index, promotion, image search, uploads) asks for ``DECODE_MAX_SIDE``, so an
image costs at most ~1.8 MB of pixels however many megapixels its file holds. 16-bit
and 32-bit greyscale is scaled to 8 bits in row blocks of float32 (about 5 bytes a
pixel at peak, not the ~27 of a float64 copy), after the reduction where there is one.
Anything unusable raises `ImageRejectedError` whose `reason` starts with a short kind
("empty", "not-an-image", "truncated", "corrupt", "too-large", "too-many-pixels",
"decompression-bomb", "unreadable") followed by ": " and a detail.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from carsearch.platform.errors import ImageRejectedError

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 50_000_000
# The longest side an image is decoded at for embedding: twice the 384-px input of the
# largest SigLIP checkpoints (the compact base takes 64-224 px), a margin for the image
# processor's own resize. Training decodes at full size (its crops are in file pixels).
DECODE_MAX_SIDE = 768
# `Image.info` key of an image reduced at decode: the (width, height) in the file.
SOURCE_SIZE = "carsearch_source_size"
_BLOCK_PIXELS = 1 << 20  # pixels converted at once from a wide greyscale mode

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
_UNRESAMPLABLE = {"P", "PA", "1"}
_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class Decoded:
    """A decoded image: 8-bit RGB pixels (reduced where a bound was asked for), the mode
    the file stored, and its displayed size in the file (EXIF orientation applied)."""

    image: Image.Image
    mode: str
    size: tuple[int, int]


def rejection_kind(reason: str) -> str:
    """The short kind at the start of an `ImageRejectedError.reason`."""
    return reason.split(":", 1)[0].strip()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _wide_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit or float greyscale scaled into 8 bits (a plain convert clips).

    Converted in row blocks through float32, so the peak is the source array plus the
    8-bit result plus one block, not a float64 copy of the whole image."""
    arr = np.asarray(img)
    factor = 1.0
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.size and arr.max() > 255):
        factor = 1.0 / 257.0
    elif img.mode == "F" and arr.size and arr.max() <= 1.0:
        factor = 255.0
    out = np.empty(arr.shape, dtype=np.uint8)
    step = max(1, _BLOCK_PIXELS // max(1, arr.shape[1] if arr.ndim > 1 else 1))
    for top in range(0, arr.shape[0], step):
        block = arr[top : top + step].astype(np.float32)
        if factor != 1.0:
            block *= np.float32(factor)
        np.rint(block, out=block)
        np.clip(block, 0, 255, out=block)
        out[top : top + step] = block
    return Image.fromarray(out, mode="L")


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


def fit_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled (aspect kept) so that its longer side is at most ``max_side``."""
    width, height = size
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return (min(max_side, max(1, round(width * scale))),
            min(max_side, max(1, round(height * scale))))


def _shrink(img: Image.Image, max_side: int | None) -> Image.Image:
    """A loaded image reduced to ``max_side`` (its own mode kept where Pillow can
    resample it, so a wide greyscale image is converted after the reduction)."""
    if max_side is None or max(img.size) <= max_side:
        return img
    target = fit_size(img.size, max_side)
    if img.mode in _UNRESAMPLABLE:
        img = to_rgb(img)
    try:
        return img.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)
    except ValueError:  # modes without `reduce` (16-bit): a plain resample
        return img.resize(target, Image.Resampling.BICUBIC)


def _displayed_size(img: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    """``size`` as displayed: swapped by a transposing EXIF tag. Asked after loading (a
    PNG's EXIF may follow its pixels, and reading it before would decode them unchecked)."""
    try:
        turned = img.getexif().get(_ORIENTATION) in _TRANSPOSED
    except Exception:  # a broken EXIF block: the pixels are used as stored
        turned = False
    return (size[1], size[0]) if turned else size


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


def _decode(fp: IO[bytes], name: str, *, max_pixels: int,
            max_side: int | None = None) -> Decoded:
    """Open, size-check and fully decode one image (reduced to ``max_side``)."""
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
                if max_side is not None and max(width, height) > max_side:
                    # JPEG: libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below this
                    # size (other formats ignore it and are reduced after loading).
                    img.draft(None, fit_size((width, height), max_side))
                img.load()
                size = _displayed_size(img, (width, height))
                mode = img.mode
                rgb = to_rgb(_shrink(_oriented(img), max_side))
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
    if rgb.size != size:
        # Reduced at decode: boxes are in the file's pixels, and the image policy scales
        # them by this (Pillow keeps `info` through convert, crop and resize).
        rgb.info[SOURCE_SIZE] = size
    return Decoded(rgb, mode, size)


def decode_file(
    path: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_side: int | None = None,
) -> Decoded:
    """Decode an image file (reduced to ``max_side`` where given), or raise
    ImageRejectedError; also says the stored mode and the size in the file."""
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
        return _decode(fh, name, max_pixels=max_pixels, max_side=max_side)


def load_image_with_mode(
    path: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_side: int | None = None,
) -> tuple[Image.Image, str]:
    """Like `load_image`, also returning the mode the file was stored in ("L", "CMYK" ...)."""
    got = decode_file(path, max_pixels=max_pixels, max_bytes=max_bytes, max_side=max_side)
    return got.image, got.mode


def load_image(
    path: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_side: int | None = None,
) -> Image.Image:
    """Open an image file as fully decoded 8-bit RGB (its longer side reduced to
    ``max_side`` where given), or raise ImageRejectedError."""
    return decode_file(path, max_pixels=max_pixels, max_bytes=max_bytes,
                       max_side=max_side).image


def load_image_bytes(
    data: bytes,
    *,
    name: str = "upload",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_side: int | None = None,
) -> Image.Image:
    """Decode an uploaded image held in memory, with the same checks as `load_image`."""
    if not data:
        raise ImageRejectedError("empty: zero bytes", name)
    if len(data) > max_bytes:
        raise ImageRejectedError(
            f"too-large: {len(data)} bytes is over the limit of {max_bytes}", name
        )
    return _decode(io.BytesIO(data), name, max_pixels=max_pixels, max_side=max_side).image


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
