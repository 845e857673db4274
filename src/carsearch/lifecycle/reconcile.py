"""Reconcile: make the serving collection's ids equal the database's indexed images.

Reconcile never deletes a vector an in-flight batch is about to commit: a batch writes its
rows as `pending` before its vectors, reconcile counts pending rows as wanted, and after
deleting orphans it looks at their rows again and re-embeds any that a batch claimed
meanwhile. Pending rows of a batch that died for good are quarantined with that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from carsearch.lifecycle.reindex import backfill, give_up, sync_serving_alias
from carsearch.platform.collections import DEFAULT_COLLECTION, alias_for
from carsearch.platform.db import ImageStatus, ModelVersion, images
from carsearch.platform.runtime import Platform

log = logging.getLogger(__name__)

STALE_PENDING_S = 3600.0  # a pending row this old belongs to a batch that died


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
    collection: str = DEFAULT_COLLECTION,
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
    version = version or platform.registry.require_serving(collection)
    store = platform.store
    store.ensure_collection(version.collection, version.dim)
    in_milvus = store.ids(version.collection)
    states = images.states(platform.db, version.image_collection)
    indexed = {i for i, (st, _) in states.items() if st == ImageStatus.indexed}
    pending = set(states) - indexed
    cutoff = datetime.now(UTC) - timedelta(seconds=stale_pending_s)
    stale = {i for i in pending if states[i][1] < cutoff}
    missing = indexed - in_milvus
    orphans = in_milvus - indexed - pending
    rep = ReconcileReport(version.name, len(in_milvus), len(indexed), len(missing),
                          len(orphans), pending=len(pending), stale_pending=len(stale))
    serving = platform.registry.serving(version.image_collection)
    rep.alias = platform.admin.alias_target(alias_for(version.image_collection))
    if repair:
        if serving is not None and serving.name == version.name:
            rep.alias = sync_serving_alias(platform, version.image_collection)
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
        platform.admin.flush(version.collection)
    log.info("reconcile %s: %s", version.name, rep.to_dict())
    return rep


def _delete_and_restore(platform: Platform, version: ModelVersion, ids: set[int],
                        rep: ReconcileReport) -> int:
    """Delete vectors, then re-embed those whose rows a batch has claimed meanwhile (its
    pending row was written after our database read, its upsert before our delete)."""
    if not ids:
        return 0
    platform.store.delete(version.collection, sorted(ids))
    claimed = [i for i, st in images.statuses_of(platform.db, ids).items()
               if st in images.WANTED]
    if claimed:
        b = backfill(platform, version, progress=False, ids=claimed, statuses=images.WANTED,
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
    images.set_status(platform.db, ids, ImageStatus.quarantined, where=ImageStatus.pending,
                      error=reason)
    _delete_and_restore(platform, version, ids, rep)


