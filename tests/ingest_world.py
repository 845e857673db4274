"""A small world for the ingest tests: a real compact model published and serving, a
Milvus Lite file or the Milvus server, SQLite or PostgreSQL; images made on the fly; and
the invariant every ingest test ends with ("nothing lost, nothing doubled")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from carsearch.platform.db import migrate
from carsearch.platform.db.images import indexed_ids
from carsearch.platform.runtime import Platform
from carsearch.platform.settings import Settings


def make_image(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    """Write a picture the way inbox writers must: under a dot-name, then rename."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    tmp = path.with_name("." + path.name)
    PILImage.fromarray(arr).save(tmp, format="PNG")
    tmp.rename(path)
    return path


def assert_invariant(p: Platform) -> set[int]:
    v = p.registry.require_serving()
    in_milvus = p.store.ids(v.collection)
    in_db = indexed_ids(p.db)
    assert in_milvus == in_db
    assert p.store.count(v.collection) == len(in_db)
    return in_db


def world(tmp_path: Path, db_url: str, model: Path, milvus_uri: str = "", *,
          settle_s: float = 0.0, promote: bool = True) -> Platform:
    """A platform with v1 published and (unless ``promote`` is false) serving. The inbox
    settle time is 0 unless asked: the tests drop whole deliveries at once."""
    migrate.upgrade(db_url)
    s = Settings(data_dir=tmp_path / "data", database_url=db_url, milvus_uri=milvus_uri,
                 ingest={"settle_s": settle_s})
    s.ensure_dirs()
    p = Platform(s)
    p.registry.publish(model, name="v1")
    if promote:
        p.registry.promote("v1")
    return p


