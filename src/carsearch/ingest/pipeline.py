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
from carsearch.platform.images import DECODE_MAX_SIDE, decode_file, sha256_file
from carsearch.platform.models.encoder import Encoder
from carsearch.platform.models.image_policy import check_box
from carsearch.platform.runtime import Platform
from carsearch.platform.vectors.protocol import VectorRow, VectorStore
from carsearch.platform.vehicles import body_category, parse_class_name

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
    image: PILImage.Image  # decoded for embedding: its longer side <= DECODE_MAX_SIDE
    meta: CleanMeta
    stored: Path | None = None  # the platform's own copy, once kept
    size: tuple[int, int] | None = None  # (width, height) in the file; image.size if None
    # The indexed row's label fields when this batch read them (merge_existing; None:
    # no indexed row). write_rows changes the labels only if they are still these (CAS).
    base: dict[str, Any] | None = None

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
    got = decode_file(item.path, max_pixels=max_pixels, max_side=DECODE_MAX_SIDE)
    return Prepared(item=item, sha256=digest, id=image_id(digest, item.collection),
                    image=got.image, size=got.size,
                    meta=clean_metadata(item.meta, item.source,
                                        vehicle_labels=vehicle_labels, size=got.size))


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
    # A link in the store (left by an older version) is replaced by the bytes it names.
    linked = dest.is_symlink()
    if linked or (src != dest.resolve()
                  and not (dest.is_file() and sha256_file(dest) == p.sha256)):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except BaseException:  # a full disk, say: no partial copy stays behind
            tmp.unlink(missing_ok=True)
            raise
    p.stored = dest
    return dest


def embed(encoder: Encoder, batch: Sequence[Prepared]) -> np.ndarray:
    """The vectors of a batch under the version's image policy: each image cropped to its
    box where it has one (the whole photo stays the stored file and the thumbnail)."""
    return encoder.encode_images([p.image for p in batch], [p.meta.box for p in batch])


def vector_rows_now(db: Database, ids: Sequence[int]) -> dict[int, VectorRow]:
    """The scalar fields the database's rows say ``ids`` should carry in Milvus now."""
    cols = [getattr(Image, k) for k in LABEL_FIELDS]
    with db.session() as s:
        found = s.execute(select(Image.id, Image.source, *cols).where(
            Image.id.in_(list(ids)))).all()
    return {int(r[0]): vector_row(dict(zip(LABEL_FIELDS, r[2:], strict=True)), r[1])
            for r in found}


def sync_labels(db: Database, store: VectorStore, collection: str,
                written: dict[int, VectorRow], vectors: dict[int, np.ndarray],
                *, rounds: int = 5) -> int:
    """After writing ``vectors`` with the scalar fields ``written`` into ``collection``,
    re-read the rows' labels and re-write the fields of any that changed meanwhile,
    until a read finds nothing new. Returns how many were re-written.

    Every writer of labels commits the database first and Milvus after, and checks
    again after its Milvus write: whichever of two racing writers (a label import, a
    re-delivery, a promotion's re-index) writes Milvus last has read the database after
    the other's commit, so both stores end with the database's labels."""
    fixed = 0
    for _ in range(rounds):
        now = vector_rows_now(db, list(written))
        stale = [i for i, row in now.items() if row.as_fields() != written[i].as_fields()]
        if not stale:
            return fixed
        store.upsert(collection, stale, np.stack([vectors[i] for i in stale]),
                     [now[i] for i in stale])
        written.update({i: now[i] for i in stale})
        fixed += len(stale)
        log.info("labels of %d image(s) changed while %s was written: re-written",
                 len(stale), collection)
    log.warning("labels keep changing under %s; reconcile repairs what is left", collection)
    return fixed


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
        if row.status == ImageStatus.indexed:  # others are rewritten by write_pending
            p.base = {k: getattr(row, k) for k in LABEL_FIELDS}
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
        "width": (p.size or p.image.size)[0],
        "height": (p.size or p.image.size)[1],
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


def _same_labels(labels: dict[str, Any]) -> list[Any]:
    return [getattr(Image, k).is_(None) if labels.get(k) is None
            else getattr(Image, k) == labels[k] for k in LABEL_FIELDS]


