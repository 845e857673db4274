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
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from tqdm import tqdm

from carsearch.platform import collections
from carsearch.platform.collections import DEFAULT_COLLECTION
from carsearch.platform.db import Database, Image, ImageStatus, ModelVersion, utcnow
from carsearch.platform.errors import CarsearchError, ImageRejectedError
from carsearch.platform.ids import image_id
from carsearch.platform.images import load_image, sha256_file
from carsearch.platform.models.encoder import Encoder
from carsearch.platform.models.image_policy import check_box
from carsearch.platform.runtime import Platform
from carsearch.platform.search.vocabulary import body_category, parse_class_name
from carsearch.platform.vectors.store import VectorRow, VectorStore

log = logging.getLogger(__name__)

LABEL_FIELDS = ("make", "model", "year", "body_type", "colour", "class_name")
# What the database columns hold: a longer value is refused (that field only).
TEXT_LIMITS: dict[str, int] = {"make": 64, "model": 128, "body_type": 32, "colour": 32,
                               "class_name": 256, "source": 64}
YEAR_RANGE = (1886, 2100)
MAX_EXTRA_BYTES = 16_384
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class IngestItem:
    """One image to ingest into a collection, with whatever metadata came with it."""

    path: Path
    source: str = "manual"
    meta: dict[str, Any] = field(default_factory=dict)
    collection: str = DEFAULT_COLLECTION


@dataclass(frozen=True)
class CleanMeta:
    """An item's metadata after checking each field alone: ``labels`` holds the label
    fields that passed, ``rejected`` says why each other one was dropped."""

    labels: dict[str, Any]
    source: str
    extra: dict[str, Any] | None
    rejected: dict[str, str]
    box: tuple[int, int, int, int] | None = None  # the vehicle's box, clipped to the image


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"not text: {type(value).__name__}")
    text = " ".join(str(value).split())
    if not text:
        raise ValueError("empty")
    if _CONTROL.search(text) or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise ValueError("holds control or unpaired surrogate characters")
    if len(text) > TEXT_LIMITS[name]:
        raise ValueError(f"longer than {TEXT_LIMITS[name]} characters ({len(text)})")
    return text


def _year(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"not a model year: {value!r}"[:120])
    try:
        year = int(str(value).strip())
    except ValueError:
        raise ValueError(f"not a model year: {value!r}"[:120]) from None
    if not YEAR_RANGE[0] <= year <= YEAR_RANGE[1]:
        raise ValueError(f"model year {year} outside {YEAR_RANGE[0]}-{YEAR_RANGE[1]}")
    return year


def clean_metadata(meta: dict[str, Any], source: str, *,
                   vehicle_labels: bool = True,
                   size: tuple[int, int] | None = None) -> CleanMeta:
    """Check every metadata field alone. A bad value (a year "unknown", a make longer
    than its column, a list where text belongs) costs only that field, recorded with its
    reason; the image and the rest of its batch go on. Without ``vehicle_labels`` (a
    general collection) nothing is read as a vehicle label: it all stays as metadata.
    A ``box`` [x1, y1, x2, y2] (pixels) is clipped to an image of ``size``, or refused
    with its reason (then the whole frame is embedded)."""
    labels: dict[str, Any] = {}
    rejected: dict[str, str] = {}
    for name in LABEL_FIELDS if vehicle_labels else ():
        value = meta.get(name)
        if value is None or value == "":
            continue
        try:
            labels[name] = _year(value) if name == "year" else _text(name, value)
        except ValueError as exc:
            rejected[name] = str(exc)
    if labels.get("class_name") and not labels.get("make"):
        try:
            label = parse_class_name(labels["class_name"])
        except ValueError as exc:
            rejected["class_name"] = str(exc)
            labels.pop("class_name")
        else:
            parsed = {"make": label.make, "model": label.model or None,
                      "year": label.year, "body_type": label.body_type}
            labels.update({k: v for k, v in parsed.items() if v and k not in labels})
    try:
        clean_source = _text("source", source)
    except ValueError as exc:
        rejected["source"] = str(exc)
        clean_source = "unknown"
    box = None
    if meta.get("box") not in (None, "", []):
        if size is None:
            rejected["box"] = "box given but the image size is unknown"
        else:
            box, reason = check_box(meta["box"], size)
            if reason is not None:
                rejected["box"] = reason
    taken = (*(LABEL_FIELDS if vehicle_labels else ()), "box")
    extra = {k: v for k, v in meta.items() if k not in taken} or None
    problem = storable_problem(extra)
    if problem is not None:
        rejected["extra"] = f"other metadata dropped: {problem}"
        extra = None
    if rejected:
        extra = {**(extra or {}), "rejected_metadata": rejected}
    return CleanMeta(labels, clean_source, extra, rejected, box)


