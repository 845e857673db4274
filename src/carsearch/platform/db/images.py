"""Queries of the `images` table that several parts share (reads, and the status changes
that lifecycle makes). The ingest pipeline is the one writer of new rows (pending,
indexed, quarantined).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update

from carsearch.platform.db.engine import Database, as_utc
from carsearch.platform.db.models import Image, ImageStatus
from carsearch.platform.ids import MAX_ID

WANTED = (ImageStatus.indexed, ImageStatus.pending)


def in_collection(collection: str | None) -> list[Any]:
    """The condition for rows of ``collection`` (none for None: every collection)."""
    return [] if collection is None else [Image.collection == collection]


def indexed_ids(db: Database, collection: str | None = None) -> set[int]:
    with db.session() as s:
        return set(s.scalars(select(Image.id).where(Image.status == ImageStatus.indexed,
                                                    *in_collection(collection))))


def states(db: Database, collection: str | None = None) -> dict[int, tuple[ImageStatus, datetime]]:
    """Status and ingest time of every indexed or pending image (of ``collection``)."""
    with db.session() as s:
        rows = s.execute(select(Image.id, Image.status, Image.ingested_at)
                         .where(Image.status.in_(WANTED), *in_collection(collection))).all()
    return {int(i): (ImageStatus(st), as_utc(at)) for i, st, at in rows}


def statuses_of(db: Database, ids: Collection[int]) -> dict[int, ImageStatus]:
    with db.session() as s:
        rows = s.execute(select(Image.id, Image.status).where(Image.id.in_(list(ids)))).all()
    return {int(i): ImageStatus(st) for i, st in rows}


def counts_by_status(db: Database, collection: str | None = None) -> dict[str, int]:
    """Rows by status (every status present, zero where none)."""
    with db.session() as s:
        rows = s.execute(select(Image.status, func.count())
                         .where(*in_collection(collection)).group_by(Image.status)).all()
    out = {st.value: 0 for st in ImageStatus}
    out.update({ImageStatus(st).value: int(n) for st, n in rows})
    return out


def by_ids(db: Database, ids: Sequence[int]) -> dict[int, Image]:
    if not ids:
        return {}
    with db.session() as s:
        return {r.id: r for r in s.scalars(select(Image).where(Image.id.in_(list(ids))))}


def pages(db: Database, ids: Collection[int] | None = None,
          statuses: tuple[ImageStatus, ...] = (ImageStatus.indexed,),
          page: int = 512, collection: str | None = None) -> Iterator[list[Image]]:
    """Rows with one of ``statuses`` (and among ``ids`` when given, and of ``collection``),
    a page at a time, in id order."""
    wanted = sorted(ids) if ids is not None else None
    last = -1
    while True:
        q = select(Image).where(Image.status.in_(statuses), Image.id > last,
                                *in_collection(collection))
        chunk: list[int] = []
        if wanted is not None:
            chunk = [i for i in wanted if i > last][:page]
            if not chunk:
                return
            q = q.where(Image.id.in_(chunk))
        with db.session() as s:
            rows = list(s.scalars(q.order_by(Image.id).limit(page)))
        if not rows:
            if wanted is None:
                return
            last = chunk[-1]
            continue
        last = rows[-1].id
        yield rows


def set_status(db: Database, ids: Collection[int], status: ImageStatus, *, where: ImageStatus,
               error: str | None = None) -> int:
    """Change ``ids`` from status ``where`` to ``status`` (a compare-and-set: rows in
    another status are left alone); returns how many changed."""
    if not ids:
        return 0
    with db.session() as s:
        res = s.execute(update(Image).where(Image.id.in_(sorted(ids)), Image.status == where)
                        .values(status=status, error=error))
        return int(res.rowcount or 0)  # type: ignore[attr-defined]


def indexed(*where: Any) -> list[Any]:
    """Conditions for indexed rows, plus ``where``."""
    return [Image.status == ImageStatus.indexed, *where]


def _pivot(seed: int) -> int:
    if seed == 0:
        return 0
    return int(hashlib.sha256(f"carsearch-drift-{seed}".encode()).hexdigest()[:16], 16) & MAX_ID


def sample_ids(db: Database, where: list[Any], n: int, seed: int = 0) -> tuple[list[int], int]:
    """``(ids, total)``: up to ``n`` image ids matching ``where``, and how many match.

    Image ids are the first 63 bits of the images' sha256, so a run of consecutive ids from a
    seeded starting point (wrapping round) is a uniform, deterministic sample that the
    primary-key index serves without reading every row.
    """
    pivot = _pivot(seed)
    base = select(Image.id).where(*where).order_by(Image.id)
    with db.session() as s:
        total = int(s.scalar(select(func.count()).select_from(Image).where(*where)) or 0)
        ids = [int(i) for i in s.scalars(base.where(Image.id >= pivot).limit(n))]
        if len(ids) < n and pivot:
            ids += [int(i) for i in s.scalars(base.where(Image.id < pivot).limit(n - len(ids)))]
    return ids, total


def labels_of(db: Database, ids: Collection[int]) -> dict[int, tuple[str | None, str | None]]:
    """``{id: (class_name, make)}``."""
    if not ids:
        return {}
    with db.session() as s:
        rows = s.execute(select(Image.id, Image.class_name, Image.make)
                         .where(Image.id.in_(list(ids)))).all()
    return {int(i): (cls, make) for i, cls, make in rows}


def class_names(db: Database) -> list[str]:
    """The distinct class names of indexed images, sorted."""
    stmt = (select(Image.class_name)
            .where(Image.status == ImageStatus.indexed, Image.class_name.is_not(None))
            .distinct())
    with db.session() as s:
        return sorted({str(c).strip() for c in s.scalars(stmt) if c and str(c).strip()})


def distinct_values(db: Database, column: Any) -> list[Any]:
    """The distinct non-empty values of a column over indexed images."""
    with db.session() as s:
        stmt = select(column).distinct().where(Image.status == ImageStatus.indexed,
                                                column.is_not(None))
        return [v for v in s.scalars(stmt) if v not in ("", None)]


def unlabelled_ids(db: Database, collection: str, *, since: datetime | None = None,
                   limit: int = 500) -> list[int]:
    """Indexed images of ``collection`` with no make (nobody labelled them), newest first."""
    q = select(Image.id).where(Image.collection == collection,
                               Image.status == ImageStatus.indexed, Image.make.is_(None))
    if since is not None:
        q = q.where(Image.ingested_at >= since)
    with db.session() as s:
        return [int(i) for i in s.scalars(q.order_by(Image.ingested_at.desc()).limit(limit))]
