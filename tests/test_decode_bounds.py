"""Bounded decoding (issue 22, items 3 and 16): an image is decoded no larger than the
bound asked for, whatever its pixel count or format; 16-bit greyscale converts without a
float64 copy; re-indexing holds no more than one chunk of decoded images at once; the
worker embeds reduced images and records the size in the file.

Real parts: Pillow-written JPEG / PNG / 16-bit PNG files, a compact model, Milvus Lite
with SQLite and the Milvus server with PostgreSQL. Memory is not timed here: the chunk
test counts live decoded images (weak references), and the 16-bit test reads numpy's
allocations from tracemalloc, both deterministic. The RSS figure for a promotion over
500 photos of 12 MP is bench/bench_decode_memory.py's (docs/RELIABILITY.md).
"""

from __future__ import annotations

import tracemalloc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from carsearch.ingest import pipeline
from carsearch.ingest.worker import IngestWorker
from carsearch.lifecycle import reindex
from carsearch.platform.db import Image
from carsearch.platform.images import DECODE_MAX_SIDE, load_image, load_image_with_mode
from carsearch.platform.runtime import Platform
from ingest_world import assert_invariant, make_image
from shapes import shape as _shape

shape = _shape  # the fixture: Lite + SQLite, server + PostgreSQL


def _gradient(width: int, height: int) -> np.ndarray:
    """A smooth RGB picture (compresses fast, unlike noise)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return np.broadcast_to((x + y) / 2, (height, width, 3)).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_huge_image_is_decoded_within_the_bound(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"big.{fmt.lower()}"
    PILImage.fromarray(_gradient(6000, 4000)).save(path, format=fmt)
    img = load_image(path, max_side=500)
    assert img.mode == "RGB" and max(img.size) <= 500
    assert img.size == (500, 333)  # the aspect is kept
    assert load_image(path).size == (6000, 4000)  # no bound: full size, as before
    small = tmp_path / f"small.{fmt.lower()}"
    PILImage.fromarray(_gradient(40, 30)).save(small, format=fmt)
    assert load_image(small, max_side=500).size == (40, 30)  # never enlarged


def test_a_jpeg_turned_by_exif_is_bounded_and_reports_its_displayed_size(
    tmp_path: Path,
) -> None:
    from carsearch.platform.images import decode_file

    exif = PILImage.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "turned.jpg"
    PILImage.fromarray(_gradient(4000, 3000)).save(path, exif=exif)
    got = decode_file(path, max_side=400)
    assert got.size == (3000, 4000) and got.image.size == (300, 400)


def test_a_huge_sixteen_bit_png_is_bounded_and_scaled(tmp_path: Path) -> None:
    arr = np.full((5000, 8000), 32896, dtype=np.uint16)
    arr[:, :4000] = 65535
    path = tmp_path / "g16.png"
    PILImage.fromarray(arr).save(path)
    img, stored = load_image_with_mode(path, max_side=DECODE_MAX_SIDE)
    assert stored.startswith("I") and img.mode == "RGB"
    assert img.size == (DECODE_MAX_SIDE, 480)
    assert img.getpixel((10, 10)) == (255, 255, 255)  # scaled into 8 bits, not clipped
    assert img.getpixel((DECODE_MAX_SIDE - 10, 10)) == (128, 128, 128)


def test_sixteen_bit_greyscale_converts_without_a_float64_copy(tmp_path: Path) -> None:
    """Before: ~27 bytes a pixel of numpy arrays (float64 copies); now the uint16 array,
    the 8-bit result and a block: under 8 bytes a pixel, measured by tracemalloc (which
    sees numpy's allocations, not Pillow's)."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65535, (3000, 4000), dtype=np.uint16)
    path = tmp_path / "g16.png"
    PILImage.fromarray(arr).save(path, compress_level=1)
    tracemalloc.start()
    try:
        img = load_image(path)  # no bound: the whole 12 MP converted
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert img.size == (4000, 3000)
    want = np.rint(arr[:2, :5] / 257.0).astype(np.uint8)
    got = np.asarray(img)[:2, :5, 0]
    assert (got == want).all()
    assert peak < 8 * arr.size, f"{peak / arr.size:.1f} bytes a pixel"


