"""ANN audit on real Milvus Lite files, a real Milvus server and FAISS: recall by hand, end
to end, recorded rows, the exact index built from Milvus, and `carsearch evaluate ann`
through the CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from carsearch.cli.monitor import ann_command
from carsearch.monitoring.ann_audit import (
    audit,
    class_queries,
    exact_dir,
    exact_from_arrays,
    exact_from_milvus,
    logged_queries,
    record_report,
    sync_exact_index,
)
from carsearch.platform.artifacts import ArtifactLedger
from carsearch.platform.db import Database, ModelVersion, QueryLog
from carsearch.platform.db.reports import latest_ann_report
from carsearch.platform.scheduler import run_every
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.exact import ExactIndex
from carsearch.platform.vectors.milvus import IndexSpec, MilvusStore
from carsearch.platform.vectors.protocol import VectorRow
from vector_bench import clustered_vectors


def _fill(store: MilvusStore, name: str, ids: list[int], vectors: np.ndarray) -> None:
    store.ensure_collection(name, vectors.shape[1])
    store.upsert(name, ids, vectors, [VectorRow(source="test")] * len(ids))
    store.flush(name)
    # A server builds a flushed segment's index in the background and answers from an
    # interim IVF index until then (recall below the real index's): wait for the real
    # one, then reload, so every query sees the index the test configured.
    store.wait_for_index(name, len(ids))
    store.client.release_collection(name)
    store.client.load_collection(name)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def store(milvus_uri: str):
    s = MilvusStore(milvus_uri, index=IndexSpec("FLAT"))
    yield s
    s.close()


def test_recall_of_a_hand_made_case(store: MilvusStore) -> None:
    # Milvus holds e4 under id 40, the exact index under id 4: everything else agrees.
    basis = np.eye(4, dtype=np.float32)
    _fill(store, "hand", [1, 2, 3, 40], basis)
    exact = ExactIndex.from_arrays(np.array([1, 2, 3, 4]), basis)
    queries = _unit(np.array([[3, 2, 1, 0], [0, 1, 2, 3]], dtype=np.float32))
    # exact orders: q0 → 1,2,3,4; q1 → 4,3,2,1.
    # recall@1: q0 {1}={1} → 1, q1 {40} vs {4} → 0                 → 0.5
    # recall@2: q0 {1,2} → 1, q1 {40,3} vs {4,3} → 1/2              → 0.75
    # recall@4: q0 {1,2,3,40} vs {1,2,3,4} → 3/4, q1 the same → 3/4 → 0.75
    rep = audit(store, "hand", queries, exact, ks=(1, 2, 4))
    assert rep.recall == pytest.approx({1: 0.5, 2: 0.75, 4: 0.75})
    assert rep.score_agreement == pytest.approx(0.0, abs=1e-6)
    assert (rep.n_queries, rep.n_vectors, rep.k, rep.index_type) == (2, 4, 4, "FLAT")
    assert rep.milvus_p50_ms > 0 and rep.exact_p50_ms > 0


def test_flat_gives_full_recall(store: MilvusStore) -> None:
    vectors, centres = clustered_vectors(600, 16, n_clusters=20, seed=1)
    ids = list(range(10, 610))
    _fill(store, "flat", ids, vectors)
    queries, _ = clustered_vectors(15, 16, centres=centres, seed=2)
    exact = exact_from_arrays(np.array(ids), vectors, model_version="v1")
    rep = audit(store, "flat", queries, exact, ks=(1, 10, 100))
    assert rep.recall == pytest.approx({1: 1.0, 10: 1.0, 100: 1.0})
    assert rep.score_agreement < 1e-4
    assert rep.model_version == "v1"


def test_ivf_recall_matches_a_direct_set_comparison(milvus_uri: str) -> None:
    store = MilvusStore(milvus_uri, index=IndexSpec("IVF_FLAT", {"nlist": 64}, {"nprobe": 1}))
    try:
        vectors, centres = clustered_vectors(3000, 16, n_clusters=100, spread=1.2, seed=3)
        ids = list(range(3000))
        _fill(store, "ivf", ids, vectors)
        queries, _ = clustered_vectors(40, 16, centres=centres, spread=1.2, seed=4)
        exact = ExactIndex.from_arrays(np.array(ids), vectors)
        rep = audit(store, "ivf", queries, exact, ks=(10,))
        ann = [{h.id for h in hits} for hits in store.search("ivf", queries, 10)]
        _, exact_ids = exact.search(queries, 10)
        pairs = zip(ann, exact_ids, strict=True)
        direct = np.mean([len(a & set(e.tolist())) / 10 for a, e in pairs])
        assert rep.recall[10] == pytest.approx(direct)
        assert 0.0 < rep.recall[10] <= 1.0
        assert rep.index_type == "IVF_FLAT"
        assert rep.params["search"] == {"nprobe": 1}
        # Searching all lists is exhaustive: recall 1, through the index= override.
        wide = audit(store, "ivf", queries, exact, ks=(10,),
                     index=IndexSpec("IVF_FLAT", {"nlist": 64}, {"nprobe": 64}))
        assert wide.recall[10] == pytest.approx(1.0)
        assert store.index.search_params == {"nprobe": 1}  # the store's spec is restored
    finally:
        store.close()


def test_report_row_is_written_and_read_back(store: MilvusStore, database: Database) -> None:
    assert latest_ann_report(database) is None
    vectors, _ = clustered_vectors(50, 8, n_clusters=5, seed=5)
    _fill(store, "rows", list(range(50)), vectors)
    exact = ExactIndex.from_arrays(np.arange(50), vectors)
    first = audit(store, "rows", vectors[:5], exact, ks=(1, 10))
    second = audit(store, "rows", vectors[5:12], exact, ks=(1, 10))
    id1 = record_report(database, first, None)
    id2 = record_report(database, second, None)
    assert id2 > id1 == first.report_id
    latest = latest_ann_report(database)
    assert latest is not None
    assert latest["id"] == id2
    assert latest["n_queries"] == 7 and latest["n_vectors"] == 50
    assert latest["recall_at_10"] == pytest.approx(1.0)
    assert latest["report"]["recall"]["recall@1"] == pytest.approx(1.0)
    assert latest["index_type"] == "FLAT"


def test_exact_index_from_milvus_is_saved_and_kept_in_sync(
    store: MilvusStore, database: Database, tmp_path: Path
) -> None:
    vectors, _ = clustered_vectors(120, 8, n_clusters=6, seed=6)
    ids = list(range(1000, 1120))
    _fill(store, "sync", ids, vectors)
    exact = exact_from_milvus(store, "sync", model_version="v1")
    assert sorted(exact.ids().tolist()) == ids
    scores, found = exact.search(vectors[:3], 1)
    assert found[:, 0].tolist() == ids[:3]
    assert scores[:, 0] == pytest.approx(1.0, abs=1e-5)

    version = ModelVersion(name="v1", collection="sync")
    ledger = ArtifactLedger(database)
    first = sync_exact_index(store, version, tmp_path, ledger=ledger)
    assert (exact_dir(tmp_path, "v1") / "index.faiss").is_file()
    assert len(first) == 120
    more, _ = clustered_vectors(1, 8, n_clusters=6, seed=7)
    store.upsert("sync", [5000], more, [VectorRow()])
    store.flush("sync")
    again = sync_exact_index(store, version, tmp_path, ledger=ledger)  # stale: rebuilt
    assert len(again) == 121 and 5000 in again.ids().tolist()
    assert len(ExactIndex.load(exact_dir(tmp_path, "v1"), ledger=ledger)) == 121


def test_a_tampered_exact_index_is_refused_kept_aside_and_rebuilt(
    store: MilvusStore, database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone who can write the data directory replaces the saved index with one whose
    vectors they chose and rewrites index.json to match: the audit refuses it (the file
    named in the log), keeps it aside, and measures against the vectors Milvus holds."""
    vectors, _ = clustered_vectors(40, 8, n_clusters=4, seed=8)
    ids = list(range(1, 41))
    _fill(store, "tamper", ids, vectors)
    version = ModelVersion(name="v1", collection="tamper")
    ledger = ArtifactLedger(database)
    sync_exact_index(store, version, tmp_path, ledger=ledger)
    directory = exact_dir(tmp_path, "v1")
    forged = vectors.copy()
    forged[:, :] = forged[::-1]  # every id now holds another image's vector
    ExactIndex.from_arrays(np.asarray(ids), forged, model_version="v1").save(directory)

    with caplog.at_level("ERROR", logger="carsearch.monitoring.ann_audit"):
        exact = sync_exact_index(store, version, tmp_path, ledger=ledger)
    assert str(directory / "index.faiss") in caplog.text and "refused" in caplog.text
    found = exact.search(_unit(vectors[:5]), 1)[1][:, 0]
    assert found.tolist() == ids[:5]  # the truth, from Milvus
    aside = [p for p in tmp_path.joinpath("exact").iterdir() if ".tampered-" in p.name]
    assert len(aside) == 1 and (aside[0] / "index.faiss").is_file()
    assert len(ExactIndex.load(directory, ledger=ledger)) == 40  # the rebuilt one is recorded