def storable_problem(value: Any, limit: int = MAX_EXTRA_BYTES) -> str | None:
    """Why ``value`` cannot be stored as JSON in both databases (None: it can). PostgreSQL
    refuses NUL characters and unpaired surrogates in JSON text; a size cap keeps one
    sidecar from bloating the tables."""
    if value is None:
        return None
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        return f"not storable as JSON ({type(exc).__name__})"
    if "\\u0000" in text or "\x00" in text:
        return "holds NUL characters"
    if size > limit:
        return f"larger than {limit} bytes"
    return None


@dataclass
class Prepared:
    item: IngestItem
    sha256: str
    id: int
    image: PILImage.Image
    meta: CleanMeta
    stored: Path | None = None  # the platform's own copy, once kept

    @property
    def path(self) -> Path:
        """Where the row points: the platform's copy where one is kept."""
        return self.stored or self.item.path.resolve()

    def label_fields(self) -> dict[str, Any]:
        return {k: self.meta.labels.get(k) for k in LABEL_FIELDS}


@dataclass
class IngestSummary:
    seen: int = 0
    indexed: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    fields_rejected: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "indexed": self.indexed,
            "quarantined": self.quarantined,
            "reasons": dict(self.reasons),
            "fields_rejected": self.fields_rejected,
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
def prepare(item: IngestItem, max_pixels: int, *, vehicle_labels: bool = True) -> Prepared:
    """Hash and decode one file and check its metadata; raises ImageRejectedError with the
    reason for a file that cannot be used (bad metadata only drops those fields)."""
    if not item.path.is_file():
        raise ImageRejectedError("file not found", str(item.path))
    try:
        digest = sha256_file(item.path)
    except OSError as exc:
        raise ImageRejectedError(f"unreadable: {exc.strerror or exc}", str(item.path)) from None
    img = load_image(item.path, max_pixels=max_pixels)
    return Prepared(item=item, sha256=digest, id=image_id(digest, item.collection), image=img,
                    meta=clean_metadata(item.meta, item.source,
                                        vehicle_labels=vehicle_labels, size=img.size))


def store_path(image_dir: Path, digest: str, suffix: str) -> Path:
    """Where the image store keeps a file: ``IMAGE_DIR/ab/<sha256>.ext`` (by content)."""
    ext = suffix.lower() if suffix.lower() in IMAGE_SUFFIXES else ".bin"
    return Path(image_dir) / digest[:2] / f"{digest}{ext}"


def keep_copy(p: Prepared, image_dir: Path) -> Path:
    """The platform's own copy of an image, made once (by content, so a re-delivery
    copies nothing): re-indexing reads it, so an original that moves or vanishes later
    costs nothing. Written under a temporary name and renamed."""
    dest = store_path(image_dir, p.sha256, p.item.path.suffix)
    src = p.item.path.resolve()
    if src != dest.resolve() and not (dest.is_file() and sha256_file(dest) == p.sha256):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    p.stored = dest
    return dest


def embed(encoder: Encoder, batch: Sequence[Prepared]) -> np.ndarray:
    """The vectors of a batch under the version's image policy: each image cropped to its
    box where it has one (the whole photo stays the stored file and the thumbnail)."""
    return encoder.encode_images([p.image for p in batch], [p.meta.box for p in batch])


def vector_row(fields: dict[str, Any], source: str) -> VectorRow:
    """Milvus's scalar fields from a row's label fields, normalised as the page's filter
    vocabulary is (nlfilters), so that a sidecar's "Sedan" or "Red" matches the filter
    body=sedan, colour=red."""
    return VectorRow(
        make=fields.get("make") or "",
        body=body_category(fields.get("body_type")),
        colour=(fields.get("colour") or "").lower(),
        source=source,
        year=fields.get("year") or 0,
    )


def vector_rows(batch: Sequence[Prepared]) -> list[VectorRow]:
    return [vector_row(p.label_fields(), p.meta.source) for p in batch]


def unique(batch: Sequence[Prepared]) -> list[Prepared]:
    """One entry per image id (the same bytes twice in a batch), the last delivery winning,
    in the order the ids first came."""
    last = {p.id: p for p in batch}
    return [last[i] for i in dict.fromkeys(p.id for p in batch)]


def _insert(db: Database, values: list[dict[str, Any]]) -> Any:
    dialect = db.engine.dialect.name
    if dialect == "postgresql":
        return pg_insert(Image).values(values)
    if dialect == "sqlite":
        return sqlite_insert(Image).values(values)
    raise CarsearchError(f"unsupported database {dialect}: SQLite or PostgreSQL")


