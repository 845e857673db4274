"""A small world for the ingest tests: a real compact model published and serving, a
Milvus Lite file or the Milvus server, SQLite or PostgreSQL; images made on the fly; and
the invariant every ingest test ends with ("nothing lost, nothing doubled").

The model is published once per run (`PublishedModel`, the `published_model` fixture of
tests/conftest.py) and each world gets a copy of its registry folder and its row; the
database is a copy of the run's migrated template (`database` / `make_database`), so a
world costs no Alembic run and no publish (the registry and CLI tests publish for real).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select

from carsearch.platform.db import Database, ModelVersion, VersionStatus
from carsearch.platform.db.images import indexed_ids
from carsearch.platform.models.registry import Registry
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


@dataclass(frozen=True)
class PublishedModel:
    """A model version published once (the real `Registry.publish`): its registry folder
    and the row publish recorded. `install` gives another database the same version (the
    folder copied into its registry, the row recorded with the new path), as publishing
    the same artifact there would, without hashing and copying it twice more."""

    name: str
    folder: Path
    row: dict[str, Any]

    @property
    def artifact(self) -> Path:
        """The artifact it was published from (to publish it again under another name)."""
        return Path(self.row["base_model"])

    @classmethod
    def publish(cls, db: Database, model_dir: Path, artifact: Path, name: str) -> PublishedModel:
        v = Registry(db, model_dir).publish(artifact, name=name)
        with db.session() as s:
            row = s.scalar(select(ModelVersion).where(ModelVersion.id == v.id))
            assert row is not None
            keep = ("name", "base_model", "artifact_sha256", "dim", "metric", "collection",
                    "image_collection", "metrics", "params")
            return cls(name, Path(row.artifact_path), {k: getattr(row, k) for k in keep})

    def install(self, db: Database, model_dir: Path, *, promote: bool) -> None:
        dest = model_dir / self.name
        shutil.copytree(self.folder, dest)
        with db.session() as s:
            s.add(ModelVersion(
                **self.row, artifact_path=str(dest.resolve()),
                status=VersionStatus.serving if promote else VersionStatus.candidate,
                promoted_at=datetime.now(UTC) if promote else None))


def world(tmp_path: Path, db_url: str, model: Path | PublishedModel, milvus_uri: str = "", *,
          settle_s: float = 0.0, promote: bool = True) -> Platform:
    """A platform on ``db_url`` (a migrated database: `database` / `make_database`) with
    v1 recorded and (unless ``promote`` is false) serving: the run's `published_model`
    installed, or another model artifact published (and promoted) for real. The inbox
    settle time is 0 unless asked: the tests drop whole deliveries at once."""
    s = Settings(data_dir=tmp_path / "data", database_url=db_url, milvus_uri=milvus_uri,
                 ingest={"settle_s": settle_s})
    s.ensure_dirs()
    p = Platform(s)
    if isinstance(model, PublishedModel):
        model.install(p.db, p.registry.model_dir, promote=promote)
        return p
    p.registry.publish(model, name="v1")
    if promote:
        p.registry.promote("v1")
    return p
