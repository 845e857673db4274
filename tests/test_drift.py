"""The drift job: density detection on synthetic unit vectors, the job end to end on real
Milvus Lite files with SQLite and PostgreSQL, the retrain trigger and its cooldown, and
`carsearch drift run` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from carsearch.monitoring.drift import detect_drift, knn_density, run_drift
from carsearch.platform.db import (
    Database,
    DriftReport,
    ModelVersion,
    VersionStatus,
    migrate,
)
from carsearch.platform.db.reports import latest_drift
from carsearch.platform.errors import ModelNotFoundError
from carsearch.platform.settings import SettingsError, load_settings
from carsearch.platform.vectors.milvus import IndexSpec, MilvusStore
from carsearch.platform.vectors.protocol import VectorRow
from fixtures.drift_world import (
    DIM,
    Catalogue,
    World,
    _settings,
    _unit,
)
from fixtures.drift_world import marker as _marker
from fixtures.drift_world import world as _drift_world

world = _drift_world  # the fixtures, under the names the tests use
marker = _marker

CLI = [sys.executable, "-m", "carsearch.cli"]


# --- detection ------------------------------------------------------------------------------


def test_density_is_the_mean_of_the_k_nearest_similarities() -> None:
    cat = Catalogue(1)
    ref, _ = cat.known(60)
    queries, _ = cat.known(7)
    sims = queries @ ref.T
    expect = np.sort(sims, axis=1)[:, ::-1][:, :5].mean(axis=1)
    density, nearest, rows = knn_density(ref, queries, 5)
    np.testing.assert_allclose(density, expect, rtol=1e-5)
    np.testing.assert_allclose(nearest, sims.max(axis=1), rtol=1e-5)
    assert rows.tolist() == sims.argmax(axis=1).tolist()
    # Leave-one-out: a reference is never its own neighbour.
    self_sims = ref @ ref.T
    np.fill_diagonal(self_sims, -np.inf)
    loo = np.sort(self_sims, axis=1)[:, ::-1][:, :5].mean(axis=1)
    density, _, rows = knn_density(ref, None, 5)
    np.testing.assert_allclose(density, loo, rtol=1e-5)
    assert (rows != np.arange(len(ref))).all()


def test_a_new_tight_cluster_is_found() -> None:
    cat = Catalogue(2)
    ref, _ = cat.known(800)
    same, _ = cat.known(200)
    planted = cat.new_vehicle(15)
    new = np.vstack([same, planted])
    ids = np.arange(10_000, 10_000 + len(new))
    planted_ids = set(ids[len(same):].tolist())
    det = detect_drift(ref, new, new_ids=ids, reference_ids=np.arange(len(ref)) + 5,
                       k=10, percentile=5, min_cluster_size=5)
    assert det.n_isolated == 1
    (cluster,) = det.clusters
    assert cluster.size == 15
    assert set(cluster.member_ids) <= planted_ids and len(cluster.member_ids) == 10
    assert cluster.mean_density < det.threshold < det.reference_density["p50"]
    assert cluster.cohesion > 0.9
    centroid = _unit(planted.mean(axis=0))
    assert cluster.nearest_reference_id == int(np.argmax(ref @ centroid)) + 5
    assert cluster.nearest_similarity == pytest.approx(float((ref @ centroid).max()), abs=1e-5)
    assert det.n_novel >= 15 and det.n_noise == det.n_novel - 15
    assert det.to_dict()["n_isolated"] == 1


def test_new_images_from_the_known_classes_are_not_drift() -> None:
    cat = Catalogue(3)
    ref, _ = cat.known(1500)
    new, _ = cat.known(1500)
    det = detect_drift(ref, new, k=10, percentile=5, min_cluster_size=5)
    assert det.n_isolated == 0
    # About `percentile` per cent of them fall under the threshold by chance, as noise.
    assert 0.02 < det.novel_fraction < 0.10
    assert det.n_noise == det.n_novel > 0


def test_thinly_sampled_known_classes_are_not_isolated() -> None:
    """200 classes, 25 references each on average: fringe images of a known class can be
    each other's neighbours, but each is nearer to a reference of its class than to the
    others, so they stay noise. (Linking on the threshold alone made 4 clusters here.)"""
    from vector_bench import clustered_vectors

    ref, centres = clustered_vectors(5000, 192, n_clusters=200, spread=1.0, seed=1)
    new, _ = clustered_vectors(10000, 192, centres=centres, spread=1.0, seed=2)
    det = detect_drift(ref, new, k=10, percentile=5, min_cluster_size=5)
    assert det.n_novel > 400 and det.n_isolated == 0


def test_scattered_outliers_are_noise_not_a_cluster() -> None:
    cat = Catalogue(4)
    ref, _ = cat.known(800)
    same, _ = cat.known(100)
    outliers = cat.scattered(40)
    det = detect_drift(ref, np.vstack([same, outliers]), k=10, percentile=5,
                       min_cluster_size=5)
    out_density = knn_density(ref, outliers, 10)[0]
    assert (out_density < det.threshold).all()  # every outlier is novel...
    assert det.n_novel >= 40
    assert det.n_isolated == 0 and det.n_noise == det.n_novel  # ...yet none is a vehicle


def test_min_cluster_size_separates_a_group_from_noise() -> None:
    cat = Catalogue(5)
    ref, _ = cat.known(600)
    same, _ = cat.known(50)
    new = np.vstack([same, cat.new_vehicle(4)])
    assert detect_drift(ref, new, min_cluster_size=5).n_isolated == 0
    det = detect_drift(ref, new, min_cluster_size=4)
    assert det.n_isolated == 1 and det.clusters[0].size == 4


def test_detection_rejects_unusable_input() -> None:
    cat = Catalogue(6)
    ref, _ = cat.known(10)
    with pytest.raises(ValueError, match="two reference"):
        detect_drift(ref[:1], ref)
    with pytest.raises(ValueError, match="L2-normalised"):
        detect_drift(ref * 2, ref)
    with pytest.raises(ValueError, match="dimension"):
        detect_drift(ref, _unit(np.ones((3, DIM + 1))))
    det = detect_drift(ref, np.empty((0, DIM), np.float32), k=50)
    assert det.k == 9 and det.n_new == 0 and det.n_isolated == 0


# --- settings -------------------------------------------------------------------------------


def test_drift_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("CARSEARCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CARSEARCH_DRIFT__K", "7")
    monkeypatch.setenv("CARSEARCH_DRIFT__RETRAIN_COMMAND", "make retrain")
    s = load_settings()
    assert (s.drift.k, s.drift.retrain_command, s.drift.min_cluster_size) == (7, "make retrain", 5)
    for var, value in [("CARSEARCH_DRIFT__PERCENTILE", "80"),
                       ("CARSEARCH_DRIFT__RETRAIN_COMMAND", 'train "unclosed')]:
        monkeypatch.setenv(var, value)
        with pytest.raises(SettingsError) as err:
            load_settings()
        assert var in str(err.value) and "\n" not in str(err.value)
        monkeypatch.delenv(var)


# --- the job against Milvus Lite and SQLite / PostgreSQL --------------------------------------


# World, _settings, the `marker` and `world` fixtures: tests/fixtures/drift_world.py


def _row(db: Database, report_id: int | None) -> DriftReport:
    with db.session() as s:
        row = s.get(DriftReport, report_id)
        assert row is not None
        return row


def test_isolated_cluster_triggers_retraining_once_per_cooldown(world: World,
                                                                marker: Path) -> None:
    cat = Catalogue(7)
    now = datetime.now(UTC)
    ref, labels = cat.known(400)
    ref_ids = world.add(ref, now - timedelta(days=3), labels)
    same, same_labels = cat.known(60)
    world.add(same, now - timedelta(hours=2), same_labels)
    planted = cat.new_vehicle(12)
    planted_ids = world.add(planted, now - timedelta(hours=1))

    run = run_drift(world.platform, since=now - timedelta(days=1), retrain_wait_s=60)
    assert run.status == "checked" and run.n_new == 72 and run.n_reference == 400
    assert run.n_isolated == 1 and run.retrain_triggered
    (cluster,) = run.detection.clusters  # type: ignore[union-attr]
    assert cluster.size == 12 and set(cluster.member_ids) <= set(planted_ids)
    nearest = int(np.argmax(ref @ _unit(planted.mean(axis=0))))
    assert cluster.nearest_reference_id == ref_ids[nearest]
    assert cluster.nearest_make == f"Make{labels[nearest]}"
    assert cluster.nearest_class_name == f"Make{labels[nearest]} Coupe 2012"

    row = _row(world.db, run.report_id)
    assert (row.n_images, row.n_isolated, row.retrain_triggered) == (72, 1, True)
    retrain = row.report["retrain"]
    assert retrain["started"] and retrain["exit_code"] == 0 and retrain["pid"] > 0
    assert marker.read_text().split() == [str(run.report_id)]
    assert row.report["detection"]["clusters"][0]["member_ids"] == cluster.member_ids
    shown = latest_drift(world.db)
    assert shown is not None and shown["id"] == run.report_id and shown["n_isolated"] == 1

    again = run_drift(world.platform, since=now - timedelta(days=1), retrain_wait_s=60)
    assert again.retrain_triggered and not again.retrain["started"]
    assert again.retrain["state"].startswith(f"cooldown: started by report {run.report_id}")
    assert _row(world.db, again.report_id).report["retrain"]["started"] is False
    assert marker.read_text().split() == [str(run.report_id)]

    world.platform.settings.drift.retrain_cooldown_h = 0.0  # no cooldown: it runs again
    third = run_drift(world.platform, since=now - timedelta(days=1), retrain_wait_s=60)
    assert third.retrain["exit_code"] == 0
    assert marker.read_text().split() == [str(run.report_id), str(third.report_id)]


def test_two_drift_runs_at_once_start_one_retrain(world: World, marker: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Run A finds the planted vehicle and has checked the cooldown (nothing started yet)
    when run B starts: B must not start a second retrain for the same drift event."""
    import threading

    from carsearch.platform.db import reports

    cat = Catalogue(11)
    now = datetime.now(UTC)
    ref, labels = cat.known(300)
    world.add(ref, now - timedelta(days=3), labels)
    same, same_labels = cat.known(40)
    world.add(same, now - timedelta(hours=2), same_labels)
    world.add(cat.new_vehicle(12), now - timedelta(hours=1))
    checked, go_on = threading.Event(), threading.Event()
    real = reports.last_retrain_start

    def pause_in_a(*args: object, **kwargs: object) -> object:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        if threading.current_thread().name == "drift-a":
            checked.set()
            assert go_on.wait(60)
        return out

    monkeypatch.setattr(reports, "last_retrain_start", pause_in_a)
    runs: dict[str, object] = {}

    def run_a() -> None:
        try:
            runs["a"] = run_drift(world.platform, since=now - timedelta(days=1),
                                  retrain_wait_s=60)
        finally:
            checked.set()  # never leave the test waiting

    a = threading.Thread(target=run_a, name="drift-a")
    a.start()
    assert checked.wait(60) and "a" not in runs  # A is paused after its cooldown check
    runs["b"] = run_drift(world.platform, since=now - timedelta(days=1), retrain_wait_s=60)
    go_on.set()
    a.join(60)
    ra, rb = runs["a"], runs["b"]
    assert ra.retrain["started"]  # type: ignore[attr-defined]
    assert rb.status == "skipped" and not rb.retrain  # type: ignore[attr-defined]
    assert marker.read_text().split() == [str(ra.report_id)]  # type: ignore[attr-defined]
    with world.db.session() as s:
        assert s.query(DriftReport).count() == 1


