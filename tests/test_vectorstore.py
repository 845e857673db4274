"""The Milvus adapter on real Milvus Lite files and a real Milvus server: what only Milvus
has (a short filtered answer made exact, reopening a file, aliases on Milvus's own search,
index parameters, scalar indexes, two processes creating one collection) and the filter
model's validation. What every VectorStore must do alike (upsert, delete, ids, counts,
scans, search order and filters against brute force, quoted values, bad vectors, drop)
is tests/test_store_contract.py, run on Lite, the server, the mirror and the memory store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from carsearch.platform.vectors.filters import SearchFilters, build_filter_expression
from carsearch.platform.vectors.milvus import IndexSpec, MilvusStore
from carsearch.platform.vectors.protocol import SERVING_ALIAS, VectorRow, VectorStoreError

DIM = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


MAKES = ["Chevrolet", "Ford", "BMW", "Mercedes-Benz"]
BODIES = ["pickup", "sedan", "suv", "coupe"]


@pytest.fixture
def store(milvus_uri: str):
    s = MilvusStore(milvus_uri)
    yield s
    s.close()


@pytest.fixture
def filled(store: MilvusStore):
    rng = np.random.default_rng(1)
    n = 120
    ids = (np.arange(n) * 7919 + 10**12).tolist()
    vecs = unit(rng, n)
    rows = [
        VectorRow(make=MAKES[i % 4], body=BODIES[(i // 4) % 4], colour="red" if i % 3 else "blue",
                  source="test", year=1995 + i % 20)
        for i in range(n)
    ]
    store.ensure_collection("c1", DIM)
    assert store.upsert("c1", ids, vecs, rows) == n
    store.flush("c1")
    return ids, vecs, rows


def test_a_filtered_search_finds_every_match_exactly(milvus_uri: str) -> None:
    # 10,000 clustered rows in 192-d (the search benchmark's shape), 2 % of them Porsches.
    # On Milvus Lite 3.2.2, after the search mirror had been rebuilt from it (full scans on
    # the mirror's thread), its HNSW search with this filter returned 7-9 of the 12 hits
    # asked for although about 200 rows match; the store answers a short search again
    # exactly.
    from carsearch.platform.vectors.mirror import MirroredStore

    store = MirroredStore(milvus_uri)
    try:
        rng = np.random.default_rng(0)
        n, dim = 10_000, 192
        vecs = np.empty((n, dim), dtype=np.float32)
        for a in range(0, n, 5000):  # each batch its own 25 tight clusters
            centres = rng.normal(size=(25, dim)).astype(np.float32)
            part = centres[rng.integers(0, 25, 5000)] + 0.35 * rng.normal(size=(5000, dim))
            vecs[a:a + 5000] = part / np.linalg.norm(part, axis=1, keepdims=True)
        porsches = set(rng.choice(n, 200, replace=False).tolist())
        rows = [VectorRow(make="Porsche" if i in porsches else MAKES[i % 4], source="test",
                          year=2000) for i in range(n)]
        store.ensure_collection("sel", dim)
        for a in range(0, n, 5000):
            store.upsert("sel", list(range(a, a + 5000)), vecs[a:a + 5000], rows[a:a + 5000])
        store.flush("sel")
        for _ in range(3):
            store.forget("sel")
            store.warm("sel")
        store.forget("sel")
        store.auto_build = False  # from here on, Milvus's own search answers
        q = rng.normal(size=(16, dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        order = sorted(porsches)
        got = store.search("sel", q, 12, SearchFilters(make="Porsche"))
        for row, hits in zip(q, got, strict=True):
            scores = vecs[order] @ row
            want = [order[j] for j in np.argsort(-scores)[:12]]
            assert len(hits) == 12 and all(h.fields["make"] == "Porsche" for h in hits)
            if not store.is_lite:  # a server's filtered HNSW: near the exact top 12
                assert len({h.id for h in hits} & set(want)) >= 10
        if store.is_lite:
            # Force the short answer Lite gave (it comes and goes with thread timing): the
            # store answers again, exactly.
            real = store.search_ann
            store.search_ann = lambda *a, **kw: [h[:8] for h in real(*a, **kw)]  # type: ignore[method-assign]
            got = store.search("sel", q, 12, SearchFilters(make="Porsche"))
            store.search_ann = real  # type: ignore[method-assign]
            for row, hits in zip(q, got, strict=True):
                scores = vecs[order] @ row
                assert [h.id for h in hits] == [order[j] for j in np.argsort(-scores)[:12]]
                assert [h.score for h in hits] == pytest.approx(
                    sorted(scores, reverse=True)[:12], abs=1e-4)
        # Fewer matches than k: all of them, none invented; no match: nothing.
        assert [len(h) for h in store.search("sel", q[:2], 300,
                                             SearchFilters(make="Porsche"))] == [200, 200]
        assert store.search("sel", q[:2], 5, SearchFilters(make="Porsche", year_max=1999)) == [
            [], []]
    finally:
        store.close()


def test_collection_survives_reopening(tmp_path: Path, filled, store: MilvusStore) -> None:
    ids, vecs, _ = filled
    store.close()
    again = MilvusStore(store.uri)
    assert again.count("c1") == len(ids)
    assert again.search("c1", vecs[:1], 1)[0][0].id == ids[0]
    again.close()


def test_filter_values_are_validated_and_quoted() -> None:
    for bad in ['Ford" or id > 0 or make == "', "x) or (1==1", "", "a\\b", "ford\nor 1"]:
        with pytest.raises(ValidationError):
            SearchFilters(make=bad)
    with pytest.raises(ValidationError):
        SearchFilters(year_min=2012, year_max=2001)
    with pytest.raises(ValidationError):
        SearchFilters(make="Ford", unknown_field=1)  # type: ignore[call-arg]
    expr = build_filter_expression(
        SearchFilters(make=["Mercedes-Benz", "Land Rover"], colour="grey", year_min=2001)
    )
    assert expr == 'make in ["Mercedes-Benz", "Land Rover"] and colour in ["grey"] and year >= 2001'
    assert build_filter_expression(SearchFilters()) == ""
    assert build_filter_expression(None) == ""


def test_index_build_parameters_reach_milvus_lite(tmp_path: Path) -> None:
    # pymilvus flattens build parameters, which Lite ignores; the store sends both forms.
    s = MilvusStore(str(tmp_path / "ix.db"), index=IndexSpec("IVF_FLAT", {"nlist": 8}))
    s.ensure_collection("c", DIM)
    desc = s.client.describe_index("c", "vector")
    assert desc["index_type"] == "IVF_FLAT" and desc["params"].get("nlist") == 8
    s.close()
    default = MilvusStore(str(tmp_path / "d.db"))
    default.ensure_collection("c", DIM)
    params = default.client.describe_index("c", "vector")["params"]
    assert params == {"M": 16, "efConstruction": 100}  # LITE_EF_CONSTRUCTION
    default.close()


def test_serving_alias_switches_and_survives_a_drop(store: MilvusStore) -> None:
    rng = np.random.default_rng(5)
    for name, pk in (("va", 1), ("vb", 2)):
        store.ensure_collection(name, DIM)
        store.upsert(name, [pk], unit(rng, 1), [VectorRow(make=name)])
    assert store.alias_target() is None
    store.point_alias("va")
    assert store.alias_target() == "va"
    q = unit(rng, 1)
    # Strong: Session consistency follows writes by collection name, not by alias.
    assert store.search_ann(SERVING_ALIAS, q, 1, consistency="Strong")[0][0].id == 1
    store.point_alias("vb")  # one atomic switch
    assert store.alias_target() == "vb"
    assert store.search_ann(SERVING_ALIAS, q, 1, consistency="Strong")[0][0].id == 2
    store.drop("vb")  # takes its alias with it, cleanly: the alias can be made again
    assert store.alias_target() is None
    store.point_alias("va")
    assert store.alias_target() == "va"


@pytest.mark.milvus_server
def test_server_collections_index_the_filter_fields(milvus_server) -> None:
    from fixtures.common import empty_server

    empty_server(milvus_server.uri)
    store = MilvusStore(milvus_server.uri)
    try:
        store.ensure_collection("c4", DIM)
        kinds = {n: store.client.describe_index("c4", n)["index_type"]
                 for n in store.client.list_indexes("c4")}
        assert kinds == {"vector": "HNSW", "make": "Trie", "body": "Trie", "colour": "Trie",
                         "source": "Trie", "year": "STL_SORT"}
        assert not store.is_lite and store.scalar_index_types() == {
            k: v for k, v in kinds.items() if k != "vector"}
    finally:
        store.close()


def test_an_unreachable_server_is_a_one_line_error() -> None:
    with pytest.raises(VectorStoreError, match="cannot open Milvus"):
        MilvusStore("http://127.0.0.1:9")


@pytest.mark.milvus_server
def test_a_second_process_waits_for_the_creators_indexes(milvus_server) -> None:
    """Two workers start on a new collection: A has created it and not yet registered its
    indexes when B upserts. B must wait for them (a load in between pins the indexes it
    had then, and A's own load and every later one fail: seen in CI). A's create_index is
    held on an event and released only once B is seen waiting."""
    import threading
    import time

    from fixtures.common import empty_server

    empty_server(milvus_server.uri)
    a, b = MilvusStore(milvus_server.uri), MilvusStore(milvus_server.uri)
    release, b_waiting = threading.Event(), threading.Event()
    create_index, list_indexes = a.client.create_index, b.client.list_indexes

    def held_create_index(*args, **kwargs):
        assert release.wait(60)
        return create_index(*args, **kwargs)

    def spied_list_indexes(*args, **kwargs):
        b_waiting.set()
        return list_indexes(*args, **kwargs)

    a.client.create_index = held_create_index
    b.client.list_indexes = spied_list_indexes
    rng = np.random.default_rng(3)
    vecs = unit(rng, 6)
    errors: list[BaseException] = []

    def run(fn) -> None:
        try:
            fn()
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    ta = threading.Thread(target=run, args=(lambda: a.ensure_collection("race", DIM),))
    try:
        ta.start()
        deadline = time.monotonic() + 30
        while not b.has_collection("race"):
            assert time.monotonic() < deadline, "A never created the collection"
            time.sleep(0.01)
        b.ensure_collection("race", DIM)  # exists: B returns and goes on to write
        tb = threading.Thread(target=run, args=(
            lambda: b.upsert("race", [1, 2, 3], vecs[:3], [VectorRow(make="Ford")] * 3),))
        tb.start()
        assert b_waiting.wait(30), "B never asked for the indexes"
        release.set()
        ta.join(90)
        tb.join(90)
        assert not errors, errors
        assert a.upsert("race", [4, 5, 6], vecs[3:], [VectorRow(make="BMW")] * 3) == 3
        a.flush("race")
        assert sorted(b.ids("race")) == [1, 2, 3, 4, 5, 6]
        assert len(a.client.list_indexes("race")) == 1 + len(a.scalar_index_types())
    finally:
        release.set()
        a.close()
        b.close()


@pytest.mark.milvus_server
def test_a_collection_loaded_before_its_last_index_still_takes_writes(milvus_server) -> None:
    """The fallback for a collection some older process loaded before its last index was
    registered: the load's "can't change the index" is taken as loaded, writes work."""
    from fixtures.common import empty_server

    empty_server(milvus_server.uri)
    raw = MilvusStore(milvus_server.uri)
    store = MilvusStore(milvus_server.uri)
    try:
        raw.ensure_collection("early", DIM)
        raw.client.release_collection("early")
        raw.client.drop_index("early", "make")
        raw.client.load_collection("early")  # loaded with 5 of 6 indexes
        params = raw.client.prepare_index_params()
        params.add_index(field_name="make", index_type="Trie")
        raw.client.create_index("early", params)
        vecs = unit(np.random.default_rng(4), 2)
        assert store.upsert("early", [7, 8], vecs, [VectorRow(make="Ford")] * 2) == 2
        store.flush("early")
        assert sorted(store.ids("early")) == [7, 8]
    finally:
        raw.close()
        store.close()


def test_a_search_for_more_hits_than_ef_gets_them_all(milvus_uri: str) -> None:
    """HNSW returns at most ef candidates: asked for every one of 600 rows with the default
    ef 64, Milvus Lite gave 469-503 of them (so a served evaluation's ranking was cut
    short). The store raises ef to k, on Lite and on the server."""
    from carsearch.platform.vectors.milvus import search_params_for

    store = MilvusStore(milvus_uri)
    try:
        assert store.index.type == "HNSW" and store.index.search_params["ef"] < 600
        n = 600
        rng = np.random.default_rng(7)
        vecs = unit(rng, n)
        ids = list(range(1, n + 1))
        store.ensure_collection("many", DIM)
        for start in range(0, n, 50):  # several inserts, as ingest writes them
            store.upsert("many", ids[start:start + 50], vecs[start:start + 50],
                         [VectorRow(make=MAKES[i % 4]) for i in range(start, start + 50)])
        store.flush("many")
        store.wait_for_index("many", n)
        for k in (300, n):
            for row, q in zip(store.search("many", vecs[:3], k), vecs[:3], strict=True):
                assert len(row) == k
                got = [h.id for h in row]
                assert len(set(got)) == k
                scores = [h.score for h in row]
                assert scores == sorted(scores, reverse=True)
                if k == n:
                    assert set(got) == set(ids)
                    np.testing.assert_allclose(scores, np.sort(vecs @ q)[::-1], atol=1e-5)
        assert search_params_for(store.index, 10)["ef"] == store.index.search_params["ef"]
        assert search_params_for(store.index, 10**6)["ef"] == 32768
    finally:
        store.close()