def test_query_sets_come_from_the_database(database: Database) -> None:
    with database.session() as s:
        for i, q in enumerate(["red pickup", "bmw coupe", "red pickup", "old jeep"]):
            s.add(QueryLog(kind="text", query=q, k=10, latency_ms=1.0 + i))
        s.add(QueryLog(kind="image", query=None, k=10, latency_ms=1.0))
    assert sorted(logged_queries(database)) == ["bmw coupe", "old jeep", "red pickup"]
    assert len(logged_queries(database, 2, seed=1)) == 2
    assert class_queries(database) == []


def test_run_every_repeats_and_stops() -> None:
    calls: list[int] = []
    assert run_every(lambda: calls.append(1), 0.01, max_runs=3) == 3
    assert len(calls) == 3
    stop = threading.Event()

    def job() -> None:
        calls.append(1)
        stop.set()

    assert run_every(job, 60, stop=stop) == 1


# --- `carsearch evaluate ann` end to end -------------------------------------------------------

LABELS = ["Chevrolet Silverado 1500 Regular Cab 2012", "BMW M3 Coupe 2012",
          "Jeep Wrangler SUV 2012", "Ford F-150 Regular Cab 2007"]


def _draw(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (64, 48), tuple(int(c) for c in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(img)
    x, y = (int(v) for v in rng.integers(0, 30, 2))
    d.rectangle([x, y, x + 25, y + 15], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    img.save(path)


def test_evaluate_ann_cli(tmp_path: Path, compact_model: Path, milvus_uri: str) -> None:
    from carsearch.ingest.pipeline import BatchWriter, ingest_items, read_manifest
    from carsearch.platform.db import migrate
    from carsearch.platform.runtime import Platform

    settings = Settings(data_dir=tmp_path / "data", milvus_uri=milvus_uri)
    migrate.upgrade(settings.database_url)
    platform = Platform(settings)
    version = platform.registry.publish(compact_model, name="base")
    platform.registry.promote("base")
    lines = []
    for i in range(8):
        _draw(tmp_path / f"car{i}.png", i)
        lines.append(json.dumps({"path": f"car{i}.png", "class_name": LABELS[i % 4]}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    writer = BatchWriter.fixed(platform.db, platform.store,
                               platform.search.encoder_for(version), version)
    ingest_items(list(read_manifest(tmp_path / "manifest.jsonl")), db=platform.db,
                 writer=writer, max_pixels=10**7, batch_size=4, progress=False)
    platform.store.flush(version.collection)

    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = settings

    app.command("ann")(ann_command)
    runner = CliRunner()
    res = runner.invoke(app, ["ann", "--json", "--k", "5"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n_queries"] == 4 and out["n_vectors"] == 8
    assert out["recall"] == pytest.approx({"recall@1": 1.0, "recall@5": 1.0})
    assert out["model_version"] == "base" and out["query_source"] == "classes"
    latest = latest_ann_report(platform.db)
    assert latest is not None and latest["id"] == out["report_id"]
    assert latest["model_version"] == "base"
    assert (exact_dir(settings.data_dir, "base") / "index.faiss").is_file()

    res = runner.invoke(app, ["ann", "--queries", "logged"])
    assert res.exit_code != 0
    assert "no logged text queries" in str(res.exception)
    platform.close()
