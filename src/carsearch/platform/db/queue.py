"""The `ingest_jobs` queue: enqueue, claim, heartbeat, complete, fail.

On PostgreSQL jobs are claimed with `SELECT ... FOR UPDATE SKIP LOCKED`, so several
workers share one queue without taking the same job. On SQLite the claim runs inside
`BEGIN IMMEDIATE`, which serialises writers: a safe single-machine equivalent.

A claimed job whose worker stops heartbeating for `visibility_timeout` seconds is
claimable again. A failed job waits 2**attempts seconds (capped) and then retries; after
`max_attempts` it is dead, with its last error kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from carsearch.platform.db.engine import Database, as_utc
from carsearch.platform.db.models import IngestJob, JobState

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    attempts: int
    payload: dict[str, Any]


def now() -> datetime:
    return datetime.now(UTC)


def backoff_seconds(attempts: int, base: float = 1.0) -> float:
    return float(min(MAX_BACKOFF_S, base * (2 ** max(0, attempts - 1))))


def enqueue(
    db: Database, payloads: Sequence[dict[str, Any]], *, kind: str = "image", max_attempts: int = 5
) -> list[int]:
    with db.session() as s:
        jobs = [
            IngestJob(kind=kind, payload=dict(p), max_attempts=max_attempts, state=JobState.queued)
            for p in payloads
        ]
        s.add_all(jobs)
        s.flush()
        return [j.id for j in jobs]


@contextmanager
def _claim_transaction(db: Database) -> Iterator[Session]:
    with db.session() as s:
        if db.engine.dialect.name == "sqlite":
            # Take the write lock up front so two claimers cannot read the same rows.
            s.connection().exec_driver_sql("BEGIN IMMEDIATE")
        yield s


def claim(
    db: Database, worker: str, limit: int, *, visibility_timeout: float = 60.0
) -> list[ClaimedJob]:
    """Claim up to `limit` ready jobs (or jobs whose worker went silent)."""
    t = now()
    stale = t - timedelta(seconds=visibility_timeout)
    ready = or_(
        and_(IngestJob.state == JobState.queued, IngestJob.available_at <= t),
        and_(IngestJob.state == JobState.running, IngestJob.heartbeat_at < stale),
    )
    q = select(IngestJob).where(ready).order_by(IngestJob.id).limit(limit)
    if db.engine.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    with _claim_transaction(db) as s:
        jobs = list(s.scalars(q))
        out = []
        for j in jobs:
            if j.state == JobState.running:
                if j.attempts >= j.max_attempts:  # a poison job: its workers keep dying
                    j.last_error = (f"its worker stopped without finishing it {j.attempts} "
                                    f"times (last {j.locked_by or 'unknown'}; visibility "
                                    f"timeout {visibility_timeout:g} s)")
                    j.state, j.locked_by = JobState.dead, None
                    log.error("job %d is dead: %s", j.id, j.last_error)
                    continue
                log.warning("reclaiming job %d from silent worker %s", j.id, j.locked_by)
            j.state = JobState.running
            j.locked_by = worker
            j.locked_at = t
            j.heartbeat_at = t
            j.attempts += 1
            out.append(ClaimedJob(j.id, j.attempts, dict(j.payload)))
        return out


def heartbeat(db: Database, worker: str, ids: Sequence[int]) -> None:
    if not ids:
        return
    with db.session() as s:
        s.execute(
            update(IngestJob)
            .where(IngestJob.id.in_(ids), IngestJob.locked_by == worker)
            .values(heartbeat_at=now())
        )


def complete(db: Database, worker: str, ids: Sequence[int], note: str | None = None) -> None:
    if not ids:
        return
    with db.session() as s:
        s.execute(
            update(IngestJob)
            .where(IngestJob.id.in_(ids), IngestJob.locked_by == worker)
            .values(state=JobState.done, last_error=note, locked_by=None, updated_at=now())
        )


def fail(db: Database, worker: str, ids: Sequence[int], error: str) -> None:
    """Send jobs back with backoff, or to the dead letters after max_attempts."""
    if not ids:
        return
    with db.session() as s:
        for j in s.scalars(select(IngestJob).where(IngestJob.id.in_(ids))):
            if j.locked_by != worker:
                continue
            j.last_error = error[:4000]
            j.locked_by = None
            if j.attempts >= j.max_attempts:
                j.state = JobState.dead
                log.error("job %d is dead after %d attempts: %s", j.id, j.attempts, error)
            else:
                j.state = JobState.queued
                j.available_at = now() + timedelta(seconds=backoff_seconds(j.attempts))


def counts(db: Database) -> dict[str, int]:
    with db.session() as s:
        rows = s.execute(select(IngestJob.state, func.count()).group_by(IngestJob.state)).all()
    out = {state.value: 0 for state in JobState}
    out.update({(st.value if isinstance(st, JobState) else str(st)): int(n) for st, n in rows})
    return out


def status(db: Database, window_s: float = 300.0) -> dict[str, Any]:
    """Queue counts, lag (age of the oldest waiting job) and recent throughput."""
    t = now()
    with db.session() as s:
        oldest = s.scalar(
            select(func.min(IngestJob.created_at)).where(IngestJob.state == JobState.queued)
        )
        recent, first, last = s.execute(
            select(func.count(), func.min(IngestJob.updated_at),
                   func.max(IngestJob.updated_at)).where(
                IngestJob.state == JobState.done,
                IngestJob.updated_at >= t - timedelta(seconds=window_s),
            )
        ).one()
        dead = s.execute(
            select(IngestJob.id, IngestJob.last_error)
            .where(IngestJob.state == JobState.dead)
            .order_by(IngestJob.id.desc())
            .limit(10)
        ).all()
    oldest, first, last = (as_utc(x) if x is not None else None for x in (oldest, first, last))
    # Jobs done per second while the worker was busy within the window: from the first
    # to the last completion (a burst that ended a minute ago is not diluted by idleness).
    span = max(1.0, (last - first).total_seconds()) if first and last else window_s
    return {
        **counts(db),
        "lag_s": round((t - oldest).total_seconds(), 3) if oldest else 0.0,
        "throughput_per_s": round((recent or 0) / span, 3),
        "dead_jobs": [{"id": i, "error": e} for i, e in dead],
    }
