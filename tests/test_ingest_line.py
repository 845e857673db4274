"""Issue 22, the ingest line: one bad row, file or job costs itself alone; a lasting
failure pauses claiming (and says why) instead of spending attempts; dead jobs can be
requeued; inbox links are refused; sidecars and images wait for each other.

Real parts: SQLite and PostgreSQL (``database``) where the queue's shape matters, Milvus
Lite files, a real compact model, a real tmpfs for the full image store (root here;
where mounting is not allowed, ENOSPC comes from a hook instead, and the test says so).
Each input or interleaving is forced: rows inserted as another system would, a hook
that fails one file, a full filesystem, a clock handed to the scan.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import typer
from sqlalchemy import func, select, update
from typer.testing import CliRunner

import carsearch.ingest.pipeline as pipeline_mod
import carsearch.ingest.worker as worker_mod
from carsearch.cli.ingest import ingest_app
from carsearch.ingest.pipeline import store_path
from carsearch.ingest.worker import IngestWorker, scan_inbox
from carsearch.monitoring.health import Health
from carsearch.platform.db import Database, Image, ImageStatus, IngestJob, JobState, queue
from carsearch.platform.errors import ConfigError
from carsearch.platform.images import sha256_file
from carsearch.platform.runtime import Platform
from carsearch.platform.settings import Settings
from carsearch.platform.telemetry import METRICS
from carsearch.platform.vectors.protocol import VectorStoreError
from ingest_world import PublishedModel, assert_invariant, make_image, world

# Rows another system might insert: each must go dead with its reason at its claim.
MALFORMED: list[Any] = [
    [1, 2], "a string", 42, sa.JSON.NULL, True, {"path": None}, {"path": 7}, {"path": ""},
    {"path": "/x.png", "meta": "oops"}, {"path": "/x.png", "meta": [1]},
    {"path": "/x.png", "source": ["a"]}, {"path": "/x.png", "collection": {"a": 1}},
]
DEEP = "[" * 5000 + "]" * 5000  # decodes to RecursionError in Python's json


def _insert(db: Database, payloads: list[Any]) -> list[int]:
    with db.session() as s:
        jobs = [IngestJob(kind="image", payload=p, state=JobState.queued) for p in payloads]
        s.add_all(jobs)
        s.flush()
        return [j.id for j in jobs]


def _insert_raw(db: Database, text: str) -> int:
    """A row whose payload is JSON text as stored (too deep for Python to write)."""
    (job_id,) = _insert(db, [{"path": "placeholder"}])
    with db.engine.begin() as conn:
        cast = "CAST(:t AS jsonb)" if db.engine.dialect.name == "postgresql" else ":t"
        conn.execute(sa.text(f"UPDATE ingest_jobs SET payload = {cast} WHERE id = :i"),
                     {"t": text, "i": job_id})
    return job_id


def _jobs(db: Database) -> dict[int, tuple[JobState, int, str | None]]:
    with db.session() as s:
        rows = s.execute(select(IngestJob.id, IngestJob.state, IngestJob.attempts,
                                IngestJob.last_error)).all()
    return {i: (st, a, e) for i, st, a, e in rows}


def _ready_now(db: Database) -> None:
    with db.session() as s:
        s.execute(update(IngestJob).values(available_at=queue.now()))


def _paused(cause: str) -> float | None:
    return METRICS.registry.get_sample_value("carsearch_ingest_paused", {"cause": cause})


def _cli(settings: Settings, *args: str) -> Any:
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = settings

    app.add_typer(ingest_app, name="ingest")
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def lite(tmp_path: Path, make_database, published_model: PublishedModel
         ) -> Iterator[Platform]:
    """SQLite and a Milvus Lite file: for what does not depend on the shape."""
    p = world(tmp_path, make_database("sqlite").url, published_model,
              str(tmp_path / "milvus.db"))
    yield p
    p.close()


# -- item 1: a malformed row costs that job alone ----------------------------------------
def test_a_malformed_queue_row_costs_that_job_alone(database: Database) -> None:
    bad = _insert(database, MALFORMED)
    deep = _insert_raw(database, DEEP)
    good = queue.enqueue(database, [{"path": "/nowhere/good.png", "meta": {"make": "Ford"}}])
    claimed = queue.claim(database, "w", 2)  # fewer than the bad rows before it
    assert [c.id for c in claimed] == good
    jobs = _jobs(database)
    for i in [*bad, deep]:
        state, attempts, error = jobs[i]
        assert state == JobState.dead and attempts == 1, (i, jobs[i])
        assert error is not None and error.startswith("malformed payload"), error
    assert "cannot be decoded (nested too deeply)" in (jobs[deep][2] or "")
    assert queue.claim(database, "w", 50) == []  # nothing stalls, nothing comes back


# -- items 1 and 4: one bad job in a batch costs itself alone ---------------------------
def test_one_bad_job_in_a_batch_costs_itself_alone(
        tmp_path: Path, database: Database, published_model: PublishedModel) -> None:
    p = world(tmp_path, database.url, published_model, str(tmp_path / "milvus.db"))
    good = [make_image(tmp_path / f"g{i}.png", 600 + i) for i in range(4)]
    # A parent that cannot be looked at: root traverses any directory, so a component
    # too long for the filesystem (ENAMETOOLONG) makes the path raise the same way.
    untraversable = "/" + "x" * 300 + "/car.png"
    extra = make_image(tmp_path / "oops.png", 610)
    ids = queue.enqueue(p.db, [{"path": str(good[0])}, {"path": str(extra), "meta": "oops"},
                               {"path": str(good[1])}, {"path": untraversable}])
    ids += _insert(p.db, [{"path": None}, [1, 2], "x", sa.JSON.NULL])
    ids += queue.enqueue(p.db, [{"path": str(good[2])}, {"path": str(good[3])}])
    w = IngestWorker(p, batch_size=16)
    w.run_once()
    assert w.stats.summary.indexed == 4 and len(assert_invariant(p)) == 4
    jobs = _jobs(p.db)
    assert [jobs[i][0] for i in ids] == [
        JobState.done, JobState.dead, JobState.done, JobState.queued,
        JobState.dead, JobState.dead, JobState.dead, JobState.dead,
        JobState.done, JobState.done]
    assert "'meta' is string" in (jobs[ids[1]][2] or "")
    assert "'path' is null" in (jobs[ids[4]][2] or "")
    for _ in range(5):  # the untraversable path is retried with backoff, then dead
        _ready_now(p.db)
        w.run_once()
    state, attempts, error = _jobs(p.db)[ids[3]]
    assert state == JobState.dead and attempts == 5 and "File name too long" in (error or "")
    assert queue.counts(p.db)["running"] == 0
    p.close()


def test_a_file_gone_between_decode_and_copy_costs_its_job_alone(
        lite: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [make_image(tmp_path / f"v{i}.png", 620 + i) for i in range(3)]
    ids = queue.enqueue(lite.db, [{"path": str(x)} for x in paths])
    real = pipeline_mod.keep_copy

    def vanishing(p: Any, image_dir: Path) -> Path:  # the original goes after its decode
        if p.item.path == paths[1]:
            paths[1].unlink(missing_ok=True)
        return real(p, image_dir)

    monkeypatch.setattr(pipeline_mod, "keep_copy", vanishing)
    w = IngestWorker(lite, batch_size=8)
    w.run_once()
    assert w.stats.summary.indexed == 2 and len(assert_invariant(lite)) == 2
    jobs = _jobs(lite.db)
    assert [jobs[i][0] for i in ids] == [JobState.done, JobState.queued, JobState.done]
    assert jobs[ids[1]][1] == 1 and "FileNotFoundError" in (jobs[ids[1]][2] or "")


# -- item 2: one inbox file cannot stop the round ---------------------------------------
def test_one_inbox_file_cannot_stop_the_round(lite: Platform, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    make_image(inbox / "deep.png", 700)
    (inbox / "deep.png.json").write_text("[" * 20_000 + "]" * 20_000)  # 40 KB
    make_image(inbox / "cursed.png", 701)
    make_image(inbox / "fine.png", 702)
    queue.enqueue(lite.db, [{"path": str(make_image(tmp_path / "other.png", 703))}])
    real = worker_mod.sha256_file

    def cursed(path: Path) -> str:  # the hook: any exception, for this one file
        if path.name == "cursed.png":
            raise RuntimeError("the hook's own failure")
        return real(path)

    monkeypatch.setattr(worker_mod, "sha256_file", cursed)
    caplog.set_level(logging.WARNING, logger="carsearch.ingest.worker")
    w = IngestWorker(lite, inbox=inbox)
    for _ in range(2):
        w.run_once()
    assert [x.name for x in inbox.iterdir()] == ["cursed.png"]
    assert w.last_scan.left == {"cursed.png": "RuntimeError: the hook's own failure"}
    assert "leaving" in caplog.text and "cursed.png" in caplog.text
    assert w.stats.summary.indexed == 3 and len(assert_invariant(lite)) == 3
    with lite.db.session() as s:
        extras = [r.extra or {} for r in s.scalars(select(Image))]
        n_jobs = s.scalar(select(func.count()).select_from(IngestJob))
    assert [e["sidecar_error"] for e in extras if "sidecar_error" in e] == ["nested too deeply"]
    assert n_jobs == 3


# -- items 2 and 5: a full image store ---------------------------------------------------
class FullDisk:
    """The image store on a 1 MiB tmpfs, filled to the last byte. Where mounting is not
    allowed (not root), ENOSPC comes from a hook on the copy, the move and the space
    probe instead."""

    def __init__(self, where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.where, self.mp, self.filler = where, monkeypatch, where / "filler"
        self.mounted = False
        self.full = False

    def __enter__(self) -> FullDisk:
        self.where.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(self.where)],
                           capture_output=True, text=True)
        self.mounted = r.returncode == 0
        if not self.mounted:
            self._hook()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.where)], check=False)

    def fill(self) -> None:
        self.full = True
        if not self.mounted:
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        with pytest.raises(OSError):  # really full
            (self.where / "probe").write_bytes(b"\0" * 4096)

    def free(self) -> None:
        self.full = False
        self.filler.unlink(missing_ok=True)
        (self.where / "probe").unlink(missing_ok=True)

    def _hook(self) -> None:
        def enospc(real: Any) -> Any:
            def call(*a: Any, **k: Any) -> Any:
                if self.full:
                    raise OSError(errno.ENOSPC, "No space left on device (hook)")
                return real(*a, **k)
            return call

        self.mp.setattr(pipeline_mod.shutil, "copyfile", enospc(pipeline_mod.shutil.copyfile))
        self.mp.setattr(worker_mod.shutil, "move", enospc(worker_mod.shutil.move))
        self.mp.setattr(IngestWorker, "_disk_ok", lambda _w: not self.full)


def test_a_full_image_store_pauses_claiming_until_it_has_room(
        lite: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FullDisk(lite.settings.image_dir, monkeypatch) as disk:
        disk.fill()
        (job,) = queue.enqueue(lite.db, [{"path": str(make_image(tmp_path / "q.png", 800))}])
        w = IngestWorker(lite)  # the queued job's copy into the store fails: it waits
        w.run_once()
        state, attempts, error = _jobs(lite.db)[job]
        assert (state, attempts) == (JobState.queued, 0)
        assert error is not None and error.startswith("waiting: the image store is full")
        assert w.pause is not None and w.pause.cause == "disk_full"
        assert _paused("disk_full") == 1.0
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        for i in range(2):
            make_image(inbox / f"i{i}.png", 810 + i)
        wi = IngestWorker(lite, inbox=inbox)
        for _ in range(3):  # the moves fail: no job per round, nothing claimed
            wi.run_once()
            assert sorted(x.name for x in inbox.iterdir()) == ["i0.png", "i1.png"]
            assert list(_jobs(lite.db)) == [job]
            assert _jobs(lite.db)[job][1] == 0
            assert wi.pause is not None and wi.pause.cause == "disk_full"
        assert not list(lite.settings.image_dir.rglob("*.part"))
        disk.free()
        wi.run_once()
        assert wi.pause is None and _paused("disk_full") == 0.0
        assert not any(inbox.iterdir())
        assert queue.counts(lite.db)["done"] == 3 and queue.counts(lite.db)["dead"] == 0
        assert len(assert_invariant(lite)) == 3


# -- item 5: no serving version yet: the docker-compose order ----------------------------
def test_files_delivered_before_the_first_promotion_wait_for_it(
        tmp_path: Path, database: Database, published_model: PublishedModel) -> None:
    p = world(tmp_path, database.url, published_model, str(tmp_path / "milvus.db"),
              promote=False)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(3):
        make_image(inbox / f"early{i}.png", 820 + i)
    health = Health(p, role="ingest")
    w = IngestWorker(p, inbox=inbox)
    w.loop_state = health.loop("ingest-worker", 1.0)
    for _ in range(3):
        w.run_once()
    assert not any(inbox.iterdir())  # taken in: moved into the store, queued
    assert {(st, a) for st, a, _ in _jobs(p.db).values()} == {(JobState.queued, 0)}
    assert w.pause is not None and w.pause.cause == "no_serving_version"
    _, body = health.ready()
    assert "no serving model version yet (3 jobs wait)" in body["loops"][0]["paused"]
    assert _paused("no_serving_version") == 1.0
    res = _cli(p.settings, "ingest", "status", "--json")
    assert res.exit_code == 0, res.output
    (paused,) = json.loads(res.output)["paused"]
    assert "publish one and promote it" in paused["reason"]
    p.registry.promote("v1")
    w.run_once()
    assert w.stats.summary.indexed == 3 and len(assert_invariant(p)) == 3
    assert w.pause is None and health.ready()[1]["loops"][0]["paused"] is None
    assert json.loads(_cli(p.settings, "ingest", "status", "--json").output)["paused"] == []
    p.close()


def test_a_job_for_a_collection_with_no_serving_version_waits_unspent(
        lite: Platform, tmp_path: Path) -> None:
    from carsearch.platform import collections

    collections.create(lite.db, "photos", "general")  # exists, serves nothing yet
    photo, car = (make_image(tmp_path / f"{n}.png", 840 + i)
                  for i, n in enumerate(("photo", "car")))
    ids = queue.enqueue(lite.db, [{"path": str(photo), "collection": "photos"},
                                  {"path": str(car)}])
    w = IngestWorker(lite)
    for _ in range(3):
        _ready_now(lite.db)
        w.run_once()
    state, attempts, error = _jobs(lite.db)[ids[0]]
    assert (state, attempts) == (JobState.queued, 0)
    assert error == ("waiting: no serving model version for photos yet: publish one and "
                     "promote it")
    assert _jobs(lite.db)[ids[1]][0] == JobState.done and w.pause is None
    assert queue.status(lite.db)["waiting"] == 1


def _hold_lite_file(uri: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"from pymilvus import MilvusClient; import time; MilvusClient({uri!r}); "
         "print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    return holder


def test_an_unavailable_vector_store_pauses_and_says_why(lite: Platform, tmp_path: Path) -> None:
    settings = lite.settings
    lite.close()
    queue.enqueue(lite.db, [{"path": str(make_image(tmp_path / "v.png", 830))}])
    down = Platform(settings)
    holder = _hold_lite_file(settings.milvus_uri)  # another process holds the Lite file
    try:
        w = IngestWorker(down)
        with pytest.raises(VectorStoreError):
            w.run_once()
        assert w.pause is not None and w.pause.cause == "vector_store"
        assert "another process has it open" in w.pause.reason
        assert _paused("vector_store") == 1.0
        assert {(st, a) for st, a, _ in _jobs(down.db).values()} == {(JobState.queued, 0)}
    finally:
        holder.kill()
        holder.wait()
        down.db.dispose()
    back = Platform(settings)
    w.p = back
    w.run_once()
    assert w.pause is None and w.stats.summary.indexed == 1
    back.close()


# -- item 5: requeue -----------------------------------------------------------------------
def test_requeue_brings_dead_jobs_back(tmp_path: Path, database: Database,
                                       published_model: PublishedModel) -> None:
    p = world(tmp_path, database.url, published_model, str(tmp_path / "milvus.db"))
    late = tmp_path / "late.png"
    (job,) = queue.enqueue(p.db, [{"path": str(late)}], max_attempts=1)
    w = IngestWorker(p)
    w.run_once()
    assert _jobs(p.db)[job][0] == JobState.dead
    make_image(late, 900)  # it arrives after all
    res = _cli(p.settings, "ingest", "requeue", "--dead", "--since", "2999-01-01", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["requeued"] == 0
    res = _cli(p.settings, "ingest", "requeue", "--dead", "--since", "2000-01-01", "--json")
    out = json.loads(res.output)
    assert out["requeued"] == 1 and "file not found" in out["jobs"][0]["error"]
    state, attempts, error = _jobs(p.db)[job]
    assert (state, attempts) == (JobState.queued, 0)
    assert error is not None and error.startswith("requeued after:") and "file not found" in error
    res = _cli(p.settings, "ingest", "requeue")
    assert isinstance(res.exception, ConfigError) and "--dead" in str(res.exception)
    w.run_once()
    assert _jobs(p.db)[job][0] == JobState.done and len(assert_invariant(p)) == 1
    p.close()


# -- item 9: links ---------------------------------------------------------------------------
def test_an_inbox_link_is_refused_and_its_target_never_read(lite: Platform,
                                                            tmp_path: Path) -> None:
    secret = make_image(tmp_path / "elsewhere.png", 950)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "link.png").symlink_to(secret)
    make_image(inbox / "real.png", 951)
    w = IngestWorker(lite, inbox=inbox)
    w.run_once()
    assert not any(inbox.iterdir()) and secret.is_file()
    assert w.stats.summary.indexed == 1 and len(assert_invariant(lite)) == 1
    assert not [x for x in lite.settings.image_dir.rglob("*") if x.is_symlink()]
    with lite.db.session() as s:
        (refused,) = s.scalars(select(Image).where(Image.status == ImageStatus.quarantined))
    assert refused.error is not None and "symbolic link" in refused.error
    assert refused.sha256 != sha256_file(secret) and refused.path == str(inbox / "link.png")


def test_a_link_in_the_image_store_becomes_the_bytes(lite: Platform, tmp_path: Path) -> None:
    original = make_image(tmp_path / "orig.png", 960)
    digest = sha256_file(original)
    dest = store_path(lite.settings.image_dir, digest, ".png")
    dest.parent.mkdir(parents=True)
    dest.symlink_to(original)  # what an inbox link became before this fix
    queue.enqueue(lite.db, [{"path": str(dest)}])
    IngestWorker(lite).run_once()
    assert not dest.is_symlink() and sha256_file(dest) == digest
    original.unlink()
    assert sha256_file(dest) == digest and len(assert_invariant(lite)) == 1


# -- item 14: sidecars and images wait for each other ------------------------------------
def test_a_sidecar_after_its_image_is_waited_for_and_an_orphan_removed(
        lite: Platform, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="carsearch.ingest.worker")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    a = sha256_file(make_image(inbox / "a.png", 970))
    t0 = time.time()
    r = scan_inbox(lite, inbox, settle_s=60, clock=lambda: t0)
    assert (r.queued, r.waiting) == (0, 1) and (inbox / "a.png").exists()
    (inbox / "a.png.json").write_text(json.dumps({"make": "Ford"}))  # its sidecar, late
    r = scan_inbox(lite, inbox, settle_s=60, clock=lambda: t0 + 1)
    assert r.queued == 1 and not any(inbox.iterdir())
    # A sidecar with no image waits the settle time, then goes, with a log line.
    (inbox / "b.json").write_text(json.dumps({"make": "Tesla"}))
    r = scan_inbox(lite, inbox, settle_s=60, clock=time.time)
    assert r.waiting == 1 and (inbox / "b.json").exists()
    r = scan_inbox(lite, inbox, settle_s=60, clock=lambda: time.time() + 61)
    assert r.orphans_removed == 1 and not any(inbox.iterdir())
    assert "removed orphan sidecar" in caplog.text and "b.json" in caplog.text
    # An orphan is never attached to a later image with its stem.
    (inbox / "c.json").write_text(json.dumps({"make": "Tesla"}))
    time.sleep(0.2)  # the image arrives longer than the settle time (0.1 s) after it
    c = sha256_file(make_image(inbox / "c.png", 971))
    r = scan_inbox(lite, inbox, settle_s=0.1, clock=lambda: time.time() + 10)
    assert (r.queued, r.orphans_removed) == (1, 1) and not any(inbox.iterdir())
    IngestWorker(lite).run_once()
    with lite.db.session() as s:
        makes = {r.sha256: r.make for r in s.scalars(select(Image))}
    assert makes == {a: "Ford", c: None}


def test_the_settle_time_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().ingest.settle_s == 2.0
    monkeypatch.setenv("CARSEARCH_INGEST__SETTLE_S", "7.5")
    assert Settings().ingest.settle_s == 7.5
