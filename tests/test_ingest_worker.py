"""The ingest worker on real Milvus Lite, a real Milvus server and SQLite/PostgreSQL.

Every test ends by checking the invariant "nothing lost, nothing doubled": the Milvus
primary-key set of the serving collection equals the database's set of indexed images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select, update

from carsearch.ingest.worker import IngestWorker, scan_inbox
from carsearch.lifecycle.reconcile import reconcile
from carsearch.lifecycle.reindex import promote_with_backfill
from carsearch.platform.db import Image, ImageStatus, IngestJob, JobState, queue
from carsearch.platform.db.images import indexed_ids
from carsearch.platform.runtime import Platform
from carsearch.platform.vectors.protocol import VectorRow, VectorStoreError
from ingest_world import PublishedModel, assert_invariant, make_image, world


@pytest.fixture
def plat(tmp_path: Path, make_database, published_model: PublishedModel, milvus_uri: str):
    p = world(tmp_path, make_database("sqlite").url, published_model, milvus_uri)
    yield p
    p.close()


def test_inbox_with_sidecars_duplicates_and_a_corrupt_file(plat: Platform, tmp_path: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(5):
        make_image(inbox / f"car{i}.png", i)
    (inbox / "car0.png.json").write_text(json.dumps({"make": "Ford", "year": 2012,
                                                     "colour": "red", "camera": "gate-3"}))
    (inbox / "same-as-car1.png").write_bytes((inbox / "car1.png").read_bytes())
    (inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (inbox / "empty.png").write_bytes(b"")

    w = IngestWorker(plat, inbox=inbox, batch_size=3)
    stats = w.run_once()
    assert list(inbox.iterdir()) == []  # everything moved into the image store
    assert stats.summary.quarantined == 2
    ids = assert_invariant(plat)
    assert len(ids) == 5
    with plat.db.session() as s:
        ford = s.scalar(select(Image).where(Image.make == "Ford"))
        bad = s.scalars(select(Image).where(Image.status == ImageStatus.quarantined)).all()
    assert ford is not None and ford.colour == "red" and ford.extra == {"camera": "gate-3"}
    assert Path(ford.path).is_relative_to(plat.settings.image_dir)
    assert sorted(b.error.split(":")[0] for b in bad) == ["empty", "truncated"]
    assert queue.counts(plat.db)["done"] == 8
    st = queue.status(plat.db)
    assert st["queued"] == 0 and st["lag_s"] == 0.0 and st["throughput_per_s"] > 0

    # The same image delivered again (a new file name, the queue, the inbox): no-ops.
    make_image(inbox / "again.png", 0)
    w.run_once()
    queue.enqueue(plat.db, [{"path": ford.path, "source": "queue"}])
    w.run_once()
    assert assert_invariant(plat) == ids


def _hold_lite_file(uri: str) -> subprocess.Popen[str]:
    """Another process opens the Milvus Lite file: this one cannot."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"from pymilvus import MilvusClient; import sys, time; MilvusClient({uri!r}); "
         "print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    return holder


