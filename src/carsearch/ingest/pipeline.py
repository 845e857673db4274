"""Ingest stages: read -> validate -> embed -> upsert vectors -> write rows.

Each stage is a small function, testable alone. Ids come from content hashes and the
vector is written before the database row, so any crash point is recoverable by
replaying: the replay's upsert lands on the same Milvus primary key and the row
insert is idempotent.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from tqdm import tqdm

from carsearch.platform.db import Database, Image, ImageStatus, ModelVersion
from carsearch.platform.encoder import Encoder
from carsearch.platform.errors import CarsearchError, ImageRejectedError
from carsearch.platform.ids import image_id
from carsearch.platform.images import load_image, sha256_file
from carsearch.platform.vectorstore import MilvusStore, VectorRow
from carsearch.platform.vehicles import body_category, parse_class_name

log = logging.getLogger(__name__)

LABEL_FIELDS = ("make", "model", "year", "body_type", "colour", "class_name")


@dataclass(frozen=True)
class IngestItem:
    """One image to ingest, with whatever metadata came with it."""

    path: Path
    source: str = "manual"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    item: IngestItem
    sha256: str
    id: int
    image: PILImage.Image

    def label_fields(self) -> dict[str, Any]:
        meta = dict(self.item.meta)
        if meta.get("class_name") and not meta.get("make"):
            label = parse_class_name(str(meta["class_name"]))
            meta.update(make=label.make, model=label.model, year=label.year,
                        body_type=label.body_type)
        out = {k: meta.get(k) for k in LABEL_FIELDS}
        if out["year"] is not None:
            out["year"] = int(out["year"])
        return out


@dataclass
class IngestSummary:
    seen: int = 0
    indexed: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "indexed": self.indexed,
            "quarantined": self.quarantined,
            "reasons": dict(self.reasons),
        }


# -- sources -----------------------------------------------------------------------------
def read_manifest(path: Path, source: str = "manifest") -> Iterator[IngestItem]:
    """Items from a JSONL or CSV manifest: a `path` column plus any label fields.

    Relative paths are resolved against the manifest's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise CarsearchError(f"no manifest at {path}")
    rows: Iterable[dict[str, Any]]
    with path.open(newline="") as fh:
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(fh))
        else:
            rows = []
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise CarsearchError(f"{path}:{n}: not JSON ({exc.msg})") from None
    for n, row in enumerate(rows, 1):
        if not row.get("path"):
            raise CarsearchError(f"{path}: row {n} has no 'path'")
        p = Path(str(row["path"]))
        if not p.is_absolute():
            p = path.parent / p
        meta = {k: v for k, v in row.items() if k not in ("path", "source") and v not in ("", None)}
        yield IngestItem(path=p, source=str(row.get("source") or source), meta=meta)


# -- stages ------------------------------------------------------------------------------
def prepare(item: IngestItem, max_pixels: int) -> Prepared:
    """Hash and decode one file; raises ImageRejectedError with the reason."""
    if not item.path.is_file():
        raise ImageRejectedError("file not found", str(item.path))
    digest = sha256_file(item.path)
    img = load_image(item.path, max_pixels=max_pixels)
    return Prepared(item=item, sha256=digest, id=image_id(digest), image=img)


def embed(encoder: Encoder, batch: Sequence[Prepared]) -> np.ndarray:
    return encoder.encode_images([p.image for p in batch])


def vector_rows(batch: Sequence[Prepared]) -> list[VectorRow]:
    rows = []
    for p in batch:
        f = p.label_fields()
        rows.append(
            VectorRow(
                make=f["make"] or "",
                # Normalised as the page's filter vocabulary is (nlfilters), so that a
                # sidecar's "Sedan" or "Red" matches the filter body=sedan, colour=red.
                body=body_category(f["body_type"]),
                colour=(f["colour"] or "").lower(),
                source=p.item.source,
                year=f["year"] or 0,
            )
        )
    return rows


def _upsert_stmt(db: Database, values: list[dict[str, Any]], update: dict[str, Any]) -> Any:
    dialect = db.engine.dialect.name
    if dialect == "postgresql":
        stmt = pg_insert(Image).values(values)
    elif dialect == "sqlite":
        stmt = sqlite_insert(Image).values(values)
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        return insert(Image).values(values)
    if not update:
        return stmt.on_conflict_do_nothing(index_elements=["id"])
    return stmt.on_conflict_do_update(index_elements=["id"], set_=update)


def write_rows(db: Database, batch: Sequence[Prepared]) -> None:
    """Insert (or mark indexed) the rows of a batch whose vectors are already written."""
    if not batch:
        return
    values = []
    for p in {p.id: p for p in batch}.values():  # the same bytes twice: one row
        values.append(
            {
                "id": p.id,
                "sha256": p.sha256,
                "path": str(p.item.path.resolve()),
                "width": p.image.width,
                "height": p.image.height,
                "source": p.item.source,
                "extra": {k: v for k, v in p.item.meta.items() if k not in LABEL_FIELDS} or None,
                "status": ImageStatus.indexed.value,
                "error": None,
                **p.label_fields(),
            }
        )
    with db.session() as s:
        s.execute(_upsert_stmt(db, values, {"status": ImageStatus.indexed.value, "error": None}))


def quarantine(db: Database, item: IngestItem, reason: str) -> None:
    """Record a rejected file with its reason (keyed by its bytes where it has any)."""
    import hashlib

    try:
        digest = sha256_file(item.path)
    except OSError:
        digest = hashlib.sha256(str(item.path.resolve()).encode()).hexdigest()
    value = {
        "id": image_id(digest),
        "sha256": digest,
        "path": str(item.path.resolve()),
        "source": item.source,
        "status": ImageStatus.quarantined.value,
        "error": reason[:2000],
    }
    with db.session() as s:
        s.execute(_upsert_stmt(db, [value], {}))
    log.warning("quarantined %s: %s", item.path, reason)


def ingest_items(
    items: Iterable[IngestItem],
    *,
    db: Database,
    store: MilvusStore,
    encoder: Encoder,
    version: ModelVersion,
    max_pixels: int,
    batch_size: int = 64,
    progress: bool = True,
    total: int | None = None,
) -> IngestSummary:
    """Run every stage over `items` in batches; bad files are quarantined, never fatal."""
    summary = IngestSummary()
    store.ensure_collection(version.collection, version.dim)
    batch: list[Prepared] = []
    bar = tqdm(items, total=total, desc="ingest", unit="img", disable=not progress)
    for item in bar:
        summary.seen += 1
        try:
            batch.append(prepare(item, max_pixels))
        except ImageRejectedError as exc:
            quarantine(db, item, exc.reason)
            summary.quarantined += 1
            summary.reasons[exc.reason] = summary.reasons.get(exc.reason, 0) + 1
        if len(batch) >= batch_size:
            summary.indexed += _flush_batch(db, store, encoder, version, batch)
            batch = []
    summary.indexed += _flush_batch(db, store, encoder, version, batch)
    store.flush(version.collection)
    return summary


def _flush_batch(
    db: Database,
    store: MilvusStore,
    encoder: Encoder,
    version: ModelVersion,
    batch: list[Prepared],
) -> int:
    unique = list({p.id: p for p in reversed(batch)}.values())[::-1]
    if not unique:
        return 0
    batch = unique
    vectors = embed(encoder, batch)
    store.upsert(version.collection, [p.id for p in batch], vectors, vector_rows(batch))
    write_rows(db, batch)
    return len(batch)
