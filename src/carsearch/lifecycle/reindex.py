"""Re-indexing and reconcile: make a version's collection match the database.

`backfill` embeds every indexed image that a version's collection lacks (resumable: it
skips ids already there). `promote_with_backfill` fills the new version's collection
while the old one keeps serving, switches only when it is complete, then runs a catch-up
pass for images the worker indexed with the old version during the switch (a batch that
commits after the catch-up writes itself into the new collection: `BatchWriter`).
`carsearch.lifecycle.reconcile` compares Milvus ids with the database and repairs either
side.

What is never lost. A file that cannot be read while re-indexing (a share unmounted for a
moment, a permission error) is reported and left as it is: its row stays indexed and its
vector in the serving collection stays; a promotion that would leave it behind is refused
unless the operator gives such images up explicitly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from carsearch.ingest.pipeline import (
    LABEL_FIELDS,
    IngestItem,
    Prepared,
    embed,
    prepare,
    sync_labels,
    vector_rows,
)
from carsearch.platform.collections import DEFAULT_COLLECTION, alias_for
from carsearch.platform.db import Image, ImageStatus, ModelVersion, VersionStatus, images
from carsearch.platform.errors import CarsearchError, ImageRejectedError
from carsearch.platform.models.encoder import Encoder
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


def _item(row: Image) -> IngestItem:
    meta: dict[str, object] = {
        k: getattr(row, k) for k in LABEL_FIELDS if getattr(row, k) is not None}
    if row.box:  # re-embedded under the new version's policy, with the stored box
        meta["box"] = list(row.box)
    return IngestItem(Path(row.path), row.source, meta, row.collection)


def backfill(
    platform: Platform, version: ModelVersion, *, batch_size: int = 32, progress: bool = True,
    ids: Collection[int] | None = None, statuses: tuple[ImageStatus, ...] = (ImageStatus.indexed,),
    skip_present: bool = True,
) -> BackfillReport:
    """Embed the images (indexed ones, or ``ids``) of the version's image collection that
    its Milvus collection lacks.

    A file that cannot be read now, or whose bytes no longer match its id, is reported
    (``unreadable``) and left alone: its row keeps its status, nothing is deleted.

    Memory: a page of rows is read at once, but its images are decoded (reduced to
    DECODE_MAX_SIDE), embedded and written ``batch_size`` at a time, so no more than one
    chunk of decoded images is held, whatever the page size or the photos' pixel counts.
    Labels: after each chunk is written, the rows' labels are read again and any that a
    label import changed meanwhile are re-written (`sync_labels`).
    """
    store = platform.store
    store.ensure_collection(version.collection, version.dim)
    have = store.ids(version.collection) if skip_present else set()
    report = BackfillReport(version.name)
    encoder = platform.search.encoder_for(version)
    total = (len(ids) if ids is not None
             else len(images.indexed_ids(platform.db, version.image_collection)))
    bar = tqdm(total=total, desc=f"re-index {version.name}", unit="img", disable=not progress)
    for rows in images.pages(platform.db, ids, statuses, collection=version.image_collection):
        report.wanted += len(rows)
        todo = [row for row in rows if row.id not in have]
        report.already += len(rows) - len(todo)
        for i in range(0, len(todo), batch_size):
            _embed_chunk(platform, version, encoder, todo[i : i + batch_size], report)
        bar.update(len(rows))
    bar.close()
    if report.embedded:
        platform.admin.flush(version.collection)
    log.info("backfill %s: %s", version.name, report.to_dict())
    return report


def _embed_chunk(platform: Platform, version: ModelVersion, encoder: Encoder,
                 rows: list[Image], report: BackfillReport) -> None:
    """Decode, embed and write one chunk of rows into the version's collection, then
    bring its labels up to date with the database."""
    chunk: list[Prepared] = []
    for row in rows:
        try:
            p = prepare(_item(row), platform.settings.max_image_pixels)
        except ImageRejectedError as exc:
            report.note_unreadable(row, exc.reason)
            continue
        if p.id != row.id:
            report.note_unreadable(row, "file changed since it was indexed")
            continue
        chunk.append(p)
    if not chunk:
        return
    ids = [p.id for p in chunk]
    vectors = embed(encoder, chunk)
    written = vector_rows(chunk)
    del chunk[:]  # the decoded images go now, before the next chunk is decoded
    platform.store.upsert(version.collection, ids, vectors, written)
    report.embedded += len(ids)
    sync_labels(platform.db, platform.store, version.collection,
                dict(zip(ids, written, strict=True)), dict(zip(ids, vectors, strict=True)))


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
    sync_serving_alias(platform, promoted.image_collection)
    return promoted, report


def give_up(platform: Platform, ids: Collection[int], reason: str) -> int:
    """Quarantine indexed images on the operator's word, and remove their vectors from the
    serving collections. Returns how many rows changed."""
    if not ids:
        return 0
    n = images.set_status(platform.db, ids, ImageStatus.quarantined,
                          where=ImageStatus.indexed, error=reason[:2000])
    for serving in platform.registry.all_serving():
        if platform.store.has_collection(serving.collection):
            platform.store.delete(serving.collection, sorted(ids))
    log.warning("gave up %d image(s): %s", n, reason)
    return n


def sync_serving_alias(platform: Platform, collection: str = DEFAULT_COLLECTION) -> str | None:
    """Point the Milvus alias of an image collection (``carsearch_serving`` for vehicles,
    ``carsearch_serving_<name>`` for others) at its serving version's collection.

    The database says which version serves; the alias is how other Milvus clients reach
    it. It is switched (atomically, by Milvus) after a promotion or rollback has filled
    the new collection, and re-checked by every reconcile, which repairs a crash between
    the database switch and the alias switch. Returns the collection it points to.
    """
    version = platform.registry.serving(collection)
    if version is None or not platform.store.has_collection(version.collection):
        return None
    platform.admin.point_alias(version.collection, alias_for(collection))
    return version.collection


def drop_version_data(platform: Platform, version: ModelVersion) -> list[str]:
    """Drop a retired version's Milvus collection and its saved exact index; returns what
    was dropped. A serving version, or one the serving alias names, is refused."""
    import shutil

    from carsearch.platform.models.registry import RegistryError
    from carsearch.platform.vectors.exact import exact_dir

    current = platform.registry.get(version.name)
    if current.status != VersionStatus.retired:
        raise RegistryError(f"{version.name} is {current.status.value}: retire it first")
    store = platform.store
    if platform.admin.alias_target(alias_for(current.image_collection)) == current.collection:
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
