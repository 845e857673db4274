"""Named leases in the database: one holder at a time, across processes.

A lease is a row (name, holder, expires_at). :func:`acquire` takes it when it is free or
expired (an UPDATE whose WHERE clause both databases evaluate atomically, or the INSERT
of a missing row, which the primary key lets only one process win); :func:`release` gives
it back. A holder that dies keeps the lease until it expires, so the time to live is the
longest a crashed holder can block the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import delete, or_, update
from sqlalchemy.exc import IntegrityError

from carsearch.platform.db import Database, Lease, utcnow

log = logging.getLogger(__name__)


def acquire(db: Database, name: str, holder: str, ttl_s: float) -> str | None:
    """Take the lease ``name`` for ``ttl_s`` seconds. Returns None when taken, else the
    holder that has it."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl_s)
    with db.session() as s:
        res = s.execute(update(Lease)
                        .where(Lease.name == name,
                               or_(Lease.expires_at < now, Lease.holder == holder))
                        .values(holder=holder, acquired_at=now, expires_at=expires))
        if res.rowcount == 1:  # type: ignore[attr-defined]
            return None
    try:
        with db.session() as s:
            s.add(Lease(name=name, holder=holder, acquired_at=now, expires_at=expires))
        return None
    except IntegrityError:
        with db.session() as s:
            row = s.get(Lease, name)
            return row.holder if row is not None else "another process"


def release(db: Database, name: str, holder: str) -> None:
    with db.session() as s:
        s.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))


@contextmanager
def held(db: Database, name: str, holder: str, ttl_s: float) -> Iterator[str | None]:
    """``with held(...) as other:`` other is None while we hold the lease (released at
    the end), or the holder that has it (then nothing is held)."""
    other = acquire(db, name, holder, ttl_s)
    try:
        yield other
    finally:
        if other is None:
            release(db, name, holder)
