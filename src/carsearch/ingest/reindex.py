"""Re-indexing and reconcile: make a version's collection match the database.

`backfill` embeds every indexed image that a version's collection lacks (resumable: it
skips ids already there). `promote_with_backfill` fills the new version's collection
while the old one keeps serving, switches only when it is complete, then runs a catch-up
pass for images the worker indexed with the old version during the switch.
`reconcile` compares Milvus ids with the database and repairs either side.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
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
from carsearch.platform.errors import ImageRejectedError
from carsearch.platform.runtime import Platform

log = logging.getLogger(__name__)


@dataclass
class BackfillReport:
    version: str
    wanted: int = 0
    already: int = 0
    embedded: int = 0
    lost: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _indexed_rows(platform: Platform, page: int = 512) -> Iterator[list[Image]]:
    last = -1
    while True:
        with platform.db.session() as s:
            rows = list(s.scalars(
                select(Image)
                .where(Image.status == ImageStatus.indexed, Image.id > last)
                .order_by(Image.id)
                .limit(page)
            ))
        if not rows:
            return
        last = rows[-1].id
        yield rows


def indexed_ids(platform: Platform) -> set[int]:
    with platform.db.session() as s:
        return set(s.scalars(select(Image.id).where(Image.status == ImageStatus.indexed)))


def _item(row: Image) -> IngestItem:
    meta = {k: getattr(row, k) for k in LABEL_FIELDS if getattr(row, k) is not None}
    return IngestItem(Path(row.path), row.source, meta)


def _mark_lost(platform: Platform, image_id: int, reason: str) -> None:
    with platform.db.session() as s:
        row = s.get(Image, image_id)
        if row is not None:
            row.status = ImageStatus.quarantined
            row.error = reason
    log.warning("image %d cannot be re-embedded: %s", image_id, reason)


def backfill(
    platform: Platform, version: ModelVersion, *, batch_size: int = 64, progress: bool = True
) -> BackfillReport:
    """Embed every indexed image missing from `version`'s collection."""
    store = platform.store
    store.ensure_collection(version.collection, version.dim)
    have = store.ids(version.collection)
    report = BackfillReport(version.name)
    encoder = platform.search.encoder_for(version)
    total = len(indexed_ids(platform))
    bar = tqdm(total=total, desc=f"re-index {version.name}", unit="img", disable=not progress)
    for rows in _indexed_rows(platform):
        report.wanted += len(rows)
        batch: list[Prepared] = []
        for row in rows:
            if row.id in have:
                report.already += 1
                continue
            try:
                p = prepare(_item(row), platform.settings.max_image_pixels)
            except ImageRejectedError as exc:
                _mark_lost(platform, row.id, f"re-index: {exc.reason}")
                report.lost += 1
                continue
            if p.id != row.id:
                _mark_lost(platform, row.id, "re-index: file changed since it was indexed")
                report.lost += 1
                continue
            batch.append(p)
        for i in range(0, len(batch), batch_size):
            chunk = batch[i : i + batch_size]
            store.upsert(version.collection, [p.id for p in chunk], embed(encoder, chunk),
                         vector_rows(chunk))
            report.embedded += len(chunk)
        bar.update(len(rows))
    bar.close()
    store.flush(version.collection)
    log.info("backfill %s: %s", version.name, report.to_dict())
    return report


def promote_with_backfill(
    platform: Platform, name: str, *, progress: bool = True
) -> tuple[ModelVersion, BackfillReport]:
    """Fill `name`'s collection, switch serving to it, then catch up."""
    version = platform.registry.get(name)
    platform.registry.verify(version)
    report = backfill(platform, version, progress=progress)
    promoted = platform.registry.promote(name)
    catch_up = backfill(platform, promoted, progress=False)
    report.embedded += catch_up.embedded
    report.lost += catch_up.lost
    sync_serving_alias(platform)
    return promoted, report


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
    repaired_missing: int = 0
    removed_orphans: int = 0
    lost: int = 0
    alias: str | None = None  # the collection the serving alias points to, after repair

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reconcile(
    platform: Platform, version: ModelVersion | None = None, *, repair: bool = True,
    progress: bool = True,
) -> ReconcileReport:
    """Compare Milvus ids with the database's indexed images; repair both ways."""
    version = version or platform.registry.require_serving()
    store = platform.store
    store.ensure_collection(version.collection, version.dim)
    in_milvus = store.ids(version.collection)
    in_db = indexed_ids(platform)
    missing = in_db - in_milvus
    orphans = in_milvus - in_db
    rep = ReconcileReport(version.name, len(in_milvus), len(in_db), len(missing), len(orphans))
    serving = platform.registry.serving()
    rep.alias = platform.store.alias_target()
    if repair and serving is not None and serving.name == version.name:
        rep.alias = sync_serving_alias(platform)
    if repair:
        if orphans:
            store.delete(version.collection, sorted(orphans))
            rep.removed_orphans = len(orphans)
        if missing:
            b = backfill(platform, version, progress=progress)
            rep.repaired_missing, rep.lost = b.embedded, b.lost
        store.flush(version.collection)
    log.info("reconcile %s: %s", version.name, rep.to_dict())
    return rep