def merge_existing(db: Database, batch: Sequence[Prepared]) -> None:
    """A re-delivered image keeps the labels it had where the new delivery gives none;
    what the new one gives wins. Milvus and the database then get the same fields."""
    with db.session() as s:
        rows = {r.id: r for r in s.scalars(select(Image).where(
            Image.id.in_([p.id for p in batch])))}
    for p in batch:
        row = rows.get(p.id)
        if row is None:
            continue
        old = {k: getattr(row, k) for k in LABEL_FIELDS if getattr(row, k) is not None}
        extra = {**(row.extra or {}), **(p.meta.extra or {})} or None
        if not p.meta.rejected and extra:
            extra.pop("rejected_metadata", None)
        box = p.meta.box if p.meta.box is not None else (
            tuple(row.box) if row.box and "box" not in p.meta.rejected else None)
        p.meta = CleanMeta({**old, **p.meta.labels}, p.meta.source, extra or None,
                           p.meta.rejected, box)  # type: ignore[arg-type]


def _row_values(p: Prepared, status: ImageStatus) -> dict[str, Any]:
    return {
        "id": p.id,
        "collection": p.item.collection,
        "sha256": p.sha256,
        "path": str(p.path),
        "width": p.image.width,
        "height": p.image.height,
        "source": p.meta.source,
        "extra": _with_original(p),
        "status": status.value,
        "error": None,
        "box": list(p.meta.box) if p.meta.box is not None else None,
        **p.label_fields(),
    }


def _with_original(p: Prepared) -> dict[str, Any] | None:
    extra = dict(p.meta.extra or {})
    if p.stored is not None and p.item.path.resolve() != p.stored.resolve():
        extra["original_path"] = str(p.item.path.resolve())
    return extra or None


def write_pending(db: Database, batch: Sequence[Prepared]) -> None:
    """Rows for a batch whose vectors are about to be written, as ``pending`` (indexed
    rows stay indexed). Written before the vectors, they mark the batch as in flight:
    reconcile never takes a vector of a pending row for an orphan."""
    values = [_row_values(p, ImageStatus.pending) for p in batch]
    if not values:
        return
    ins = _insert(db, values)
    keep = ("status", "path", "width", "height", "source", "extra", "error", "box",
            *LABEL_FIELDS)
    stmt = ins.on_conflict_do_update(
        index_elements=["id"],
        set_={**{k: ins.excluded[k] for k in keep}, "ingested_at": utcnow()},
        where=Image.status != ImageStatus.indexed,
    )
    with db.session() as s:
        s.execute(stmt)


class BatchConflictError(CarsearchError):
    """Rows of a batch changed under it (reconcile gave them up): the batch is retried."""


def write_rows(db: Database, batch: Sequence[Prepared]) -> None:
    """Mark a batch indexed, with its latest metadata, once its vectors are written.

    Only rows still ``pending`` (or ``indexed``: a re-delivery) change; a row reconcile
    abandoned meanwhile makes the whole batch fail, and its replay writes it again.
    """
    if not batch:
        return
    with db.session() as s:
        for p in batch:
            values = _row_values(p, ImageStatus.indexed)
            values.pop("id")
            values.pop("sha256")
            res = s.execute(update(Image).where(
                Image.id == p.id,
                Image.status.in_([ImageStatus.pending, ImageStatus.indexed]),
            ).values(**values))
            if res.rowcount != 1:
                raise BatchConflictError(
                    f"image {p.id} is no longer pending (reconcile gave it up): retrying"
                )


def quarantine(db: Database, item: IngestItem, reason: str) -> None:
    """Record a rejected file with its reason (keyed by its bytes where it has any). An
    indexed image is never turned into a quarantined one by a bad re-delivery."""
    import hashlib

    try:
        digest = sha256_file(item.path)
    except OSError:
        digest = hashlib.sha256(str(item.path.resolve()).encode()).hexdigest()
    source = item.source if isinstance(item.source, str) else "unknown"
    value = {
        "id": image_id(digest, item.collection),
        "collection": item.collection,
        "sha256": digest,
        "path": str(item.path.resolve()),
        "source": source[:TEXT_LIMITS["source"]] or "unknown",
        "status": ImageStatus.quarantined.value,
        "error": reason[:2000],
    }
    with db.session() as s:
        s.execute(_insert(db, [value]).on_conflict_do_nothing(index_elements=["id"]))
    log.warning("quarantined %s: %s", item.path, reason)


Hook = Callable[[str], None]


def _no_hook(point: str) -> None:
    del point


