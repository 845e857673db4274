"""Nothing lost, nothing doubled, beside the worker: promotion, reconcile, re-index, bad
labels, re-delivery, colliding names, poison jobs, two drift runs at once.

Each race is forced: the worker's batch hook ("after_upsert") or reconcile's hook
("before_delete") runs the other party at exactly the point the race needs. Real parts:
a compact model, Milvus Lite and the Milvus server, SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import select, update

from carsearch.ingest.worker import IngestWorker
from carsearch.lifecycle.reconcile import reconcile
from carsearch.lifecycle.reindex import PromotionBlockedError, promote_with_backfill
from carsearch.platform.db import (
    Database,
    Image,
    ImageStatus,
    IngestJob,
    JobState,
    ModelVersion,
    queue,
)
from carsearch.platform.db.images import indexed_ids
from carsearch.platform.models.registry import RegistryError
from carsearch.platform.runtime import Platform
from carsearch.platform.vectors.filters import SearchFilters
from ingest_world import PublishedModel, assert_invariant, make_image, world


@pytest.fixture
def plat(tmp_path: Path, published_model: PublishedModel, database: Database,
         milvus_uri: str):
    p = world(tmp_path, database.url, published_model, milvus_uri)
    yield p
    p.close()


def _inbox(tmp_path: Path, n: int, seed: int = 0, name: str = "inbox") -> Path:
    inbox = tmp_path / name
    inbox.mkdir(exist_ok=True)
    for i in range(n):
        make_image(inbox / f"c{seed + i}.png", seed + i)
    return inbox


def _rows(p: Platform) -> dict[int, Image]:
    with p.db.session() as s:
        return {r.id: r for r in s.scalars(select(Image))}


# -- 1. promotion during ingest ----------------------------------------------------------


def test_a_batch_that_read_the_old_version_reaches_the_new_collection(
    plat: Platform, tmp_path: Path, compact_model: Path
) -> None:
    """The batch embeds with v1 and upserts into v1; then, before it commits its rows, a
    whole promotion to v2 runs (backfill, switch, catch-up: none of them sees the rows).
    The batch must still end in v2's collection."""
    inbox = _inbox(tmp_path, 3)
    plat.registry.publish(compact_model, name="v2")
    w = IngestWorker(plat, inbox=inbox)
    promoted: list[str] = []

    def promote_now(point: str) -> None:
        if point == "after_upsert" and not promoted:
            promoted.append(promote_with_backfill(plat, "v2", progress=False)[0].name)

    w.on_point = promote_now
    w.run_once()
    assert promoted == ["v2"]
    assert plat.registry.require_serving().name == "v2"
    ids = assert_invariant(plat)  # v2's collection holds every indexed image
    assert len(ids) == 3
    # A rollback, the same way, brings them back to v1 too.
    inbox = _inbox(tmp_path, 2, seed=10)
    promoted.clear()

    def roll_back_now(point: str) -> None:
        if point == "after_upsert" and not promoted:
            name = plat.registry.previous().name
            promoted.append(promote_with_backfill(plat, name, progress=False)[0].name)

    w.on_point = roll_back_now
    w.run_once()
    assert promoted == ["v1"] and len(assert_invariant(plat)) == 5


# -- 2. reconcile during ingest ----------------------------------------------------------


def test_reconcile_between_a_batch_upsert_and_its_rows_deletes_nothing(
    plat: Platform, tmp_path: Path
) -> None:
    inbox = _inbox(tmp_path, 4)
    w = IngestWorker(plat, inbox=inbox)
    reports = []

    def reconcile_now(point: str) -> None:
        if point == "after_upsert" and not reports:
            reports.append(reconcile(plat, progress=False))

    w.on_point = reconcile_now
    w.run_once()
    rep = reports[0]
    assert rep.orphans == 0 and rep.removed_orphans == 0 and rep.pending == 4
    assert len(assert_invariant(plat)) == 4