def _three_way(base: dict[str, Any], now: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Labels after a concurrent change: a field someone changed since ``base`` was read
    keeps their value; the others take this delivery's."""
    merged = {k: now[k] if now.get(k) != base.get(k) else ours.get(k) for k in LABEL_FIELDS}
    return {k: v for k, v in merged.items() if v is not None}


def write_rows(db: Database, batch: Sequence[Prepared]) -> None:
    """Mark a batch indexed, with its latest metadata, once its vectors are written.

    Only rows still ``pending`` (or ``indexed``: a re-delivery) change; a row reconcile
    abandoned meanwhile makes the whole batch fail, and its replay writes it again. A
    re-delivery's labels are compare-and-set against the labels it merged with: where a
    label import changed them meanwhile, the fields it changed keep its values (the
    writer then re-writes Milvus to match: `sync_labels`).
    """
    if not batch:
        return
    live = [ImageStatus.pending, ImageStatus.indexed]
    with db.session() as s:
        for p in batch:
            for _ in range(5):
                values = _row_values(p, ImageStatus.indexed)
                values.pop("id")
                values.pop("sha256")
                guard = _same_labels(p.base) if p.base is not None else []
                res = s.execute(update(Image).where(
                    Image.id == p.id, Image.status.in_(live), *guard).values(**values))
                if res.rowcount == 1:
                    break
                row = s.get(Image, p.id, populate_existing=True)
                if p.base is None or row is None or row.status not in live:
                    raise BatchConflictError(
                        f"image {p.id} is no longer pending (reconcile gave it up): retrying"
                    )
                now = {k: getattr(row, k) for k in LABEL_FIELDS}
                log.info("labels of image %d changed while it was re-delivered: merging",
                         p.id)
                p.meta = replace(p.meta, labels=_three_way(p.base, now, p.meta.labels))
                p.base = now
            else:
                raise BatchConflictError(f"labels of image {p.id} keep changing: retrying")


def quarantine(db: Database, item: IngestItem, reason: str, *,
               follow_links: bool = True) -> None:
    """Record a rejected file with its reason (keyed by its bytes where it has any). An
    indexed image is never turned into a quarantined one by a bad re-delivery. With
    ``follow_links`` false a symbolic link is recorded by its own path: its target is
    never read."""
    import hashlib

    link = not follow_links and item.path.is_symlink()
    where = item.path.absolute() if link else item.path.resolve()
    try:
        if link:
            raise OSError("a link: not followed")
        digest = sha256_file(item.path)
    except OSError:
        digest = hashlib.sha256(str(where).encode()).hexdigest()
    source = item.source if isinstance(item.source, str) else "unknown"
    value = {
        "id": image_id(digest, item.collection),
        "collection": item.collection,
        "sha256": digest,
        "path": str(where),
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
        written = self._upsert(version, batch)
        self.hook("after_upsert")
        write_rows(self.db, batch)
        self.hook("after_rows")
        self._sync(version, batch, written)
        self._follow_promotion(version, batch)
        return len(batch)

    def _upsert(self, version: ModelVersion,
                batch: Sequence[Prepared]) -> tuple[np.ndarray, list[VectorRow]]:
        self.store.ensure_collection(version.collection, version.dim)
        vectors = embed(self.encoder_for(version), batch)
        rows = vector_rows(batch)
        self.store.upsert(version.collection, [p.id for p in batch], vectors, rows)
        return vectors, rows

    def _sync(self, version: ModelVersion, batch: Sequence[Prepared],
              written: tuple[np.ndarray, list[VectorRow]]) -> None:
        """The rows are committed: a label import that committed after this batch read
        them has been merged into them (write_rows); write what they say now into the
        collection (a no-op read when nothing changed)."""
        vectors, rows = written
        sync_labels(self.db, self.store, version.collection,
                    {p.id: r for p, r in zip(batch, rows, strict=True)},
                    {p.id: v for p, v in zip(batch, vectors, strict=True)})

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
            self._sync(now, batch, self._upsert(now, batch))
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
    writer.store.settle(writer.serving().collection)
    return summary