@dataclass
class BatchWriter:
    """The write half of ingest, shared by the worker and the manifest loader: keep the
    platform's copy, merge with what is known, mark the rows pending, embed with the
    serving version, upsert the vectors, mark the rows indexed; then, if a promotion
    switched the serving version meanwhile, write the batch into the new version's
    collection too, so that no image ends only in the old one.

    ``hook`` is called at named points ("after_upsert", "after_rows"): the crash tests
    kill a worker there, the race tests run a promotion or a reconcile there. A writer
    writes one collection's images (``serving`` is that collection's version).
    """

    db: Database
    store: VectorStore
    encoder_for: Callable[[ModelVersion], Encoder]
    serving: Callable[[], ModelVersion]
    image_dir: Path | None = None
    hook: Hook = _no_hook
    collection: str = DEFAULT_COLLECTION
    vehicle_labels: bool = True

    @classmethod
    def fixed(cls, db: Database, store: VectorStore, encoder: Encoder, version: ModelVersion,
              image_dir: Path | None = None) -> BatchWriter:
        """A writer for one given version and encoder (tests, benchmarks)."""
        kind = collections.kind_of(db, version.image_collection)
        return cls(db, store, lambda _v: encoder, lambda: version, image_dir,
                   collection=version.image_collection, vehicle_labels=kind.vehicle_labels)

    def write(self, batch: Sequence[Prepared]) -> int:
        batch = unique(batch)
        if not batch:
            return 0
        strays = {p.item.collection for p in batch} - {self.collection}
        if strays:
            raise CarsearchError(f"a batch for {self.collection} holds images of "
                                 f"{', '.join(sorted(strays))}")
        if self.image_dir is not None:
            for p in batch:
                keep_copy(p, self.image_dir)
        merge_existing(self.db, batch)
        write_pending(self.db, batch)
        version = self.serving()
        self._upsert(version, batch)
        self.hook("after_upsert")
        write_rows(self.db, batch)
        self.hook("after_rows")
        self._follow_promotion(version, batch)
        return len(batch)

    def _upsert(self, version: ModelVersion, batch: Sequence[Prepared]) -> None:
        self.store.ensure_collection(version.collection, version.dim)
        vectors = embed(self.encoder_for(version), batch)
        self.store.upsert(version.collection, [p.id for p in batch], vectors,
                          vector_rows(batch))

    def _follow_promotion(self, version: ModelVersion, batch: Sequence[Prepared]) -> None:
        """The rows are committed; a promotion that switched before that commit may have
        run its catch-up pass before it too, so the new serving version gets the batch
        from here. (A switch after the commit finds the rows in its catch-up.)"""
        for _ in range(3):
            now = self.serving()
            if now.name == version.name:
                return
            log.info("serving version changed to %s during a batch: writing it there too",
                     now.name)
            self._upsert(now, batch)
            version = now
        log.warning("serving version keeps changing; reconcile repairs what is missing")


def platform_writer(platform: Platform, hook: Hook = _no_hook,
                    collection: str = DEFAULT_COLLECTION) -> BatchWriter:
    """The writer a platform process uses for ``collection``: its serving version as the
    registry says, its encoder, and the platform's own copy of every image under
    IMAGE_DIR."""
    kind = collections.kind_of(platform.db, collection)
    return BatchWriter(platform.db, platform.store, platform.search.encoder_for,
                       lambda: platform.registry.require_serving(collection),
                       platform.settings.image_dir, hook, collection=collection,
                       vehicle_labels=kind.vehicle_labels)


def ingest_items(
    items: Iterable[IngestItem],
    *,
    db: Database,
    writer: BatchWriter,
    max_pixels: int,
    batch_size: int = 64,
    progress: bool = True,
    total: int | None = None,
) -> IngestSummary:
    """Run every stage over `items` in batches, into the writer's collection; bad files are
    quarantined, never fatal."""
    summary = IngestSummary()
    version = writer.serving()
    writer.store.ensure_collection(version.collection, version.dim)
    batch: list[Prepared] = []
    bar = tqdm(items, total=total, desc="ingest", unit="img", disable=not progress)
    for item in bar:
        summary.seen += 1
        if item.collection != writer.collection:
            item = replace(item, collection=writer.collection)
        try:
            p = prepare(item, max_pixels, vehicle_labels=writer.vehicle_labels)
        except ImageRejectedError as exc:
            quarantine(db, item, exc.reason)
            summary.quarantined += 1
            summary.reasons[exc.reason] = summary.reasons.get(exc.reason, 0) + 1
            continue
        summary.fields_rejected += len(p.meta.rejected)
        batch.append(p)
        if len(batch) >= batch_size:
            summary.indexed += writer.write(batch)
            batch = []
    summary.indexed += writer.write(batch)
    if writer.store.needs_flush:
        writer.store.flush(writer.serving().collection)
    return summary