def test_default_window_follows_the_reports(world: World, marker: Path) -> None:
    cat = Catalogue(8)
    ref, labels = cat.known(300)
    world.add(ref, datetime.now(UTC) - timedelta(days=2), labels)

    first = run_drift(world.platform)
    assert first.status == "baseline" and first.since is None
    assert first.n_reference_available == 300
    row = _row(world.db, first.report_id)
    assert (row.n_images, row.retrain_triggered) == (0, False)

    few, few_labels = cat.known(5)
    world.add(few, datetime.now(UTC), few_labels)
    second = run_drift(world.platform)
    assert second.status == "too_few_new" and second.n_new_in_window == 5
    assert second.since == first.until and not second.advances
    assert "minimum 20" in _row(world.db, second.report_id).report["message"]

    more, more_labels = cat.known(40)
    world.add(more, datetime.now(UTC), more_labels)
    missing, _ = cat.known(3)
    world.add(missing, datetime.now(UTC), vector=False)  # rows whose vectors never landed
    third = run_drift(world.platform)
    assert third.status == "checked" and third.since == first.until  # the window stayed open
    assert (third.n_new_in_window, third.n_new, third.n_new_missing) == (48, 45, 3)
    assert third.n_isolated == 0 and not third.retrain_triggered
    assert third.retrain["state"] == "not needed" and not marker.exists()

    fourth = run_drift(world.platform)
    assert fourth.since == third.until and fourth.n_new_in_window == 0