def test_milvus_unavailable_for_a_while(plat: Platform, tmp_path: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(4):
        make_image(inbox / f"c{i}.png", 10 + i)
    settings = plat.settings
    plat.close()
    holder = None
    if settings.milvus_is_lite:
        down = Platform(settings)
        holder = _hold_lite_file(settings.milvus_uri)
        expected = ("another process has it open", "serve --ingest")
    else:  # a server nobody answers on
        from carsearch.platform.vectors.server import free_ports

        dead = f"http://127.0.0.1:{free_ports(1)[0]}"
        down = Platform(settings.model_copy(update={"milvus_uri": dead}))
        expected = ("cannot open Milvus", dead)
    try:
        # The round fails before it claims anything (the loop backs off and says why),
        # so an outage does not use up the jobs' attempts.
        with pytest.raises(VectorStoreError) as err:
            IngestWorker(down, inbox=inbox).run_once()
        for words in expected:  # the error says why and what to do about it
            assert words in str(err.value), words
        with down.db.session() as s:
            jobs = s.scalars(select(IngestJob)).all()
        assert len(jobs) == 4 and {j.state for j in jobs} == {JobState.queued}
        assert all(j.attempts == 0 for j in jobs)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        down.db.dispose()
    p = Platform(settings)
    assert IngestWorker(p).run_once().summary.indexed == 4  # Milvus is back: all of them
    assert len(assert_invariant(p)) == 4
    p.close()


def test_dead_letter_after_max_attempts(plat: Platform, tmp_path: Path):
    queue.enqueue(plat.db, [{"path": str(tmp_path / "never-arrives.png")}], max_attempts=2)
    w = IngestWorker(plat)
    for _ in range(2):
        w.run_once()
        with plat.db.session() as s:
            s.execute(update(IngestJob).values(available_at=queue.now()))
    st = queue.status(plat.db)
    assert st["dead"] == 1 and "file not found" in st["dead_jobs"][0]["error"]


@pytest.mark.parametrize("point", ["after_upsert", "mid_batch", "after_rows"])
def test_sigkill_and_restart(point: str, plat: Platform, tmp_path: Path):
    """The worker SIGKILLed at each of its crash points (CRASH_POINTS of bench/chaos.py,
    which the chaos tests draw from), then run again: every image once, nothing held."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(6):
        make_image(inbox / f"k{i}.png", 100 + i)
    scan_inbox(plat, inbox)
    plat.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARSEARCH_")}
    env.update(CARSEARCH_DATA_DIR=str(plat.settings.data_dir),
               CARSEARCH_DATABASE_URL=plat.settings.database_url,
               CARSEARCH_MILVUS_URI=plat.settings.milvus_uri,
               CARSEARCH_LOG_LEVEL="WARNING", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "carsearch.cli", "ingest", "once", "--batch-size", "4",
           "--visibility-timeout", "1"]
    killed = subprocess.run(cmd, env={**env, "CARSEARCH_CRASH_AT": point},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    p = Platform(plat.settings)
    assert queue.counts(p.db)["running"] == 4  # the killed batch holds its jobs
    if point == "after_upsert":  # vectors written, rows not: the state reconcile sees
        v = p.registry.require_serving()
        assert len(p.store.ids(v.collection)) == 4 and indexed_ids(p.db) == set()
    if point == "after_rows":  # vectors and rows written, the jobs not yet done
        v = p.registry.require_serving()
        assert p.store.ids(v.collection) == indexed_ids(p.db) and len(indexed_ids(p.db)) == 4
    p.close()
    time.sleep(1.2)  # past the visibility timeout
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    p = Platform(plat.settings)
    assert len(assert_invariant(p)) == 6
    counts = queue.counts(p.db)
    assert counts["done"] == 6 and counts["running"] == 0
    p.close()


def test_reconcile_repairs_orphans_and_gaps(plat: Platform, tmp_path: Path):
    for i in range(6):
        queue.enqueue(plat.db, [{"path": str(make_image(tmp_path / f"r{i}.png", 200 + i))}])
    IngestWorker(plat).run_once()
    v = plat.registry.require_serving()
    ids = sorted(assert_invariant(plat))
    rng = np.random.default_rng(0)
    junk = rng.normal(size=(3, v.dim)).astype(np.float32)
    junk /= np.linalg.norm(junk, axis=1, keepdims=True)
    plat.store.upsert(v.collection, [1, 2, 3], junk, [VectorRow()] * 3)  # orphans
    plat.store.delete(v.collection, ids[:2])  # gaps
    plat.store.flush(v.collection)
    dry = reconcile(plat, repair=False, progress=False)
    assert (dry.missing, dry.orphans) == (2, 3)
    rep = reconcile(plat, progress=False)
    assert (rep.repaired_missing, rep.removed_orphans) == (2, 3)
    assert sorted(assert_invariant(plat)) == ids


def test_promotion_during_ingest(plat: Platform, tmp_path: Path, compact_model: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(8):
        make_image(inbox / f"a{i}.png", 300 + i)
    w = IngestWorker(plat, inbox=inbox, batch_size=4, poll_interval=0.05)
    w.run_once()
    plat.registry.publish(compact_model, name="v2")
    t = threading.Thread(target=w.run_forever)
    t.start()
    try:
        for i in range(8, 16):  # keeps arriving while v2 is being filled
            make_image(inbox / f"a{i}.png", 300 + i)
            time.sleep(0.05)
        served, report = promote_with_backfill(plat, "v2", progress=False)
        assert served.name == "v2"
        for i in range(16, 20):
            make_image(inbox / f"a{i}.png", 300 + i)
        deadline = time.time() + 60
        while any(inbox.iterdir()) or queue.counts(plat.db)["done"] < 20:
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        w.stop_event.set()
        t.join(60)
    assert plat.registry.require_serving().name == "v2"
    ids = assert_invariant(plat)
    assert len(ids) == 20
    assert report.embedded + report.already >= 8
    with plat.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 20


@pytest.mark.postgres
def test_two_workers_share_one_queue(tmp_path: Path, make_database,
                                     published_model: PublishedModel, milvus_uri: str):
    p1 = world(tmp_path, make_database("postgresql").url, published_model, milvus_uri)
    p2 = Platform(p1.settings)
    if p1.settings.milvus_is_lite:  # one Milvus Lite file per process: share the client
        p2.__dict__["store"] = p1.store
    paths = [make_image(tmp_path / f"w{i}.png", 400 + i) for i in range(24)]
    queue.enqueue(p1.db, [{"path": str(x)} for x in paths])
    workers = [IngestWorker(p, batch_size=3, worker_id=f"w{n}") for n, p in enumerate((p1, p2))]
    for p in (p1, p2):  # load both encoders first, so that neither starts late
        p.search.encoder_for(p.registry.require_serving()).load()
    start = threading.Barrier(2)

    def work(w: IngestWorker) -> None:
        start.wait()
        w.run_once()

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    with p1.db.session() as s:
        jobs = s.scalars(select(IngestJob)).all()
    assert all(j.state == JobState.done and j.attempts == 1 for j in jobs)  # none taken twice
    assert sum(w.stats.summary.indexed for w in workers) == 24
    assert all(w.stats.batches > 0 for w in workers), "both workers should get work"
    assert len(assert_invariant(p1)) == 24
    if p1.settings.milvus_is_lite:
        p2.db.dispose()
    else:
        p2.close()
    p1.close()


def test_a_slow_batch_keeps_its_jobs(plat: Platform, tmp_path: Path):
    """Heartbeats during a batch keep a slower-than-the-timeout batch from being reclaimed."""
    queue.enqueue(plat.db, [{"path": str(make_image(tmp_path / f"s{i}.png", 500 + i))}
                            for i in range(3)])
    claimed_by_other: list[int] = []

    class SlowWorker(IngestWorker):
        def _store_batch(self, good, ids, collection="vehicles"):  # type: ignore[no-untyped-def]
            time.sleep(1.0)  # longer than the visibility timeout below
            claimed_by_other.extend(j.id for j in queue.claim(
                plat.db, "other", 10, visibility_timeout=0.3))
            super()._store_batch(good, ids, collection)

    w = SlowWorker(plat, visibility_timeout=0.3)
    w.run_once()
    assert claimed_by_other == []
    assert w.stats.summary.indexed == 3
    assert queue.counts(plat.db)["done"] == 3
    assert len(assert_invariant(plat)) == 3
