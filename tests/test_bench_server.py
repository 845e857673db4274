"""bench/bench_server.py at a tiny size on the real Milvus server: structure, not timings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from carsearch.platform.vectors.milvus import MilvusStore
from carsearch.platform.vectors.server import LocalMilvusServer
from fixtures.common import REPO, empty_server


def load_bench() -> ModuleType:
    """bench/ is scripts, not a package: load bench_server.py as a module."""
    if "bench_server" in sys.modules:
        return sys.modules["bench_server"]
    spec = importlib.util.spec_from_file_location("bench_server",
                                                  REPO / "bench" / "bench_server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_server"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.milvus_server
def test_server_bench_at_tiny_size(milvus_server: LocalMilvusServer, tmp_path: Path) -> None:
    empty_server(milvus_server.uri)
    bs = load_bench()
    report = bs.run_server_bench(
        2000, 16, server_uri=milvus_server.uri, ef_values=(16, 64), n_queries=12,
        lite_queries=6, n_clusters=20, batch=500, workdir=tmp_path, progress=False,
    )
    assert [(r.system, r.queries) for r in report.searches] == [
        ("FAISS exact", 12), ("search mirror", 12), ("Milvus server", 12),
        ("Milvus server", 12), ("Milvus Lite", 6),
    ]
    assert [r.config for r in report.result("Milvus server")] == [
        "HNSW (M=16, efConstruction=200, ef=16)", "HNSW (M=16, efConstruction=200, ef=64)",
    ]
    for r in report.searches:
        assert 0.0 <= r.recall_at_10 <= 1.0
        assert 0.0 < r.p50_ms <= r.p95_ms
    assert report.result("FAISS exact")[0].recall_at_10 == 1.0
    assert report.result("search mirror")[0].recall_at_10 == 1.0  # the mirror is exact

    loads = {r.system: r for r in report.loads}
    assert set(loads) == {"FAISS exact", "search mirror", "Milvus server", "Milvus Lite"}
    assert all(r.vectors == 2000 and r.insert_s > 0 and r.per_s > 0 for r in loads.values())
    assert loads["FAISS exact"].settle is None and loads["search mirror"].settle is None
    for name in ("Milvus server", "Milvus Lite"):
        settle = loads[name].settle
        assert loads[name].batch == 500 and settle is not None
        assert min(settle.flush_s, settle.index_s, settle.load_s) >= 0 and settle.total_s > 0

    md = bs.to_markdown(report)
    assert "| Milvus server | HNSW (M=16, efConstruction=200, ef=64) | 12 |" in md
    assert "OMP_NUM_THREADS=1" in md and "FAISS 1 (set_threads(1))" in md
    assert "first 6 queries" in md
    raw = json.loads(json.dumps(report.to_dict()))
    assert raw["n"] == 2000 and len(raw["searches"]) == 5 and raw["loads"][2]["vectors_per_s"]
    assert raw["loads"][2]["settle"]["total_s"] > 0 and raw["loads"][0]["settle"] is None

    store = MilvusStore(milvus_server.uri)  # the benchmark leaves no collection behind
    try:
        assert bs.COLLECTION not in store.list_collections()
    finally:
        store.close()