def test_no_reference_and_no_serving_version_are_reported(world: World) -> None:
    cat = Catalogue(9)
    now = datetime.now(UTC)
    new, labels = cat.known(30)
    world.add(new, now - timedelta(hours=1), labels)
    run = run_drift(world.platform, since=now - timedelta(days=1))
    assert run.status == "too_few_reference" and run.n_reference == 0 and run.n_new == 30
    row = _row(world.db, run.report_id)
    assert row.n_isolated == 0 and not row.retrain_triggered
    assert "reference" in row.report["message"]
    with world.db.session() as s:
        s.get(ModelVersion, 1).status = VersionStatus.retired  # type: ignore[union-attr]
    with pytest.raises(ModelNotFoundError):
        run_drift(world.platform, since=now - timedelta(days=1))


def test_vectors_by_id(milvus_uri: str) -> None:
    store = MilvusStore(milvus_uri, index=IndexSpec("FLAT"))
    try:
        vectors = Catalogue(10).scattered(2500)
        ids = [(1 << 62) + 7 * i for i in range(2500)]
        store.ensure_collection("c", DIM)
        store.upsert("c", ids, vectors, [VectorRow()] * len(ids))
        ask = [ids[2400], 12345, ids[3], ids[3], *ids[1000:2200]]
        found, mat = store.vectors("c", ask)
        assert found.tolist() == [ids[2400], ids[3], *ids[1000:2200]]
        np.testing.assert_allclose(mat[0], vectors[2400], atol=1e-6)
        np.testing.assert_allclose(mat[2:], vectors[1000:2200], atol=1e-6)
        empty_ids, empty = store.vectors("c", [])
        assert empty_ids.shape == (0,) and empty.shape == (0, DIM)
    finally:
        store.close()


