"""Re-indexing and reconcile: make a version's collection match the database.

`backfill` embeds every indexed image that a version's collection lacks (resumable: it
skips ids already there). `promote_with_backfill` fills the new version's collection
while the old one keeps serving, switches only when it is complete, then runs a catch-up
pass for images the worker indexed with the old version during the switch (a batch that
commits after the catch-up writes itself into the new collection: `BatchWriter`).
`reconcile` compares Milvus ids with the database and repairs either side.

What is never lost. A file that cannot be read while re-indexing (a share unmounted for a
moment, a permission error) is reported and left as it is: its row stays indexed and its
vector in the serving collection stays; a promotion that would leave it behind is refused
unless the operator gives such images up explicitly. Reconcile never deletes a vector an
in-flight batch is about to commit: a batch writes its rows as `pending` before its
vectors, reconcile counts pending rows as wanted, and after deleting orphans it looks at
their rows again and re-embeds any that a batch claimed meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from tqdm import tqdm

from carsearch.ingest.pipeline import (
    LABEL_FIELDS,
    IngestItem,
    Prepared,
    embed,
    prepare,
    vector_rows,
)
from carsearch.platform.db import Image, ImageStatus, ModelVersion, VersionStatus
from carsearch.platform.errors import CarsearchError, ImageRejectedError
from carsearch.platform.runtime import Platform

log = logging.getLogger(__name__)

WANTED = (ImageStatus.indexed, ImageStatus.pending)
STALE_PENDING_S = 3600.0  # a pending row this old belongs to a batch that died


class PromotionBlockedError(CarsearchError):
    """A promotion that would leave indexed images behind; nothing was switched."""


@dataclass
class BackfillReport:
    version: str
    wanted: int = 0
    already: int = 0
    embedded: int = 0
    unreadable: int = 0
    unreadable_examples: list[str] = field(default_factory=list)
    unreadable_ids: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("unreadable_ids")
        return d

    def note_unreadable(self, row: Image, reason: str) -> None:
        self.unreadable += 1
        self.unreadable_ids.append(row.id)
        if len(self.unreadable_examples) < 5:
            self.unreadable_examples.append(f"{row.path}: {reason}")
        log.warning("image %d cannot be re-embedded now (%s): %s; left as it is",
                    row.id, row.path, reason)


def _rows(platform: Platform, ids: Collection[int] | None = None,
          statuses: tuple[ImageStatus, ...] = (ImageStatus.indexed,),
          page: int = 512) -> Iterator[list[Image]]:
    """Rows with one of ``statuses`` (and among ``ids`` when given), a page at a time."""
    wanted = sorted(ids) if ids is not None else None
    last = -1
    while True:
        q = select(Image).where(Image.status.in_(statuses), Image.id > last)
        if wanted is not None:
            chunk = [i for i in wanted if i > last][:page]
            if not chunk:
                return
            q = q.where(Image.id.in_(chunk))
        with platform.db.session() as s:
            rows = list(s.scalars(q.order_by(Image.id).limit(page)))
        if not rows:
            if wanted is None:
                return
            last = chunk[-1]
            continue
        last = rows[-1].id
        yield rows


def image_states(platform: Platform) -> dict[int, tuple[ImageStatus, datetime]]:
    """Status and ingest time of every indexed or pending image."""
    with platform.db.session() as s:
        rows = s.execute(select(Image.id, Image.status, Image.ingested_at)
                         .where(Image.status.in_(WANTED))).all()
    return {int(i): (ImageStatus(st), _aware(at)) for i, st, at in rows}


def indexed_ids(platform: Platform) -> set[int]:
    with platform.db.session() as s:
        return set(s.scalars(select(Image.id).where(Image.status == ImageStatus.indexed)))


def _aware(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def _item(row: Image) -> IngestItem:
    meta = {k: getattr(row, k) for k in LABEL_FIELDS if getattr(row, k) is not None}
    return IngestItem(Path(row.path), row.source, meta)


def backfill(
    platform: Platform, version: ModelVersion, *, batch_size: int = 64, progress: bool = True,
    ids: Collection[int] | None = None, statuses: tuple[ImageStatus, ...] = (ImageStatus.indexed,),
    skip_present: bool = True,
) -> BackfillReport:
    """Embed the images (indexed ones, or ``ids``) that ``version``'s collection lacks.

    A file that cannot be read now, or whose bytes no longer match its id, is reported
    (``unreadable``) and left alone: its row keeps its status, nothing is deleted.
    """
    store = platform.store
    store.ensure_collection(version.collection, version.dim)
    have = store.ids(version.collection) if skip_present else set()
    report = BackfillReport(version.name)
    encoder = platform.search.encoder_for(version)
    total = len(ids) if ids is not None else len(indexed_ids(platform))
    bar = tqdm(total=total, desc=f"re-index {version.name}", unit="img", disable=not progress)
    for rows in _rows(platform, ids, statuses):
        report.wanted += len(rows)
        batch: list[Prepared] = []
        for row in rows:
            if row.id in have:
                report.already += 1
                continue
            try:
                p = prepare(_item(row), platform.settings.max_image_pixels)
            except ImageRejectedError as exc:
                report.note_unreadable(row, exc.reason)
                continue
            if p.id != row.id:
                report.note_unreadable(row, "file changed since it was indexed")
                continue
            batch.append(p)
        for i in range(0, len(batch), batch_size):
            chunk = batch[i : i + batch_size]
            store.upsert(version.collection, [p.id for p in chunk], embed(encoder, chunk),
                         vector_rows(chunk))
            report.embedded += len(chunk)
        bar.update(len(rows))
    bar.close()
    if report.embedded:
        store.flush(version.collection)
    log.info("backfill %s: %s", version.name, report.to_dict())
    return report


def promote_with_backfill(
    platform: Platform, name: str, *, progress: bool = True, give_up_unreadable: bool = False,
    retry_after_s: float = 2.0,
) -> tuple[ModelVersion, BackfillReport]:
    """Fill `name`'s collection, switch serving to it, then catch up.

    Images that cannot be read are tried once more after ``retry_after_s``; if some still
    cannot, the switch is refused (they would be indexed but missing from the new
    collection), unless ``give_up_unreadable``: then they are quarantined with the reason
    and their vectors removed from the current collection first.
    """
    version = platform.registry.get(name)
    platform.registry.verify(version)
    report = backfill(platform, version, progress=progress)
    if report.unreadable:
        time.sleep(retry_after_s)
        again = backfill(platform, version, progress=False, ids=report.unreadable_ids)
        report.embedded += again.embedded
        report.unreadable, report.unreadable_ids = again.unreadable, again.unreadable_ids
        report.unreadable_examples = again.unreadable_examples
    if report.unreadable:
        if not give_up_unreadable:
            raise PromotionBlockedError(
                f"{report.unreadable} indexed image(s) could not be read for re-indexing "
                f"(e.g. {report.unreadable_examples[0]}); nothing was switched. Restore the "
                "files and promote again, or give them up with --give-up-unreadable"
            )
        give_up(platform, report.unreadable_ids, "file unreadable when re-indexing for "
                f"{version.name}")
    promoted = platform.registry.promote(name)
    catch_up = backfill(platform, promoted, progress=False)
    report.embedded += catch_up.embedded
    report.unreadable += catch_up.unreadable
    sync_serving_alias(platform)
    return promoted, report


def give_up(platform: Platform, ids: Collection[int], reason: str) -> int:
    """Quarantine indexed images on the operator's word, and remove their vectors from the
    serving collection. Returns how many rows changed."""
    if not ids:
        return 0
    with platform.db.session() as s:
        res = s.execute(update(Image).where(Image.id.in_(list(ids)),
                                            Image.status == ImageStatus.indexed)
                        .values(status=ImageStatus.quarantined, error=reason[:2000]))
        n = int(res.rowcount or 0)  # type: ignore[attr-defined]
    serving = platform.registry.serving()
    if serving is not None and platform.store.has_collection(serving.collection):
        platform.store.delete(serving.collection, sorted(ids))
    log.warning("gave up %d image(s): %s", n, reason)
    return n


def sync_serving_alias(platform: Platform) -> str | None:
    """Point the Milvus alias ``carsearch_serving`` at the serving version's collection.

    The database says which version serves; the alias is how other Milvus clients reach
    it. It is switched (atomically, by Milvus) after a promotion or rollback has filled
    the new collection, and re-checked by every reconcile, which repairs a crash between
    the database switch and the alias switch. Returns the collection it points to.
    """
    version = platform.registry.serving()
    if version is None or not platform.store.has_collection(version.collection):
        return None
    platform.store.point_alias(version.collection)
    return version.collection


def drop_version_data(platform: Platform, version: ModelVersion) -> list[str]:
    """Drop a retired version's Milvus collection and its saved exact index; returns what
    was dropped. A serving version, or one the serving alias names, is refused."""
    import shutil

    from carsearch.platform.ann_audit import exact_dir
    from carsearch.platform.registry import RegistryError

    current = platform.registry.get(version.name)
    if current.status != VersionStatus.retired:
        raise RegistryError(f"{version.name} is {current.status.value}: retire it first")
    store = platform.store
    if store.alias_target() == current.collection:
        raise RegistryError(f"the serving alias still names {current.collection}: run "
                            "`carsearch reconcile` to point it at the serving version")
    dropped = []
    if store.has_collection(current.collection):
        store.drop(current.collection)
        dropped.append(f"collection {current.collection}")
    exact = exact_dir(platform.settings.data_dir, current.name)
    if exact.exists():
        shutil.rmtree(exact)
        dropped.append(f"exact index {exact}")
    log.info("dropped the data of retired version %s: %s", current.name, dropped)
    return dropped


@dataclass
class ReconcileReport:
    version: str
    milvus: int
    database: int
    missing: int
    orphans: int
    pending: int = 0  # rows of batches in flight (their vectors are not orphans)
    stale_pending: int = 0  # pending rows older than the cut-off: their batch died
    repaired_missing: int = 0
    removed_orphans: int = 0
    restored: int = 0  # vectors deleted as orphans that a batch claimed meanwhile
    unreadable: int = 0  # missing vectors whose file cannot be read now (left as they are)
    given_up: int = 0
    alias: str | None = None  # the collection the serving alias points to, after repair

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reconcile(
    platform: Platform, version: ModelVersion | None = None, *, repair: bool = True,
    progress: bool = True, stale_pending_s: float = STALE_PENDING_S,
    give_up_unreadable: bool = False, hook: Callable[[str], None] | None = None,
) -> ReconcileReport:
    """Compare Milvus ids with the database's wanted images; repair both ways.

    Milvus is read first (Strong), the database second: a vector written before the
    Milvus read belongs to a row that was pending (or indexed) before it, so the database
    read sees it. Orphans are deleted, then their rows read again: one a batch claimed
    since is re-embedded at once. Pending rows older than ``stale_pending_s`` belong to a
    batch that died for good (its job dead); they are quarantined with that reason, in a
    compare-and-set a live batch would fail (and then retry), and their vectors removed.
    ``hook("before_delete")`` runs between the reads and the deletes (the race tests).
    """
    version = version or platform.registry.require_serving()
    store = platform.store
    store.ensure_collection(version.collection, version.dim)
    in_milvus = store.ids(version.collection)
    states = image_states(platform)
    indexed = {i for i, (st, _) in states.items() if st == ImageStatus.indexed}
    pending = set(states) - indexed
    cutoff = datetime.now(UTC) - timedelta(seconds=stale_pending_s)
    stale = {i for i in pending if states[i][1] < cutoff}
    missing = indexed - in_milvus
    orphans = in_milvus - indexed - pending
    rep = ReconcileReport(version.name, len(in_milvus), len(indexed), len(missing),
                          len(orphans), pending=len(pending), stale_pending=len(stale))
    serving = platform.registry.serving()
    rep.alias = store.alias_target()
    if repair:
        if serving is not None and serving.name == version.name:
            rep.alias = sync_serving_alias(platform)
        if hook is not None:
            hook("before_delete")
        rep.removed_orphans = _delete_and_restore(platform, version, orphans, rep)
        if stale:
            _abandon(platform, version, stale, rep)
        if missing:
            b = backfill(platform, version, progress=progress, ids=missing)
            rep.repaired_missing, rep.unreadable = b.embedded, b.unreadable
            if give_up_unreadable and b.unreadable_ids:
                rep.given_up = give_up(platform, b.unreadable_ids,
                                       "file unreadable at reconcile (given up)")
        store.flush(version.collection)
    log.info("reconcile %s: %s", version.name, rep.to_dict())
    return rep


def _delete_and_restore(platform: Platform, version: ModelVersion, ids: set[int],
                        rep: ReconcileReport) -> int:
    """Delete vectors, then re-embed those whose rows a batch has claimed meanwhile (its
    pending row was written after our database read, its upsert before our delete)."""
    if not ids:
        return 0
    platform.store.delete(version.collection, sorted(ids))
    claimed = [i for i, st in _states_of(platform, ids).items() if st in WANTED]
    if claimed:
        b = backfill(platform, version, progress=False, ids=claimed, statuses=WANTED,
                     skip_present=False)
        rep.restored += b.embedded
        rep.unreadable += b.unreadable
        log.info("reconcile: %d vector(s) deleted as orphans were claimed by a batch "
                 "meanwhile and re-embedded", b.embedded)
    return len(ids) - len(claimed)


def _abandon(platform: Platform, version: ModelVersion, ids: set[int],
             rep: ReconcileReport) -> None:
    """Quarantine stale pending rows (compare-and-set on their status and age) and remove
    their vectors; a batch that revived one meanwhile gets it re-embedded."""
    reason = "ingest did not finish (its batch stopped before indexing it): deliver it again"
    with platform.db.session() as s:
        s.execute(update(Image).where(Image.id.in_(sorted(ids)),
                                      Image.status == ImageStatus.pending)
                  .values(status=ImageStatus.quarantined, error=reason))
    _delete_and_restore(platform, version, ids, rep)


def _states_of(platform: Platform, ids: Collection[int]) -> dict[int, ImageStatus]:
    with platform.db.session() as s:
        rows = s.execute(select(Image.id, Image.status).where(Image.id.in_(list(ids)))).all()
    return {int(i): ImageStatus(st) for i, st in rows}
