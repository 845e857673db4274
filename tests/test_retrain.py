"""The retrain job, the data flywheel's last step, on real parts.

1. The request's life (planted vectors, every database × Milvus shape): a drift event
   makes one request that waits for its labelling tasks; the same event seen again makes
   none; labelled, it turns ready; two claimants get it once; a run whose process stopped
   is declared interrupted and is not started again until a person retries it.
2. The loop with the real model (Milvus Lite + SQLite, and the Milvus server +
   PostgreSQL): a compact SigLIP trained on a rendered catalogue serves; photos of a make
   it never saw (`carsearch data novel`'s Zephyr) are ingested; their labelling task is
   exported, filled in and imported; the retrain job trains on the catalogue plus them,
   evaluates against the serving version on the validation split (old and new classes
   apart), promotes when at least as good or keeps a candidate that a person then
   promotes, and the new make is findable by its name. A deliberately ruined retrain (a
   learning rate that wrecks the weights) stays a candidate with the reason.
3. A retrain process SIGKILLed mid-training: the next job declares the request
   interrupted and starts nothing.
4. The one-machine shape: `serve --ingest --retrain-every` holds the Lite file; a
   request made from another process (`carsearch retrain request`, database only) is
   trained by the page's process and promoted or kept by the gate.

The drift step of (2) is not the real model's: the compact model trained on 360 rendered
images embeds the novel make as densely as the known classes (docs/GUIDE.md, "The retrain
job"), so the tasks are made by the same `labels.create_tasks` call the drift job
makes; (1) runs the drift job itself on vectors planted as an isolated cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from carsearch.data.catalogue import NOVEL, write_catalogue, write_vehicles
from carsearch.ingest.pipeline import BatchWriter, IngestItem, ingest_items
from carsearch.lifecycle.labelling import export_rows, import_labels, write_rows
from carsearch.lifecycle.reindex import promote_with_backfill
from carsearch.lifecycle.retrain import RetrainJob, labelled_images, write_training_set
from carsearch.monitoring.drift import run_drift
from carsearch.platform.db import Image, TrainingRun, labels, reports, retrains
from carsearch.platform.runtime import Platform
from carsearch.platform.settings import RetrainSettings, Settings
from carsearch.training.trainer import TrainConfig, train
from fixtures.common import empty_server
from fixtures.drift_world import (
    World,
    _fill,
    _planted,
    marker,  # noqa: F401  (fixture)
)
from fixtures.drift_world import world as _drift_world

world = _drift_world  # the fixtures, under the names the tests use

REPO = Path(__file__).resolve().parents[1]


# --- 1. the request's life ---------------------------------------------------------------


def test_one_request_per_drift_event_claimed_once(world: World, tmp_path: Path) -> None:
    _, now = _planted(world)
    run = run_drift(world.platform, since=now - timedelta(days=1), retrain_wait_s=60)
    (task,) = labels.tasks(world.db)
    rid = run.retrain["request"]
    (req,) = retrains.listing(world.db)
    assert (req["id"], req["state"], req["task_ids"]) == (rid, "waiting", [task["id"]])
    assert req["drift_report_id"] == run.report_id

    again = run_drift(world.platform, since=now - timedelta(days=1), retrain_wait_s=60)
    assert again.n_isolated == 1 and again.retrain["request"] is None  # the same event
    assert "same drift event" in again.retrain["request_state"]
    assert len(retrains.listing(world.db)) == 1
    # Recording the same report twice (two processes) still makes one request.
    assert retrains.for_drift_event(world.db, run.report_id, "vehicles", [task["id"]]) == (
        rid, False)

    assert retrains.refresh(world.db) == []  # not labelled yet: it waits
    assert retrains.claim(world.db, "a") is None
    rows = _fill(export_rows(world.platform), make="Zephyr", model="Aero", year=2015,
                 body_type="coupe", colour="red")
    import_labels(world.platform, write_rows(rows, tmp_path / "l.jsonl"))
    assert retrains.refresh(world.db) == [rid]
    first, second = retrains.claim(world.db, "a"), retrains.claim(world.db, "b")
    assert first is not None and first.id == rid and second is None  # exactly once
    assert retrains.get(world.db, rid)["holder"] == "a"

    # Its process stops: no heartbeat for the lease; the next tick anywhere declares it
    # interrupted and runs nothing.
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert retrains.interrupt_stale(world.db, 10.0, now=later) == [rid]
    assert not retrains.heartbeat(world.db, first)  # the old holder lost it
    tick = RetrainJob(world.platform).tick()
    assert tick.ran == [] and retrains.get(world.db, rid)["state"] == "interrupted"
    assert "retry" in (retrains.get(world.db, rid)["reason"] or "")
    retrains.retry(world.db, rid)
    assert retrains.get(world.db, rid)["state"] == "ready"
    with pytest.raises(ValueError, match="ready"):
        retrains.retry(world.db, rid)


def test_a_person_asks_once(world: World) -> None:
    a, made_a = retrains.by_person(world.db, "vehicles", "ann")
    b, made_b = retrains.by_person(world.db, "vehicles", "bob")
    assert made_a and not made_b and a == b  # an open request is reused
    assert retrains.get(world.db, a)["state"] == "ready"


def test_the_training_set_adds_the_labelled_images(tmp_path: Path) -> None:
    from carsearch.data.stanford import load_stanford
    from carsearch.lifecycle.retrain import Labelled

    base = tmp_path / "cat"
    write_catalogue(base, 72, seed=1, size=(64, 48), progress=False)
    photos = write_vehicles(tmp_path / "novel", NOVEL, 8, colours=("red",), size=(64, 48))
    gone = tmp_path / "gone.jpg"
    extra = [Labelled(100 + i, p, "Zephyr Aero Coupe 2015", "red") for i, p in enumerate(photos)]
    extra.append(Labelled(999, gone, "Zephyr Aero Coupe 2015", None))
    got = write_training_set(base, extra, tmp_path / "out", test_share=0.25)
    ds = load_stanford(got.root)
    assert got.new_classes == {"Zephyr Aero Coupe 2015": 8} and got.missing == [str(gone)]
    assert (got.base_train, got.base_test) == (36, 36)
    assert got.new_train + got.new_test == 8 and got.new_train >= 1 and got.new_test >= 1
    new = [im for im in ds.images if im.label.make == "Zephyr"]
    assert len(new) == 8 and {im.label.colour for im in new} == {"red"}
    assert {im.split for im in new} == {"train", "test"}
    assert len(ds.class_names) == 37 and ds.split_sizes() == {
        "train": 36 + got.new_train, "test": 36 + got.new_test}


# --- 2. the loop with the real model --------------------------------------------------------


@dataclass
class Trained:
    catalogue: Path
    model: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, compact_model: Path) -> Trained:
    """A compact SigLIP trained on a rendered catalogue (once for the module)."""
    root = tmp_path_factory.mktemp("flywheel")
    cat = root / "catalogue"
    write_catalogue(cat, 360, seed=5, size=(160, 120), progress=False)
    res = train(TrainConfig(data=cat, base=str(compact_model), out=root / "run", steps=150,
                            batch_size=32, full=True, progress=False, seed=0))
    assert res.model_dir is not None
    return Trained(cat, res.model_dir)


SHAPES = ["lite-sqlite",
          pytest.param("server-postgresql", marks=[pytest.mark.milvus_server,
                                                   pytest.mark.postgres])]


@pytest.fixture(params=SHAPES)
def shape(request: pytest.FixtureRequest, tmp_path: Path, make_database) -> tuple[str, str]:
    """(database URL, Milvus URI) of one shape: a copy of the run's migrated database
    template, an empty Milvus."""
    if request.param == "lite-sqlite":
        return make_database("sqlite").url, str(tmp_path / "milvus.db")
    url = make_database("postgresql").url
    server = request.getfixturevalue("milvus_server")
    empty_server(server.uri)
    return url, str(server.uri)


@dataclass
class Loop:
    platform: Platform
    novel: list[int]
    tmp: Path


def _ingest(p: Platform, items: list[IngestItem]) -> list[int]:
    version = p.registry.require_serving()
    got = ingest_items(items, db=p.db, writer=BatchWriter.fixed(
        p.db, p.store, p.search.encoder_for(version), version),
        max_pixels=p.settings.max_image_pixels, progress=False)
    assert got.indexed == len(items), got
    with p.db.session() as s:
        return list(s.scalars(select(Image.id).order_by(Image.id.desc()).limit(len(items))))


# Tests 3 and 4 assert the request's life and which process runs it, not what the index
# answers: their worlds index 24 of the catalogue's test photos, not all of them (the
# retrain reads the catalogue from disk, not from the index; a promotion backfills fewer).
FEW_INDEXED = {"test_a_killed_retrain_is_interrupted_not_restarted": 24,
               "test_serve_holding_the_lite_file_runs_and_promotes": 24}


@pytest.fixture
def loop(trained: Trained, shape: tuple[str, str], tmp_path: Path,
         request: pytest.FixtureRequest) -> Iterator[Loop]:
    url, uri = shape
    settings = Settings(data_dir=tmp_path / "data", database_url=url, milvus_uri=uri,
                        retrain=RetrainSettings(data=trained.catalogue, steps=200,
                                                batch_size=32, lr=3e-4))
    settings.ensure_dirs()
    p = Platform(settings)
    p.registry.publish(trained.model, name="v1")
    p.registry.promote("v1")
    from carsearch.data.stanford import load_stanford

    test = load_stanford(trained.catalogue, split="test").images
    test = test[:FEW_INDEXED.get(request.node.originalname, len(test))]
    _ingest(p, [IngestItem(im.path, source="catalogue",
                           meta={"class_name": im.label.class_name,
                                 "colour": im.label.colour}) for im in test])
    photos = write_vehicles(tmp_path / "arrivals", NOVEL, 16, seed=3, size=(160, 120),
                            colours=("yellow", "red", "white", "blue"))
    novel = _ingest(p, [IngestItem(x, source="camera", meta={}) for x in photos])
    # What the drift job does for an isolated cluster of them (see the module docstring).
    report = reports.record_drift(p.db, {"status": "checked"}, p.registry.require_serving().id,
                                  n_images=len(novel), n_isolated=1, retrain_triggered=True)
    tasks = labels.create_tasks(p.db, report, "vehicles", [labels.NewTask(
        novel, "Ford Mustang Convertible 2012", {"make": "Ford"})])
    retrains.for_drift_event(p.db, report, "vehicles", tasks)
    yield Loop(p, novel, tmp_path)
    p.close()


def _label_all(lp: Loop) -> None:
    rows = _fill(export_rows(lp.platform), make="Zephyr", model="Aero", year=2015,
                 body_type="coupe", colour="")
    for r in rows:  # each photo's own paint, as a person would type it
        r["colour"] = ""
    rep = import_labels(lp.platform, write_rows(rows, lp.tmp / "labels.csv"))
    assert rep.applied == len(lp.novel)


def _top(p: Platform, query: str, k: int = 8) -> list[int]:
    """The dispatcher's search (the CLI's and the page's, one service call): filters read
    from the text as preferences, then the serving version's ranking."""
    from carsearch.platform.search.service import SearchRequest

    return [h.image_id for h in p.search.search(SearchRequest(query, k)).hits]