def test_an_orphan_a_batch_claims_while_reconcile_deletes_it_is_restored(
    plat: Platform, tmp_path: Path
) -> None:
    """Reconcile has read Milvus and the database (the vector is an orphan: its row was
    quarantined); before it deletes, the same image is delivered again and indexed. The
    delete removes the new vector; reconcile sees the row claimed and re-embeds it."""
    inbox = _inbox(tmp_path, 2)
    IngestWorker(plat, inbox=inbox).run_once()
    victim = sorted(indexed_ids(plat.db))[0]
    with plat.db.session() as s:
        row = s.get(Image, victim)
        assert row is not None
        path = Path(row.path)
        row.status, row.error = ImageStatus.quarantined, "an earlier problem"
    again = tmp_path / "again.png"
    again.write_bytes(path.read_bytes())
    queue.enqueue(plat.db, [{"path": str(again), "source": "queue"}])

    def deliver_now(point: str) -> None:
        if point == "before_delete":
            assert IngestWorker(plat).run_once().summary.indexed == 1

    rep = reconcile(plat, progress=False, hook=deliver_now)
    assert rep.orphans == 1 and rep.restored == 1 and rep.removed_orphans == 0
    assert victim in assert_invariant(plat)


def test_a_batch_that_died_leaves_pending_rows_that_reconcile_resolves(
    plat: Platform, tmp_path: Path
) -> None:
    """Pending rows of a batch that will never finish (its job dead) are in flight for
    the cut-off, then quarantined with the reason and their vectors removed; a replay
    that comes later still indexes them."""
    inbox = _inbox(tmp_path, 3)
    w = IngestWorker(plat, inbox=inbox)

    def die(point: str) -> None:
        if point == "after_upsert":
            raise SystemExit("the worker dies here")  # not an Exception: nothing is caught

    w.on_point = die
    with pytest.raises(SystemExit):
        w.run_once()
    rep = reconcile(plat, progress=False)  # young pending rows: in flight, kept
    assert (rep.pending, rep.stale_pending, rep.removed_orphans) == (3, 0, 0)
    rep = reconcile(plat, progress=False, stale_pending_s=0)
    assert rep.stale_pending == 3
    assert assert_invariant(plat) == set()
    rows = _rows(plat)
    assert {r.status for r in rows.values()} == {ImageStatus.quarantined}
    assert all("did not finish" in (r.error or "") for r in rows.values())
    with plat.db.session() as s:  # the jobs come round again: the replay indexes them
        s.execute(update(IngestJob).values(heartbeat_at=queue.now() - timedelta(
            seconds=120)))
    assert IngestWorker(plat).run_once().summary.indexed == 3
    assert len(assert_invariant(plat)) == 3


# -- 3. re-index and missing files -------------------------------------------------------


def test_a_briefly_unreadable_file_blocks_the_promotion_and_loses_nothing(
    plat: Platform, tmp_path: Path, compact_model: Path
) -> None:
    IngestWorker(plat, inbox=_inbox(tmp_path, 3)).run_once()
    plat.registry.publish(compact_model, name="v2")
    row = next(iter(_rows(plat).values()))
    stored = Path(row.path)
    hidden = stored.with_name("hidden")
    stored.rename(hidden)  # an unmounted share, for a moment
    with pytest.raises(PromotionBlockedError, match="1 indexed image"):
        promote_with_backfill(plat, "v2", progress=False, retry_after_s=0)
    assert plat.registry.require_serving().name == "v1"
    rep = reconcile(plat, progress=False)
    assert rep.removed_orphans == 0 and rep.missing == 0
    assert _rows(plat)[row.id].status == ImageStatus.indexed
    assert len(assert_invariant(plat)) == 3
    hidden.rename(stored)  # back
    assert promote_with_backfill(plat, "v2", progress=False)[0].name == "v2"
    assert len(assert_invariant(plat)) == 3


def test_giving_up_unreadable_files_is_the_operators_word(
    plat: Platform, tmp_path: Path, compact_model: Path
) -> None:
    IngestWorker(plat, inbox=_inbox(tmp_path, 3)).run_once()
    plat.registry.publish(compact_model, name="v2")
    row = next(iter(_rows(plat).values()))
    Path(row.path).unlink()
    promote_with_backfill(plat, "v2", progress=False, retry_after_s=0,
                          give_up_unreadable=True)
    gone = _rows(plat)[row.id]
    assert gone.status == ImageStatus.quarantined and "unreadable" in (gone.error or "")
    assert len(assert_invariant(plat)) == 2


