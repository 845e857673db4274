"""Queries of `retrain_requests`: one request per drift event, claimed by one process.

A drift report that made new labelling tasks records one request (the report id is
unique, so a report re-read, or two processes recording it, make one row) in state
``waiting``; it turns ``ready`` when every one of its tasks is labelled (`refresh`). A
person's `carsearch retrain request` is ``ready`` at once. `claim` moves the oldest ready
request to ``running`` with an UPDATE whose WHERE clause holds only while it is still
ready, so exactly one process wins it; the winner heart-beats (`heartbeat`) and ends it
(`finish`). A running request whose heartbeat stopped (its process died or was
restarted) becomes ``interrupted`` (`interrupt_stale`), with the reason: it is never
started a second time by itself; `retry` (a person's decision) makes it ready again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from carsearch.platform.db.engine import Database, as_utc, utcnow
from carsearch.platform.db.models import LabelTask, RetrainRequest

WAITING, READY, RUNNING = "waiting", "ready", "running"
PROMOTED, CANDIDATE, FAILED, INTERRUPTED = "promoted", "candidate", "failed", "interrupted"
OPEN_STATES = (WAITING, READY, RUNNING)
ENDED_STATES = (PROMOTED, CANDIDATE, FAILED, INTERRUPTED)


@dataclass(frozen=True)
class Claimed:
    """A request this process now runs."""

    id: int
    collection: str
    drift_report_id: int | None
    task_ids: list[int]
    holder: str


def for_drift_event(db: Database, report_id: int, collection: str,
                    task_ids: Sequence[int]) -> tuple[int, bool]:
    """The request of drift report ``report_id`` (made now, waiting for ``task_ids``, or
    the one that exists): (id, made now)."""
    try:
        with db.session() as s:
            row = RetrainRequest(drift_report_id=report_id, collection=collection,
                                 requested_by=f"drift report {report_id}",
                                 task_ids=[int(t) for t in task_ids], state=WAITING,
                                 reason=f"waiting for {len(task_ids)} labelling task(s)")
            s.add(row)
            s.flush()
            return int(row.id), True
    except IntegrityError:
        with db.session() as s:
            have = s.scalar(select(RetrainRequest.id).where(
                RetrainRequest.drift_report_id == report_id))
        if have is None:  # pragma: no cover - the unique key said it exists
            raise
        return int(have), False


def by_person(db: Database, collection: str, who: str) -> tuple[int, bool]:
    """A person's request, ready at once; an open one of theirs (or any ready one) is
    returned instead of a second: (id, made now)."""
    with db.session() as s:
        have = s.scalar(select(RetrainRequest.id).where(
            RetrainRequest.collection == collection,
            RetrainRequest.state.in_((READY, RUNNING)),
        ).order_by(RetrainRequest.id))
        if have is not None:
            return int(have), False
        row = RetrainRequest(collection=collection, requested_by=who[:128], task_ids=[],
                             state=READY, reason="asked for")
        s.add(row)
        s.flush()
        return int(row.id), True


def refresh(db: Database) -> list[int]:
    """Waiting requests whose tasks are all labelled become ready; returns their ids."""
    ready: list[int] = []
    with db.session() as s:
        for row in s.scalars(select(RetrainRequest).where(RetrainRequest.state == WAITING)):
            ids = [int(t) for t in row.task_ids or []]
            open_n = s.scalar(select(func.count()).select_from(LabelTask).where(
                LabelTask.id.in_(ids), LabelTask.state != "done")) if ids else 0
            if open_n:
                row.reason = f"waiting for {open_n} of {len(ids)} labelling task(s)"
                continue
            changed = s.execute(update(RetrainRequest).where(
                RetrainRequest.id == row.id, RetrainRequest.state == WAITING).values(
                state=READY, reason="every labelling task is done"))
            if changed.rowcount == 1:  # type: ignore[attr-defined]
                ready.append(int(row.id))
    return ready


def claim(db: Database, holder: str, request_id: int | None = None) -> Claimed | None:
    """Take the oldest ready request (or ``request_id`` when it is ready) for ``holder``;
    None when there is none or another process won it."""
    now = utcnow()
    with db.session() as s:
        q = select(RetrainRequest).where(RetrainRequest.state == READY)
        if request_id is not None:
            q = q.where(RetrainRequest.id == request_id)
        for row in s.scalars(q.order_by(RetrainRequest.id)):
            won = s.execute(update(RetrainRequest).where(
                RetrainRequest.id == row.id, RetrainRequest.state == READY).values(
                state=RUNNING, holder=holder[:256], started_at=now, heartbeat_at=now,
                reason="training"))
            if won.rowcount == 1:  # type: ignore[attr-defined]
                return Claimed(int(row.id), row.collection, row.drift_report_id,
                               [int(t) for t in row.task_ids or []], holder[:256])
    return None


def heartbeat(db: Database, claimed: Claimed, note: str | None = None) -> bool:
    """Still running: refresh the heartbeat (and the note). False when the request is no
    longer this holder's (it was declared interrupted)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if note is not None:
        values["reason"] = note[:2000]
    with db.session() as s:
        res = s.execute(update(RetrainRequest).where(
            RetrainRequest.id == claimed.id, RetrainRequest.state == RUNNING,
            RetrainRequest.holder == claimed.holder).values(**values))
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]