@pytest.mark.slow
def test_labelled_novel_make_is_retrained_promoted_and_findable(loop: Loop) -> None:
    p = loop.platform
    before = len(set(_top(p, "zephyr aero")) & set(loop.novel))
    assert before < 8  # nobody knows the name yet
    job = RetrainJob(p)
    assert job.tick().ran == []  # the task is not labelled yet
    _label_all(loop)
    assert {li.image_id for li in labelled_images(p, "vehicles")} == set(loop.novel)

    tick = job.tick()
    (ran,) = tick.ran
    (req,) = retrains.listing(p.db)
    assert ran["data"]["new_classes"] == {"Zephyr Aero 2015": 16}
    # The gate: the candidate against the serving version on the validation split (the
    # served framing), old and new classes reported apart; promoted only when at least as
    # good. On this compact base the 200-step retrain learns the new make but loses some
    # of the old classes (docs/BENCHMARKS.md), and either outcome must follow the rule.
    scores, groups = ran["scores"], req["result"]["by_group"]
    assert set(groups["fine_tuned"]) == set(groups["serving"]) == {"old classes", "new classes"}
    assert groups["fine_tuned"]["new classes"] > groups["serving"]["new classes"], groups
    gate = scores["fine_tuned"] >= scores["serving"]
    assert req["state"] == ("promoted" if gate else "candidate"), (req["reason"], scores)
    with p.db.session() as s:
        run = s.get(TrainingRun, req["training_run_id"])
        assert run is not None and run.metrics["outcome"]["promoted"] is gate
    if not gate:  # kept with its reason; a person who reads it promotes it (models promote)
        assert "is below serving v1" in req["reason"]
        assert p.registry.require_serving().name == "v1"
        promote_with_backfill(p, req["version"], progress=False)
    serving = p.registry.require_serving()
    assert serving.name == req["version"] != "v1"
    # The new make is findable by its name, served from the new version's collection.
    after = _top(p, "zephyr aero")
    assert set(after) <= set(loop.novel) and len(after) == 8, (before, after)
    ids, _ = p.store.vectors(serving.collection, loop.novel)
    assert set(ids) == set(loop.novel)
    assert job.tick().ran == []  # done: nothing runs twice

    # A ruined retrain (a learning rate that wrecks the weights) is kept as a candidate.
    p.settings.retrain.lr, p.settings.retrain.steps = 0.5, 4
    rid, _ = retrains.by_person(p.db, "vehicles", "test")
    (bad,) = job.tick().ran
    row = retrains.get(p.db, rid)
    assert row is not None and row["state"] == "candidate", row
    assert "is below serving" in row["reason"] and bad["promoted"] is False
    assert p.registry.require_serving().name == serving.name  # still the good one