def test_the_platform_keeps_its_own_copy_of_queued_and_manifest_images(
    plat: Platform, tmp_path: Path, compact_model: Path
) -> None:
    from carsearch.ingest.pipeline import ingest_items, platform_writer, read_manifest

    share = tmp_path / "share"
    share.mkdir()
    queued = make_image(share / "q.png", 1)
    listed = make_image(share / "m.png", 2)
    queue.enqueue(plat.db, [{"path": str(queued), "source": "queue"}])
    IngestWorker(plat).run_once()
    (share / "list.jsonl").write_text(json.dumps({"path": "m.png", "make": "Ford"}) + "\n")
    ingest_items(read_manifest(share / "list.jsonl"), db=plat.db, writer=platform_writer(plat),
                 max_pixels=10**7, progress=False)
    rows = _rows(plat)
    assert len(rows) == 2
    for r in rows.values():
        assert Path(r.path).is_relative_to(plat.settings.image_dir.resolve())
        assert (r.extra or {})["original_path"] in {str(queued.resolve()), str(listed.resolve())}
    for f in share.iterdir():  # the folder moves away
        f.unlink()
    share.rmdir()
    plat.registry.publish(compact_model, name="v2")
    _, report = promote_with_backfill(plat, "v2", progress=False)
    assert report.embedded == 2 and report.unreadable == 0
    assert len(assert_invariant(plat)) == 2


# -- 4. bad labels ----------------------------------------------------------------------


BAD_SIDECARS = [
    {"year": "unknown"},
    {"make": "M" * 100},
    {"colour": ["red", "blue"]},
    {"source": "s" * 200, "make": "Ford"},
    {"class_name": "   "},
    {"year": 1200, "camera": "\x00nul"},
    {"make": "Bad\udc80Make"},
]


def test_one_bad_label_costs_only_that_field(plat: Platform, tmp_path: Path) -> None:
    inbox = _inbox(tmp_path, 10)
    for i, side in enumerate(BAD_SIDECARS):
        (inbox / f"c{i}.png.json").write_text(json.dumps(side), encoding="utf-8",
                                              errors="surrogatepass")
    stats = IngestWorker(plat, inbox=inbox, batch_size=10).run_once()
    assert (stats.summary.indexed, stats.failed_batches) == (10, 0)
    assert len(assert_invariant(plat)) == 10
    rejected = [r.extra["rejected_metadata"] for r in _rows(plat).values()
                if r.extra and "rejected_metadata" in r.extra]
    flat = {k: v for d in rejected for k, v in d.items()}
    assert "not a model year: 'unknown'" in flat["year"] or "outside" in flat["year"]
    assert "longer than 64" in flat["make"] or "surrogate" in flat["make"]
    assert "not text: list" in flat["colour"] and "longer than 64" in flat["source"]
    ford = [r for r in _rows(plat).values() if r.make == "Ford"]
    assert len(ford) == 1 and ford[0].source == "unknown"  # the make kept, the source not
    assert stats.summary.fields_rejected >= 5