# --- `carsearch drift run` ------------------------------------------------------------------


def test_cli_json_and_one_line_errors(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    migrate.upgrade(settings.database_url)
    w = World(settings)
    cat = Catalogue(11)
    now = datetime.now(UTC)
    ref, labels = cat.known(300)
    w.add(ref, now - timedelta(days=3), labels)
    same, same_labels = cat.known(30)
    w.add(same, now - timedelta(hours=1), same_labels)
    planted_ids = w.add(cat.new_vehicle(10), now - timedelta(hours=1))
    w.platform.close()  # one process at a time on a Milvus Lite file

    env = {k: v for k, v in os.environ.items() if not k.startswith("CARSEARCH_")}
    env.update(CARSEARCH_DATA_DIR=str(tmp_path / "data"), CARSEARCH_LOG_LEVEL="WARNING",
               CARSEARCH_DRIFT__MIN_NEW="20", OMP_NUM_THREADS="1")
    since = (now - timedelta(days=1)).isoformat()
    p = subprocess.run([*CLI, "drift", "run", "--since", since, "--json"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["status"] == "checked" and out["n_new"] == 40 and out["n_isolated"] == 1
    assert out["retrain_triggered"] and out["retrain"]["state"].startswith("not configured")
    assert set(out["detection"]["clusters"][0]["member_ids"]) <= set(planted_ids)
    assert "retraining triggered" in p.stderr  # the warning, logged

    db = Database(settings.database_url)
    try:
        row = _row(db, out["report_id"])
        assert (row.n_images, row.n_isolated, row.retrain_triggered) == (40, 1, True)
    finally:
        db.dispose()

    bad = subprocess.run([*CLI, "drift", "run", "--since", "yesterday"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "--since" in errors[0] and "Traceback" not in bad.stderr


def test_drift_is_a_registered_verb() -> None:
    from carsearch.cli import app, monitor

    assert any(g.name == "drift" and g.typer_instance is monitor.drift_app
               for g in app.registered_groups)
    assert [c.name for c in monitor.drift_app.registered_commands] == ["run"]