# --- 3. a retrain process killed mid-training -----------------------------------------------


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARSEARCH_")}
    env.update(CARSEARCH_DATA_DIR=str(settings.data_dir), CARSEARCH_DATABASE_URL=
               settings.database_url, CARSEARCH_MILVUS_URI=settings.milvus_uri,
               CARSEARCH_RETRAIN__DATA=str(settings.retrain.data),
               CARSEARCH_THREADS__TORCH="1", PYTHONPATH=str(REPO / "src"), **extra)
    return env


def _wait(pred: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["lite-sqlite"], indirect=True)
def test_a_killed_retrain_is_interrupted_not_restarted(loop: Loop) -> None:
    p = loop.platform
    _label_all(loop)
    settings = p.settings
    p.close()  # the child opens the Lite file
    cmd = [sys.executable, "-m", "carsearch.cli", "retrain", "run", "--json"]
    child = subprocess.Popen(cmd, env=_env(settings, CARSEARCH_RETRAIN__STEPS="5000"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watcher = Platform(settings)
    try:
        _wait(lambda: (retrains.listing(watcher.db) or [{}])[0].get("state") == "running",
              240, "the child to claim the request")
        child.send_signal(signal.SIGKILL)  # mid-training: 5000 steps take far longer
        child.wait(30)
        with watcher.db.session() as s:
            runs_before = s.scalar(select(func.count()).select_from(TrainingRun))
    finally:
        watcher.close()
    again = subprocess.run(cmd, env=_env(settings, CARSEARCH_RETRAIN__LEASE_S="1"),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    out = json.loads(again.stdout)
    assert out["ran"] == [] and len(out["interrupted"]) == 1
    q = Platform(settings)
    try:
        (req,) = retrains.listing(q.db)
        assert req["state"] == "interrupted" and "not restarted" in req["reason"]
        with q.db.session() as s:  # the restart started no training run
            assert s.scalar(select(func.count()).select_from(TrainingRun)) == runs_before
        assert q.registry.require_serving().name == "v1"
    finally:
        q.close()


# --- 4. the one-machine shape: the page's process promotes ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["lite-sqlite"], indirect=True)
def test_serve_holding_the_lite_file_runs_and_promotes(loop: Loop) -> None:
    from ui_world import free_port, wait_for

    p = loop.platform
    _label_all(loop)
    assert len(retrains.refresh(p.db)) == 1  # labelled: ready for whichever job runs next
    (req,) = retrains.listing(p.db)
    settings = p.settings
    p.close()
    port = free_port()
    log = loop.tmp / "serve.log"
    # 20 steps, not the loop's 200: what is asserted here is who runs the request and that
    # the gate's decision is followed, whichever it is; the 200-step retrain's quality is
    # asserted in test_labelled_novel_make_is_retrained_promoted_and_findable.
    with log.open("wb") as fh:
        page = subprocess.Popen(
            [sys.executable, "-m", "carsearch.cli", "serve", "--port", str(port), "--ingest",
             "--retrain-every", "2"], env=_env(settings, CARSEARCH_RETRAIN__STEPS="20"),
            stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/", page, log)
        # Another process cannot open the Lite file, so it only asks (the database).
        asked = subprocess.run([sys.executable, "-m", "carsearch.cli", "retrain", "request"],
                               env=_env(settings), capture_output=True, text=True, timeout=120)
        assert asked.returncode == 0, asked.stderr
        watcher_db = Platform(settings).db
        if not asked.stdout.startswith(f"already asked: request {req['id']}"):  # not doubled
            # ...unless the page's job had already finished it: then it is a new request.
            assert retrains.get(watcher_db, req["id"])["state"] in ("promoted", "candidate")

        def ended() -> bool:
            states = {r["state"] for r in retrains.listing(watcher_db)}
            return not states & {"waiting", "ready", "running"}

        _wait(ended, 420, "the page's retrain job")
        rows = {r["id"]: r for r in retrains.listing(watcher_db)}
        done = rows[req["id"]]
        assert "failed" not in {r["state"] for r in rows.values()}, rows
        # The page's job ran it to the gate's decision: promoted into serving when at
        # least as good on validation, else kept as a candidate with v1 serving.
        scores = done["result"]["scores"]
        gate = scores["fine_tuned"] >= scores["serving"]
        assert done["state"] == ("promoted" if gate else "candidate"), rows
        with watcher_db.session() as s:
            from carsearch.platform.db import ModelVersion, VersionStatus

            serving = s.scalar(select(ModelVersion.name).where(
                ModelVersion.status == VersionStatus.serving))
        assert serving == (done["version"] if gate else "v1")
        assert "retrain job running in this process" in log.read_text()
    finally:
        page.send_signal(signal.SIGINT)
        try:
            page.wait(60)
        except subprocess.TimeoutExpired:
            page.kill()