def test_bad_metadata_in_a_manifest_costs_only_that_field(
    plat: Platform, tmp_path: Path
) -> None:
    from carsearch.ingest.pipeline import ingest_items, platform_writer, read_manifest

    lines = []
    for i in range(4):
        make_image(tmp_path / f"m{i}.png", 40 + i)
        lines.append(json.dumps({"path": f"m{i}.png", "year": ["x", "2012", "1999", None][i],
                                 "colour": "c" * (40 if i == 2 else 3)}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    summary = ingest_items(read_manifest(tmp_path / "m.jsonl"), db=plat.db,
                           writer=platform_writer(plat), max_pixels=10**7, progress=False)
    assert summary.indexed == 4 and summary.fields_rejected == 2
    assert sorted(r.year or 0 for r in _rows(plat).values()) == [0, 0, 1999, 2012]


# -- 5. re-delivery with new metadata ----------------------------------------------------


def test_a_redelivery_updates_milvus_and_the_database_alike(
    plat: Platform, tmp_path: Path
) -> None:
    inbox = _inbox(tmp_path, 1)
    (inbox / "c0.png.json").write_text(json.dumps({"make": "Ford", "colour": "blue"}))
    w = IngestWorker(plat, inbox=inbox)
    w.run_once()
    (iid,) = indexed_ids(plat.db)
    stored = Path(_rows(plat)[iid].path)
    again = tmp_path / "again.png"
    again.write_bytes(stored.read_bytes())
    inbox2 = tmp_path / "inbox2"
    inbox2.mkdir()
    (inbox2 / "x.png").write_bytes(again.read_bytes())
    (inbox2 / "x.png.json").write_text(json.dumps({"make": "BMW", "year": 2012}))
    IngestWorker(plat, inbox=inbox2).run_once()
    row = _rows(plat)[iid]
    assert (row.make, row.colour, row.year) == ("BMW", "blue", 2012)  # new wins, old kept
    v = plat.registry.require_serving()
    vec = plat.store.vectors(v.collection, [iid])[1]
    for f, want in ((SearchFilters(make="BMW", colour="blue", year_min=2012), 1),
                    (SearchFilters(make="Ford"), 0)):
        hits = plat.store.search(v.collection, vec, 5, f)[0]
        assert len(hits) == want, f
    # A quarantined row revived by a good delivery points at a file that exists.
    with plat.db.session() as s:
        r = s.get(Image, iid)
        assert r is not None
        r.status, r.path, r.error = ImageStatus.quarantined, "/gone/away.png", "old problem"
    queue.enqueue(plat.db, [{"path": str(again), "source": "queue"}])
    IngestWorker(plat).run_once()
    row = _rows(plat)[iid]
    assert row.status == ImageStatus.indexed and row.error is None and Path(row.path).is_file()
    assert row.make == "BMW" and len(assert_invariant(plat)) == 1


# -- 6. colliding version names ----------------------------------------------------------


def test_version_names_that_map_to_one_collection_are_refused(
    plat: Platform, compact_model: Path
) -> None:
    plat.registry.publish(compact_model, name="v1.0")
    for name in ("v1-0", "v1_0"):
        with pytest.raises(RegistryError, match="collection carsearch_v1_0"):
            plat.registry.publish(compact_model, name=name)
    with pytest.raises(sa.exc.IntegrityError), plat.db.session() as s:
        s.add(ModelVersion(name="other", base_model="b", artifact_path="/x",
                           artifact_sha256="0" * 64, dim=8, collection="carsearch_v1_0"))


# -- 8. loops that die quietly -----------------------------------------------------------


def test_the_worker_loop_survives_an_unexpected_error(
    plat: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carsearch.platform.scheduler import LoopState

    class Stop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            return self.is_set()  # no sleeping between rounds in the test

    inbox = _inbox(tmp_path, 2)
    real_claim = queue.claim
    calls = {"n": 0}

    def flaky_claim(*a: object, **k: object) -> list[queue.ClaimedJob]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ZeroDivisionError("not a platform error")
        return real_claim(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(queue, "claim", flaky_claim)
    w = IngestWorker(plat, inbox=inbox)
    w.stop_event = Stop()
    state = LoopState("ingest-worker")
    original = w.run_once

    def once() -> object:
        out = original()
        if w.stats.summary.indexed >= 2:
            w.stop_event.set()
        return out

    w.run_once = once  # type: ignore[method-assign]
    w.run_forever(state)
    assert state.total_failures == 1 and "ZeroDivisionError" in (state.last_error or "")
    assert state.state == "stopped" and len(assert_invariant(plat)) == 2


# -- 9. poison jobs ----------------------------------------------------------------------


def test_a_job_whose_workers_keep_dying_is_dead_after_max_attempts(plat: Platform,
                                                                   tmp_path: Path) -> None:
    queue.enqueue(plat.db, [{"path": str(make_image(tmp_path / "p.png", 7))}], max_attempts=3)
    for n in range(3):  # claimed, then its worker dies (never heartbeats again)
        assert len(queue.claim(plat.db, f"w{n}", 5, visibility_timeout=0)) == 1
        with plat.db.session() as s:
            s.execute(update(IngestJob).values(heartbeat_at=queue.now() - timedelta(
                seconds=5)))
    assert queue.claim(plat.db, "w3", 5, visibility_timeout=1) == []
    st = queue.status(plat.db)
    assert st["dead"] == 1 and st["running"] == 0
    assert "stopped without finishing it 3 times" in st["dead_jobs"][0]["error"]
    with plat.db.session() as s:
        assert s.scalar(select(IngestJob.state)) == JobState.dead