class _Live:
    """Counts decoded images alive at once (a weak reference on each)."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    def track(self, img: Any) -> None:
        self.now += 1
        self.most = max(self.most, self.now)
        weakref.finalize(img, self._gone)

    def _gone(self) -> None:
        self.now -= 1

    def spy_on_prepare(self, module: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """Track every image that ``module.prepare`` decodes."""
        real_prepare = module.prepare

        def counting(*args: Any, **kwargs: Any) -> pipeline.Prepared:
            got = real_prepare(*args, **kwargs)
            self.track(got.image)
            return got

        monkeypatch.setattr(module, "prepare", counting)


def test_reindexing_holds_one_chunk_of_decoded_images_at_once(
    shape: Platform, tmp_path: Path, compact_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 indexed images, one page; re-indexed in chunks of 4. Before: the whole page was
    decoded first (12 alive at once)."""
    p = shape
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(12):
        make_image(inbox / f"c{i}.png", i)
    IngestWorker(p, inbox=inbox).run_once()
    assert len(assert_invariant(p)) == 12
    p.registry.publish(compact_model, name="v2")
    live = _Live()
    live.spy_on_prepare(reindex, monkeypatch)
    report = reindex.backfill(p, p.registry.get("v2"), batch_size=4, progress=False)
    assert report.embedded == 12 and live.most <= 4
    assert p.store.ids(p.registry.get("v2").collection) == p.store.ids(
        p.registry.require_serving().collection)


def test_the_worker_holds_one_chunk_of_decoded_images_at_once(
    shape: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One claimed batch of 12 jobs, decoded and stored 4 at a time. Before: the whole
    claimed batch was decoded before the first write (12 alive at once)."""
    from carsearch.ingest import worker as worker_mod

    p = shape
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(12):
        make_image(inbox / f"w{i}.png", i)
    live = _Live()
    live.spy_on_prepare(worker_mod, monkeypatch)
    w = IngestWorker(p, inbox=inbox, batch_size=32, decode_chunk=4)
    w.run_once()
    assert w.stats.batches == 1  # one claim held all 12 jobs
    assert len(assert_invariant(p)) == 12
    assert live.now == 0 and 1 <= live.most <= 4


def test_the_worker_embeds_reduced_images_and_records_the_files_size(
    shape: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = shape
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    PILImage.fromarray(_gradient(3000, 2000)).save(inbox / "big.jpg", quality=80)
    make_image(inbox / "small.png", 1)
    sizes: list[tuple[int, int]] = []
    real_embed = pipeline.embed

    def spying(encoder: Any, batch: Any) -> np.ndarray:
        sizes.extend(b.image.size for b in batch)
        return real_embed(encoder, batch)

    monkeypatch.setattr(pipeline, "embed", spying)
    IngestWorker(p, inbox=inbox).run_once()
    assert len(assert_invariant(p)) == 2
    assert sorted(sizes) == [(64, 48), (DECODE_MAX_SIDE, 512)]
    with p.db.session() as s:
        dims = sorted((r.width, r.height) for r in s.scalars(select(Image)))
    assert dims == [(64, 48), (3000, 2000)]  # the size in the file, not the decoded one


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_box_in_the_files_pixels_frames_the_reduced_image(tmp_path: Path, fmt: str) -> None:
    """Boxes are given in the file's pixels; a photo decoded at a reduced size is framed
    at the same place (the decoder records the file's size, the policy scales the box)."""
    from carsearch.platform.models.image_policy import IMPLIED_POLICY

    arr = np.zeros((1500, 3000, 3), dtype=np.uint8)
    arr[..., 2] = 255  # blue everywhere
    box = (1800, 300, 2700, 1200)  # red inside the box
    arr[box[1]:box[3], box[0]:box[2]] = (255, 0, 0)
    path = tmp_path / f"big.{fmt.lower()}"
    PILImage.fromarray(arr).save(path, format=fmt)
    full = load_image(path)
    reduced = load_image(path, max_side=DECODE_MAX_SIDE)
    assert max(reduced.size) <= DECODE_MAX_SIDE < max(full.size)
    crop = np.asarray(IMPLIED_POLICY.frame(reduced, box), dtype=np.float32)
    scale = reduced.width / full.width
    assert abs(crop.shape[1] - 900 * scale) <= 2 and abs(crop.shape[0] - 900 * scale) <= 2
    red = (crop[..., 0] > 128) & (crop[..., 2] < 128)
    assert red.mean() > 0.97  # the vehicle, not the frame beside it
    # The same box on the full-size decode frames the same picture.
    assert IMPLIED_POLICY.frame(full, box).size == (900, 900)
