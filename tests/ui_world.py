"""A small real world for the search-page tests, and the real server in a subprocess.

The world: a compact SigLIP published and promoted through the Registry, a handful of
generated images (outside the image directory, as photos indexed from elsewhere are)
ingested through the real pipeline into Milvus Lite + SQLite. The server is
`python -m carsearch.cli serve` pointed at that data directory by CARSEARCH_* variables.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from carsearch.ingest.pipeline import BatchWriter, IngestItem, ingest_items
from carsearch.platform import collections
from carsearch.platform.db import migrate
from carsearch.platform.runtime import Platform
from carsearch.platform.settings import Settings

REPO = Path(__file__).resolve().parents[1]

CARS: list[tuple[str, str, str]] = [
    ("Chevrolet Silverado 1500 Regular Cab 2012", "red", "synthetic"),
    ("Ford F-150 Regular Cab 2007", "blue", "synthetic"),
    ("BMW M3 Coupe 2012", "black", "stanford"),
    ("BMW 1 Series Convertible 2012", "white", "stanford"),
    ("Mercedes-Benz C-Class Sedan 2012", "silver", "stanford"),
    ("Volkswagen Golf Hatchback 1991", "white", "synthetic"),
    ("Jeep Wrangler SUV 2012", "green", "synthetic"),
    ("Dodge Caravan Minivan 1997", "red", "stanford"),
]

STREET = ["a quiet street at dawn", "a busy market square"]

METRICS = {"Recall@1": 0.5, "Recall@5": 0.75, "mAP": 0.41,
           "zero_shot": {"Recall@1": 0.125, "Recall@5": 0.5, "mAP": 0.2}}


@dataclass(frozen=True)
class World:
    data_dir: Path
    photos: list[Path]
    settings: Settings


@dataclass(frozen=True)
class Server:
    url: str
    world: World
    log: Path


def draw_car(path: Path, seed: int, colour: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (128, 96), (230, 230, 230))
    d = ImageDraw.Draw(img)
    d.rectangle([12, 40, 116, 72], fill=colour)
    d.rectangle([36, 24, 92, 42], fill=colour)
    for x in (32, 96):
        d.ellipse([x - 10, 64, x + 10, 84], fill=(20, 20, 20))
    for _ in range(3):
        x, y = (int(v) for v in rng.integers(0, 100, 2))
        d.rectangle([x, y, x + 8, y + 6], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    img.save(path)


_RGB = {"red": (200, 20, 20), "blue": (20, 40, 200), "black": (15, 15, 15),
        "white": (250, 250, 250), "silver": (180, 180, 190), "green": (20, 150, 40)}


def build_world(root: Path, compact_model: Path) -> World:
    data = root / "data"
    photos_dir = root / "photos"  # outside data/images: shown through thumbnails only
    photos_dir.mkdir(parents=True)
    settings = Settings(data_dir=data)
    settings.ensure_dirs()
    migrate.upgrade(settings.database_url)
    platform = Platform(settings)
    try:
        platform.registry.publish(compact_model, name="base", metrics=METRICS)
        version = platform.registry.promote("base")
        items, photos = [], []
        for i, (cls, colour, source) in enumerate(CARS):
            p = photos_dir / f"car{i}.png"
            draw_car(p, i, _RGB[colour])
            photos.append(p)
            items.append(IngestItem(p, source=source, meta={"class_name": cls, "colour": colour}))
        summary = ingest_items(
            items, db=platform.db,
            writer=BatchWriter.fixed(platform.db, platform.store,
                                     platform.search.encoder_for(version), version),
            max_pixels=settings.max_image_pixels, batch_size=8, progress=False,
        )
        assert summary.indexed == len(CARS), summary
        # A general collection beside the vehicles: two street photos, their own version.
        collections.create(platform.db, "photos", "general", "street photos")
        platform.registry.publish(compact_model, name="photos-base", collection="photos")
        pv = platform.registry.promote("photos-base")
        street = []
        for i, desc in enumerate(STREET):
            p = photos_dir / f"street{i}.png"
            draw_car(p, 50 + i, _RGB["silver"])
            street.append(IngestItem(p, source="unsplash",
                                     meta={"description": desc, "photographer": f"user{i}"}))
        got = ingest_items(
            street, db=platform.db,
            writer=BatchWriter.fixed(platform.db, platform.store,
                                     platform.search.encoder_for(pv), pv),
            max_pixels=settings.max_image_pixels, progress=False,
        )
        assert got.indexed == len(STREET), got
    finally:
        platform.close()
    return World(data, photos, settings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError:
            return  # it answered (401 where a login is required)
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server did not answer at {url}:\n{log.read_text()[-4000:]}")


def run_server(
    world: World, log: Path, extra_env: dict[str, str] | None = None,
    args: list[str] | None = None, python_args: list[str] | None = None,
) -> Iterator[Server]:
    """The page on a free port; ``python_args`` replaces ``-m carsearch.cli`` (a test
    that patches something in the served process first)."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "CARSEARCH_UI_AUTH"},
        "CARSEARCH_DATA_DIR": str(world.data_dir),
        "CARSEARCH_THREADS__TORCH": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, *(python_args or ["-m", "carsearch.cli"]), "serve",
             "--port", str(port), *(args or [])],
            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url + "gradio_api/info", proc, log)
        yield Server(url, world, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