def finish(db: Database, claimed: Claimed, state: str, reason: str, *,
           training_run_id: int | None = None, version: str | None = None,
           result: dict[str, Any] | None = None) -> bool:
    """End a running request (promoted, candidate or failed)."""
    if state not in (PROMOTED, CANDIDATE, FAILED):
        raise ValueError(f"a retrain ends promoted, candidate or failed, not {state!r}")
    with db.session() as s:
        res = s.execute(update(RetrainRequest).where(
            RetrainRequest.id == claimed.id, RetrainRequest.state == RUNNING,
            RetrainRequest.holder == claimed.holder).values(
            state=state, reason=reason[:4000], finished_at=utcnow(),
            training_run_id=training_run_id, version=version, result=result))
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]


def interrupt_stale(db: Database, lease_s: float, now: datetime | None = None) -> list[int]:
    """Running requests not heard of for ``lease_s`` seconds become interrupted."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=lease_s)
    out: list[int] = []
    with db.session() as s:
        for row in s.scalars(select(RetrainRequest).where(RetrainRequest.state == RUNNING)):
            beat = as_utc(row.heartbeat_at) if row.heartbeat_at else None
            if beat is not None and beat >= cutoff:
                continue
            res = s.execute(update(RetrainRequest).where(
                RetrainRequest.id == row.id, RetrainRequest.state == RUNNING,
                RetrainRequest.heartbeat_at == row.heartbeat_at).values(
                state=INTERRUPTED, finished_at=now,
                reason=(f"interrupted: {row.holder} stopped (last heartbeat "
                        f"{beat.isoformat() if beat else 'never'}); not restarted by itself: "
                        f"`carsearch retrain retry {row.id}` runs it again")))
            if res.rowcount == 1:  # type: ignore[attr-defined]
                out.append(int(row.id))
    return out


def retry(db: Database, request_id: int) -> None:
    """A person asks for an ended (failed, interrupted or candidate) request again."""
    with db.session() as s:
        row = s.get(RetrainRequest, request_id)
        if row is None:
            raise LookupError(f"no retrain request {request_id}")
        if row.state not in (FAILED, INTERRUPTED, CANDIDATE):
            raise ValueError(f"retrain request {request_id} is {row.state}: only a failed, "
                             "interrupted or candidate one can be retried")
        row.state, row.reason, row.holder, row.finished_at = READY, "retry asked for", None, None


def _as_dict(r: RetrainRequest) -> dict[str, Any]:
    return {"id": r.id, "created_at": r.created_at, "drift_report_id": r.drift_report_id,
            "collection": r.collection, "requested_by": r.requested_by,
            "task_ids": list(r.task_ids or []), "state": r.state, "reason": r.reason,
            "holder": r.holder, "started_at": r.started_at, "finished_at": r.finished_at,
            "training_run_id": r.training_run_id, "version": r.version,
            "result": dict(r.result or {})}


def listing(db: Database, limit: int = 50) -> list[dict[str, Any]]:
    """The newest requests first."""
    with db.session() as s:
        rows = s.scalars(select(RetrainRequest).order_by(RetrainRequest.id.desc()).limit(limit))
        return [_as_dict(r) for r in rows]


def get(db: Database, request_id: int) -> dict[str, Any] | None:
    with db.session() as s:
        row = s.get(RetrainRequest, request_id)
        return _as_dict(row) if row is not None else None


def counts(db: Database) -> dict[str, int]:
    """Requests by state (one grouped count)."""
    with db.session() as s:
        rows = s.execute(select(RetrainRequest.state, func.count())
                         .group_by(RetrainRequest.state)).all()
    return {str(st): int(n) for st, n in rows}
