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

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session, defer

from carsearch.platform.db.engine import Database, as_utc
from carsearch.platform.db.models import IngestJob, JobState

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    attempts: int
    payload: dict[str, Any]


MAX_PATH_CHARS = 4096
_TEXT_KEYS = ("source", "collection", "original_name")


def payload_problem(payload: Any) -> str | None:
    """Why an ``image`` job's payload cannot be worked on (None: it can). Any system may
    insert rows, so the payload is checked before a worker takes it: a JSON object with
    a non-empty text ``path``, text (or no) ``source``/``collection``, an object (or no)
    ``meta``. A payload that fails costs that job alone: it goes dead with this reason."""
    if not isinstance(payload, dict):
        return f"malformed payload: a JSON {_json_kind(payload)}, not an object"
    path = payload.get("path")
    if not isinstance(path, str) or not path.strip():
        return f"malformed payload: 'path' is {_json_kind(path)}, not a file path"
    if "\x00" in path or len(path) > MAX_PATH_CHARS:
        return "malformed payload: 'path' holds NUL or is longer than 4096 characters"
    for key in _TEXT_KEYS:
        value = payload.get(key)
        if value is not None and not isinstance(value, str):
            return f"malformed payload: '{key}' is {_json_kind(value)}, not text"
    meta = payload.get("meta")
    if meta is not None and not isinstance(meta, dict):
        return f"malformed payload: 'meta' is {_json_kind(meta)}, not an object"
    return None


def _object_problem(payload: Any) -> str | None:
    if isinstance(payload, dict):
        return None
    return f"malformed payload: a JSON {_json_kind(payload)}, not an object"


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def now() -> datetime:
    return datetime.now(UTC)


def backoff_seconds(attempts: int, base: float = 1.0) -> float:
    return float(min(MAX_BACKOFF_S, base * (2 ** max(0, attempts - 1))))


ENQUEUE_CHUNK = 5000


def enqueue(
    db: Database, payloads: Sequence[dict[str, Any]], *, kind: str = "image", max_attempts: int = 5
) -> list[int]:
    """Queue one job per payload; their ids, in the payloads' order.

    The rows go in as one multi-row ``INSERT ... RETURNING`` per chunk of
    `ENQUEUE_CHUNK` (not one ORM object each), in one transaction: all are queued or
    none. Queueing the same file twice is harmless, as it always was: the second job
    finds the image's content hash already stored and ends as a duplicate."""
    if not payloads:
        return []
    t = now()
    table = IngestJob.__table__
    sqlite = db.engine.dialect.name == "sqlite"
    # PostgreSQL: SQLAlchemy's "insertmanyvalues" sends multi-row INSERTs whose RETURNING
    # it matches to the parameters' order. SQLite's RETURNING order is unspecified, and
    # asking SQLAlchemy to sort it there falls back to a statement per row; but SQLite
    # gives each new row the largest rowid + 1 in the order the rows are inserted, and
    # the write lock is held from the first chunk on, so this chunk's ids, sorted, are
    # its rows in order.
    stmt = insert(table).returning(table.c.id, sort_by_parameter_order=not sqlite)
    ids: list[int] = []
    with db.session() as s:
        if sqlite:
            s.connection().exec_driver_sql("BEGIN IMMEDIATE")
        for start in range(0, len(payloads), ENQUEUE_CHUNK):
            rows = [
                {"kind": kind, "payload": dict(p), "max_attempts": max_attempts,
                 "state": JobState.queued, "attempts": 0, "available_at": t,
                 "created_at": t, "updated_at": t}
                for p in payloads[start:start + ENQUEUE_CHUNK]
            ]
            got = list(s.connection().execute(stmt, rows).scalars())
            ids.extend(sorted(got) if sqlite else got)
    return ids


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
    # The payload is read job by job (below), not with the rows: one that cannot even be
    # decoded (JSON nested too deeply) must cost its own job, never the claim.
    q = (select(IngestJob).options(defer(IngestJob.payload)).where(ready)
         .order_by(IngestJob.id))
    if db.engine.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    out: list[ClaimedJob] = []
    with _claim_transaction(db) as s:
        # Rows that go dead here (a poison job, a malformed payload) leave the ready set,
        # so the next read finds the jobs behind them: a claim is never empty while
        # good jobs wait, however many bad rows come first.
        while len(out) < limit:
            jobs = list(s.scalars(q.limit(limit - len(out))))
            if not jobs:
                break
            out.extend(c for c in (_take(s, j, worker, t, visibility_timeout) for j in jobs)
                       if c is not None)
            s.flush()
    return out


def _take(s: Session, j: IngestJob, worker: str, t: datetime,
          visibility_timeout: float) -> ClaimedJob | None:
    """Claim one ready row, or send it to the dead letters (None) with its reason."""
    if j.state == JobState.running:
        if j.attempts >= j.max_attempts:  # a poison job: its workers keep dying
            j.last_error = (f"its worker stopped without finishing it {j.attempts} "
                            f"times (last {j.locked_by or 'unknown'}; visibility "
                            f"timeout {visibility_timeout:g} s)")
            j.state, j.locked_by = JobState.dead, None
            log.error("job %d is dead: %s", j.id, j.last_error)
            return None
        log.warning("reclaiming job %d from silent worker %s", j.id, j.locked_by)
    payload, problem = _read_payload(s, j.id)
    if problem is None:
        problem = payload_problem(payload) if j.kind == "image" else _object_problem(payload)
    j.attempts += 1
    if problem is not None:  # costs this job alone, never the claim
        j.state, j.locked_by, j.last_error = JobState.dead, None, problem
        log.error("job %d is dead: %s", j.id, problem)
        return None
    j.state = JobState.running
    j.locked_by = worker
    j.locked_at = t
    j.heartbeat_at = t
    return ClaimedJob(j.id, j.attempts, dict(payload))


