"""platform.images: safe decoding, conversion to RGB, rejections with reasons, crops."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carsearch.platform.errors import ImageRejectedError
from carsearch.platform.images import (
    clamp_box,
    crop_box,
    load_image,
    load_image_bytes,
    load_image_with_mode,
    rejection_kind,
    sha256_file,
)


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def _rejected(path: Path, **kw: int) -> str:
    with pytest.raises(ImageRejectedError) as info:
        load_image(path, **kw)
    assert info.value.path == str(path)
    return rejection_kind(info.value.reason)


def _jpeg(tmp_path: Path, name: str = "car.jpg", size: tuple[int, int] = (64, 48)) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    return _save(Image.fromarray(arr, "RGB"), tmp_path / name, quality=90)


def test_rgb_jpeg_loads_fully_decoded(tmp_path: Path) -> None:
    img = load_image(_jpeg(tmp_path))
    assert img.mode == "RGB"
    assert img.size == (64, 48)
    assert np.asarray(img).shape == (48, 64, 3)


@pytest.mark.parametrize(
    ("mode", "fmt", "colour"),
    [
        ("L", "JPEG", 128),
        ("CMYK", "JPEG", (0, 255, 255, 0)),
        ("1", "PNG", 1),
        ("P", "PNG", 3),
        ("LA", "PNG", (90, 255)),
    ],
)
def test_other_modes_become_rgb(tmp_path: Path, mode: str, fmt: str, colour: object) -> None:
    path = _save(Image.new(mode, (20, 10), colour), tmp_path / f"x.{fmt.lower()}", format=fmt)
    img, stored = load_image_with_mode(path)
    assert stored == mode
    assert img.mode == "RGB"
    assert img.size == (20, 10)


def test_cmyk_red_stays_red(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)
    r, g, b = load_image(path).getpixel((8, 8))  # type: ignore[misc]
    assert r > 200 and g < 60 and b < 60


def test_transparency_is_composited_onto_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.putpixel((5, 5), (255, 0, 0, 255))
    img = load_image(_save(rgba, tmp_path / "a.png"))
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((5, 5)) == (255, 0, 0)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    img = load_image(_save(pal, tmp_path / "p.png", transparency=0))
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 1)) == (0, 255, 0)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    img, stored = load_image_with_mode(path)
    assert stored.startswith("I")
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255,) * 3]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = _save(Image.new("RGB", (40, 20), (10, 20, 30)), tmp_path / "o.jpg", exif=exif)
    assert load_image(path).size == (20, 40)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert _rejected(path) == "empty"


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photograph\n" * 20)
    assert _rejected(path) == "not-an-image"


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _jpeg(tmp_path, size=(200, 150)).read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert _rejected(path) == "truncated"


def test_png_with_broken_checksum_is_corrupt(tmp_path: Path) -> None:
    data = bytearray(_save(Image.new("RGB", (30, 30), (1, 2, 3)), tmp_path / "ok.png").read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF  # damage the compressed stream
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    assert _rejected(path) in {"corrupt", "truncated"}


def test_pixel_limit_is_per_call(tmp_path: Path) -> None:
    path = _save(Image.new("L", (2100, 2000), 0), tmp_path / "big.png")
    assert _rejected(path, max_pixels=4_000_000) == "too-many-pixels"
    assert load_image(path).size == (2100, 2000)  # the default limit allows it


def test_byte_limit(tmp_path: Path) -> None:
    assert _rejected(_jpeg(tmp_path), max_bytes=100) == "too-large"


def _png_claiming(tmp_path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    data = bytearray(_save(Image.new("1", (1, 1)), tmp_path / "one.png").read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path = tmp_path / f"bomb_{width}x{height}.png"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("side", [10_000, 100_000])  # PIL warns at ~89M pixels, raises at 2x
def test_decompression_bomb_is_rejected_whatever_the_call_limit(tmp_path: Path, side: int) -> None:
    path = _png_claiming(tmp_path, side, side)
    assert _rejected(path, max_pixels=10**12) == "decompression-bomb"
    assert _rejected(path) in {"decompression-bomb", "too-many-pixels"}


def test_missing_file(tmp_path: Path) -> None:
    assert _rejected(tmp_path / "nope.jpg") == "unreadable"


def test_load_image_bytes(tmp_path: Path) -> None:
    data = _jpeg(tmp_path).read_bytes()
    assert load_image_bytes(data).size == (64, 48)
    for bad, kind in [(b"", "empty"), (b"hello", "not-an-image"), (data[:300], "truncated")]:
        with pytest.raises(ImageRejectedError) as info:
            load_image_bytes(bad, name="upload.jpg")
        assert rejection_kind(info.value.reason) == kind
        assert info.value.path == "upload.jpg"
    with pytest.raises(ImageRejectedError, match="too-large"):
        load_image_bytes(data, max_bytes=10)


def test_sha256_file(tmp_path: Path) -> None:
    path = _jpeg(tmp_path)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_crop_box_is_clamped() -> None:
    img = Image.new("RGB", (100, 50))
    assert crop_box(img, (10, 5, 30, 25)).size == (20, 20)
    assert crop_box(img, (-20, -10, 500, 40)).size == (100, 40)
    assert crop_box(img, (90, 40, 200, 200)).size == (10, 10)
    assert crop_box(img, (200, 200, 300, 300)).size == (100, 50)  # nothing inside: whole image
    assert crop_box(img, None).size == (100, 50)
    assert clamp_box((-1, -1, 5, 5), (4, 4)) == (0, 0, 4, 4)
    assert clamp_box((3, 3, 3, 9), (4, 4)) is None


def test_decoded_image_outlives_the_file(tmp_path: Path) -> None:
    path = _jpeg(tmp_path)
    img = load_image(path)
    path.unlink()
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert buf.tell() > 0
