"""The vector benchmark at tiny sizes: real Milvus Lite and FAISS, structure not timings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import vector_bench as vb


def test_clustered_vectors_are_unit_and_clustered() -> None:
    x, centres = vb.clustered_vectors(400, 32, n_clusters=4, seed=0)
    assert x.shape == (400, 32) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # every point is far closer to its best centre than to a random direction
    assert (x @ centres.T).max(axis=1).min() > 0.5
    q, _ = vb.clustered_vectors(5, 32, centres=centres, seed=1)
    assert q.shape == (5, 32)


def test_lite_index_params_carry_both_forms() -> None:
    assert vb.lite_index_params({}) == {}
    assert vb.lite_index_params({"nlist": 8}) == {"nlist": 8, "params": {"nlist": 8}}


def test_bench_runs_at_tiny_size(tmp_path: Path) -> None:
    configs = [
        vb.MilvusConfig("FLAT"),
        vb.MilvusConfig("IVF_FLAT", {"nlist": 8}, ({"nprobe": 1}, {"nprobe": 8})),
        vb.MilvusConfig("HNSW", {"M": 8, "efConstruction": 40}, ({"ef": 16},)),
    ]
    rep = vb.run_vector_bench(600, 16, configs=configs, n_queries=12, batch_size=5,
                              n_clusters=10, unflushed_queries=1, workdir=tmp_path,
                              progress=False)
    assert [r.system for r in rep.results] == ["FAISS"] + ["Milvus Lite"] * 4
    assert [r.config for r in rep.results][1:] == [
        "FLAT", "IVF_FLAT (nlist=8, nprobe=1)", "IVF_FLAT (nlist=8, nprobe=8)",
        "HNSW (M=8, efConstruction=40, ef=16)"]
    by_config = {r.config: r for r in rep.results}
    assert by_config["FLAT"].recall_at_10 == pytest.approx(1.0)
    assert by_config["IVF_FLAT (nlist=8, nprobe=8)"].recall_at_10 == pytest.approx(1.0)
    assert all(0.0 <= r.recall_at_10 <= 1.0 for r in rep.results)
    assert all(r.p50_ms > 0 and r.p95_ms >= r.p50_ms for r in rep.results)
    assert rep.insert_s > 0 and rep.unflushed_p50_ms > 0 and rep.rss_loaded_mb > 0
    assert rep.machine["cores"] >= 1 and rep.machine["date"]
    best = rep.best()
    assert best is not None and best.recall_at_10 >= 0.99
    md = vb.to_markdown(rep)
    assert "| FAISS | IndexFlatIP (exact) |" in md and rep.machine["cpu"] in md
    assert md.count("\n| Milvus Lite |") == 4
    json.dumps(rep.to_dict())  # JSON-ready
    assert not list(tmp_path.iterdir())  # the temporary Milvus file is gone


def test_thread_bench_structure() -> None:
    res = vb.thread_bench(n=2000, dim=16, thread_counts=(1, 2), repeats=2)
    assert {(r.library, r.threads) for r in res} == {
        ("FAISS", 1), ("FAISS", 2), ("torch", 1), ("torch", 2)}
    assert all(r.p50_ms > 0 for r in res)
    md = vb.thread_markdown(res, vb.machine_info())
    assert md.count("\n| FAISS |") == 2 and "speed-up 2 vs 1" in md


def test_vector_bench_report_is_json(tmp_path: Path) -> None:
    """What bench/bench_vectors.py writes with --json (the `carsearch bench` verb is gone:
    benchmark code lives under bench/ only)."""
    report = vb.run_vector_bench(300, 8, n_queries=10, n_clusters=5, workdir=str(tmp_path))
    out = json.loads(json.dumps(report.to_dict()))
    assert out["n"] == 300 and out["dim"] == 8
    assert out["results"][0]["system"] == "FAISS"
    assert {r["config"].split()[0] for r in out["results"][1:]} == {"FLAT", "IVF_FLAT", "HNSW"}