def _read_payload(s: Session, job_id: int) -> tuple[Any, str | None]:
    try:
        return s.execute(select(IngestJob.payload).where(IngestJob.id == job_id)).scalar_one(), None
    except (RecursionError, ValueError, TypeError, MemoryError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else type(exc).__name__
        return None, f"malformed payload: cannot be decoded ({why})"


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


def _held(s: Session, worker: str, ids: Sequence[int]) -> list[IngestJob]:
    """The jobs of ``ids`` that ``worker`` still holds (payloads not loaded)."""
    return [j for j in s.scalars(select(IngestJob).options(defer(IngestJob.payload))
                                 .where(IngestJob.id.in_(ids))) if j.locked_by == worker]


def fail(db: Database, worker: str, ids: Sequence[int], error: str) -> None:
    """Send jobs back with backoff, or to the dead letters after max_attempts."""
    if not ids:
        return
    with db.session() as s:
        for j in _held(s, worker, ids):
            j.last_error = error[:4000]
            j.locked_by = None
            if j.attempts >= j.max_attempts:
                j.state = JobState.dead
                log.error("job %d is dead after %d attempts: %s", j.id, j.attempts, error)
            else:
                j.state = JobState.queued
                j.available_at = now() + timedelta(seconds=backoff_seconds(j.attempts))


def release(db: Database, worker: str, ids: Sequence[int], reason: str,
            delay_s: float = 0.0) -> None:
    """Give claimed jobs back without spending an attempt: the worker could not try them
    for a reason outside the jobs (no serving version, the vector store or the image
    store unavailable). ``last_error`` says why they wait."""
    if not ids:
        return
    with db.session() as s:
        for j in _held(s, worker, ids):
            j.state, j.locked_by = JobState.queued, None
            j.attempts = max(0, j.attempts - 1)
            j.last_error = f"waiting: {reason}"[:4000]
            j.available_at = now() + timedelta(seconds=delay_s)


def withdraw(db: Database, ids: Sequence[int]) -> int:
    """Delete jobs that nobody has claimed yet (a job queued for a file that then could
    not be moved into place). Returns how many went."""
    if not ids:
        return 0
    with db.session() as s:
        res = s.execute(delete(IngestJob).where(IngestJob.id.in_(ids),
                                                IngestJob.state == JobState.queued,
                                                IngestJob.locked_by.is_(None)))
        return int(res.rowcount or 0)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Requeued:
    id: int
    attempts: int
    error: str | None


def requeue_dead(db: Database, since: datetime | None = None) -> list[Requeued]:
    """Bring dead jobs back (those that died at or after ``since``, or all): queued now,
    attempts reset. The error each died with is logged, returned, and kept in
    ``last_error`` (prefixed "requeued after:") until the job's next outcome."""
    t = now()
    q = (select(IngestJob).options(defer(IngestJob.payload))
         .where(IngestJob.state == JobState.dead).order_by(IngestJob.id))
    if since is not None:
        q = q.where(IngestJob.updated_at >= since)
    out: list[Requeued] = []
    with db.session() as s:
        for j in s.scalars(q.with_for_update() if db.engine.dialect.name == "postgresql"
                           else q):
            out.append(Requeued(j.id, j.attempts, j.last_error))
            log.warning("requeueing dead job %d (%d attempts): %s", j.id, j.attempts,
                        j.last_error)
            j.last_error = f"requeued after: {j.last_error or 'no error recorded'}"[:4000]
            j.state, j.attempts, j.locked_by, j.available_at = JobState.queued, 0, None, t
    return out


PRUNE_CHUNK = 5000


def prune_done(db: Database, older_than: timedelta, *, chunk: int = PRUNE_CHUNK,
               max_rows: int | None = None) -> int:
    """Delete the done rows finished more than ``older_than`` ago, ``chunk`` rows per
    transaction (so no delete holds locks on the whole table), at most ``max_rows`` in
    all. Only ``done`` rows go: queued, running, failed and dead ones are never touched,
    whatever their age. Returns how many went."""
    cutoff = now() - older_than
    gone = 0
    while max_rows is None or gone < max_rows:
        n = chunk if max_rows is None else min(chunk, max_rows - gone)
        old = (select(IngestJob.id)
               .where(IngestJob.state == JobState.done, IngestJob.updated_at < cutoff)
               .order_by(IngestJob.id).limit(n))
        with db.session() as s:
            res = s.execute(delete(IngestJob).where(
                IngestJob.id.in_(old),
                IngestJob.state == JobState.done))  # a row requeued meanwhile stays
            deleted = int(res.rowcount or 0)  # type: ignore[attr-defined]
        gone += deleted
        if deleted < n:
            break
    if gone:
        log.info("pruned %d done queue rows older than %s", gone, older_than)
    return gone


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
        waiting = s.scalar(select(func.count()).select_from(IngestJob).where(
            IngestJob.state == JobState.queued, IngestJob.last_error.like("waiting:%")))
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
        "waiting": int(waiting or 0),
        "dead_jobs": [{"id": i, "error": e} for i, e in dead],
    }
