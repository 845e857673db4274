"""The queue at scale, on SQLite and PostgreSQL: jobs enqueued in bulk (a multi-row
INSERT per chunk, ids in the payloads' order, all or nothing), and the retention of done
rows (old done rows deleted by the worker; queued, running, failed and dead rows never)."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import typer
from sqlalchemy import event, select, update
from typer.testing import CliRunner

from carsearch.cli.ingest import ingest_app
from carsearch.ingest.worker import IngestWorker
from carsearch.platform.db import Database, Image, IngestJob, JobState, queue
from carsearch.platform.errors import ConfigError
from carsearch.platform.runtime import Platform
from ingest_world import assert_invariant, make_image, world
from shapes import shape  # noqa: F401  (the fixture)


def _inserts(db: Database) -> tuple[list[int], Any]:
    """Count the INSERT statements sent to the database (one list entry per statement)."""
    seen: list[int] = []

    def on_execute(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                   executemany: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO INGEST_JOBS"):
            seen.append(1)

    event.listen(db.engine, "before_cursor_execute", on_execute)
    return seen, on_execute


def test_bulk_enqueue_is_a_few_statements_in_order(database: Database,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue, "ENQUEUE_CHUNK", 1000)
    n = 2_500
    payloads = [{"path": f"/store/{i:05d}.jpg", "source": "bulk", "meta": {"n": i}}
                for i in range(n)]
    seen, hook = _inserts(database)
    try:
        ids = queue.enqueue(database, payloads, max_attempts=3)
    finally:
        event.remove(database.engine, "before_cursor_execute", hook)
    # Multi-row statements, not one a row (SQLAlchemy may split a chunk into pages).
    assert 0 < len(seen) <= math.ceil(n / 100)
    assert len(ids) == len(set(ids)) == n and ids == sorted(ids)
    with database.session() as s:
        rows = {j.id: j for j in s.scalars(select(IngestJob))}
    assert len(rows) == n
    for i, job_id in enumerate(ids):  # each id is its own payload's row
        j = rows[job_id]
        assert j.payload == payloads[i] and j.state == JobState.queued
        assert (j.attempts, j.max_attempts, j.kind, j.locked_by) == (0, 3, "image", None)
    claimed = queue.claim(database, "w", 5)
    assert [c.id for c in claimed] == ids[:5]  # oldest first, as before
    assert queue.enqueue(database, []) == []


def test_a_failed_bulk_enqueue_queues_nothing(database: Database,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """All chunks go in one transaction: a chunk the database refuses rolls back the
    chunks before it."""
    monkeypatch.setattr(queue, "ENQUEUE_CHUNK", 10)
    good = [{"path": f"/store/{i}.jpg"} for i in range(25)]
    with pytest.raises((sa.exc.StatementError, TypeError)):
        queue.enqueue(database, [*good, {"path": "/store/x.jpg", "meta": {1, 2}}])
    assert queue.counts(database)["queued"] == 0


def test_the_same_file_queued_twice_in_bulk_is_stored_once(shape: Platform,  # noqa: F811
                                                            tmp_path: Path) -> None:
    """Bulk enqueue keeps the queue's idempotence: a file queued twice (in one bulk call
    and again later) is indexed once, its other jobs end done as duplicates."""
    p = shape
    files = [make_image(tmp_path / f"b{i}.png", 900 + i) for i in range(3)]
    payloads = [{"path": str(f), "source": "bulk"} for f in [*files, files[0]]]
    ids = queue.enqueue(p.db, payloads)
    ids += queue.enqueue(p.db, [{"path": str(files[1]), "source": "bulk"}])
    IngestWorker(p, batch_size=2).run_once()
    assert queue.counts(p.db)["done"] == len(ids) == 5
    with p.db.session() as s:
        assert s.scalar(select(sa.func.count()).select_from(Image)) == 3
    assert len(assert_invariant(p)) == 3


def _age(db: Database, ids: list[int], days: float) -> None:
    with db.session() as s:
        s.execute(update(IngestJob).where(IngestJob.id.in_(ids))
                  .values(updated_at=queue.now() - timedelta(days=days)))


def _set_state(db: Database, ids: list[int], state: JobState) -> None:
    with db.session() as s:
        s.execute(update(IngestJob).where(IngestJob.id.in_(ids)).values(state=state))


def test_prune_deletes_old_done_rows_only(database: Database) -> None:
    ids = queue.enqueue(database, [{"path": f"/s/{i}.jpg"} for i in range(12)])
    old_done, new_done = ids[:5], ids[5:7]
    old_queued, old_running, old_failed, old_dead = ids[7:8], ids[8:9], ids[9:10], ids[10:12]
    _set_state(database, old_done + new_done, JobState.done)
    _set_state(database, old_running, JobState.running)
    _set_state(database, old_failed, JobState.failed)
    _set_state(database, old_dead, JobState.dead)
    _age(database, old_done + old_queued + old_running + old_failed + old_dead, days=30)
    _age(database, new_done, days=1)
    # At most max_rows, a chunk at a time, oldest ids first.
    assert queue.prune_done(database, timedelta(days=7), chunk=2, max_rows=3) == 3
    assert queue.prune_done(database, timedelta(days=7), chunk=2) == 2
    assert queue.prune_done(database, timedelta(days=7)) == 0
    with database.session() as s:
        left = {j.id: j.state for j in s.scalars(select(IngestJob))}
    assert set(left) == set(ids) - set(old_done)
    assert [left[i] for i in old_dead] == [JobState.dead, JobState.dead]
    assert left[old_queued[0]] == JobState.queued and left[old_running[0]] == JobState.running
    assert left[old_failed[0]] == JobState.failed
    assert queue.prune_done(database, timedelta(hours=1)) == 2  # the day-old done rows


def test_the_worker_prunes_old_done_rows_at_its_interval(shape: Platform,  # noqa: F811
                                                         tmp_path: Path) -> None:
    p = shape
    files = [make_image(tmp_path / f"r{i}.png", 950 + i) for i in range(4)]
    ids = queue.enqueue(p.db, [{"path": str(f)} for f in files])
    w = IngestWorker(p, batch_size=4)
    assert p.settings.ingest.done_retention_days == 7.0  # the default
    w.run_once()
    assert queue.counts(p.db)["done"] == 4
    dead = queue.enqueue(p.db, [{"path": str(tmp_path / "gone.png")}], max_attempts=1)
    w.run_once()
    assert queue.counts(p.db)["dead"] == 1
    _age(p.db, ids[:3] + dead, days=8)
    w.run_once()  # within the interval of the first prune: nothing goes yet
    assert queue.counts(p.db)["done"] == 4
    w._next_prune = 0.0  # the interval has passed
    w.run_once()
    c = queue.counts(p.db)
    assert (c["done"], c["dead"]) == (1, 1)
    assert w.pruned == 3
    assert len(assert_invariant(p)) == 4  # the images stay; only their queue rows went
    # Retention 0 keeps done rows forever.
    p.settings.ingest.done_retention_days = 0.0
    _age(p.db, ids[3:], days=365)
    assert w.prune_done(force=True) == 0 and queue.counts(p.db)["done"] == 1


def test_the_cli_prunes_on_demand(tmp_path: Path, make_database: Any,
                                  published_model: Any) -> None:
    """`carsearch ingest prune`: the workers' prune for a scheduled job; retention 0
    refuses unless a age is given."""
    p = world(tmp_path, make_database("sqlite").url, published_model,
              str(tmp_path / "milvus.db"))
    ids = queue.enqueue(p.db, [{"path": f"/s/{i}.jpg"} for i in range(4)])
    _set_state(p.db, ids[:3], JobState.done)
    _age(p.db, ids, days=10)

    def cli(*args: str) -> Any:
        app = typer.Typer()

        @app.callback()
        def root(ctx: typer.Context) -> None:
            ctx.obj = p.settings

        app.add_typer(ingest_app, name="ingest")
        return CliRunner().invoke(app, list(args))

    res = cli("ingest", "prune", "--older-than-days", "30", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["pruned"] == 0
    res = cli("ingest", "prune", "--json")  # the setting: 7 days
    assert json.loads(res.output) == {"pruned": 3, "older_than_days": 7.0}
    assert queue.counts(p.db)["queued"] == 1
    p.settings.ingest.done_retention_days = 0.0
    res = cli("ingest", "prune")
    assert isinstance(res.exception, ConfigError) and "--older-than-days" in str(res.exception)
    p.close()
