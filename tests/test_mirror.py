"""The in-memory search mirror: exact, filtered like Milvus, and never behind Milvus.

Brute-force NumPy is the reference for the mirror's own results; a real Milvus Lite file
is the reference for what the mirror holds and for the filter semantics.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from carsearch.platform.runtime import Platform
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.filters import SearchFilters
from carsearch.platform.vectors.milvus import MilvusStore
from carsearch.platform.vectors.mirror import MirroredStore, VectorMirror
from carsearch.platform.vectors.protocol import VectorRow

DIM = 16
MAKES = ["Chevrolet", "Ford", "BMW", "Mercedes-Benz"]
BODIES = ["pickup", "sedan", "suv"]
COLOURS = ["red", "white", "black"]
NAME = "cars"


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows_for(rng: np.random.Generator, n: int) -> list[VectorRow]:
    return [
        VectorRow(make=str(rng.choice(MAKES)), body=str(rng.choice(BODIES)),
                  colour=str(rng.choice(COLOURS)), source="test",
                  year=int(rng.integers(1995, 2013)))
        for _ in range(n)
    ]


def reference(ids: np.ndarray, vecs: np.ndarray, rows: list[VectorRow], q: np.ndarray,
              k: int, f: SearchFilters | None) -> list[int]:
    """Brute force: filter by the rows' fields, rank by inner product."""
    ok = np.ones(len(ids), dtype=bool)
    if f is not None:
        for name in ("make", "body", "colour", "source"):
            values = getattr(f, name)
            if values:
                ok &= np.array([getattr(r, name) in values for r in rows])
        years = np.array([r.year for r in rows])
        if f.year_min is not None:
            ok &= years >= f.year_min
        if f.year_max is not None:
            ok &= years <= f.year_max
    scores = vecs @ q
    order = [i for i in np.argsort(-scores, kind="stable") if ok[i]]
    return [int(ids[i]) for i in order[:k]]


FILTERS = [
    None,
    SearchFilters(make="Ford"),
    SearchFilters(make=("BMW", "Ford"), colour="red"),
    SearchFilters(body="pickup", year_min=2005),
    SearchFilters(year_min=2000, year_max=2003),
    SearchFilters(make="Tesla"),  # no such make: nothing
    SearchFilters(source="test", year_max=2012),
]


def test_mirror_matches_brute_force_with_and_without_filters() -> None:
    rng = np.random.default_rng(1)
    ids = rng.choice(10**12, size=600, replace=False).astype(np.int64)
    vecs, rows = unit(rng, 600), rows_for(rng, 600)
    m = VectorMirror(DIM)
    m.upsert(ids[:250].tolist(), vecs[:250], rows[:250])  # two calls: appends line up
    m.upsert(ids[250:].tolist(), vecs[250:], rows[250:])
    assert len(m) == 600
    for f in FILTERS:
        for q in unit(rng, 5):
            got = m.search(q[None], 10, f)[0]
            assert [h.id for h in got] == reference(ids, vecs, rows, q, 10, f)
            for h in got:  # the hit carries the row's own fields
                j = int(np.flatnonzero(ids == h.id)[0])
                assert h.fields == rows[j].as_fields()
                assert h.score == pytest.approx(float(vecs[j] @ q), abs=1e-5)
    assert m.search(unit(rng, 1), 10, SearchFilters(make="Tesla")) == [[]]


def test_mirror_upsert_replaces_and_delete_compacts() -> None:
    rng = np.random.default_rng(2)
    vecs, rows = unit(rng, 50), rows_for(rng, 50)
    ids = list(range(100, 150))
    m = VectorMirror(DIM)
    m.upsert(ids, vecs, rows)
    # Replace id 120 with another vector and make; the last write of an id in a call wins.
    target = unit(rng, 1)
    m.upsert([120, 120], np.vstack([vecs[0:1], target]), [rows[0], VectorRow(make="Tesla")])
    assert len(m) == 50
    best = m.search(target, 1)[0][0]
    assert (best.id, best.fields["make"]) == (120, "Tesla")
    assert [h.id for h in m.search(target, 5, SearchFilters(make="Tesla"))[0]] == [120]
    # Delete a few (and an unknown id): they never come back; the rest still line up.
    assert m.delete([101, 120, 149, 999]) == 3
    assert len(m) == 47 and 120 not in m and 102 in m
    keep = [i for i in range(50) if ids[i] not in (101, 120, 149)]
    kept_ids = np.array([ids[i] for i in keep])
    for q in unit(rng, 5):
        got = [h.id for h in m.search(q[None], 47)[0]]
        assert got == reference(kept_ids, vecs[keep], [rows[i] for i in keep], q, 47, None)
    assert len(m.search(unit(rng, 1), 500)[0]) == 47  # k beyond the size: all rows


@pytest.fixture
def filled(tmp_path: Path) -> Any:
    rng = np.random.default_rng(3)
    store = MirroredStore(str(tmp_path / "milvus.db"))
    store.ensure_collection(NAME, DIM)
    ids = np.arange(1, 401, dtype=np.int64) * 7919
    vecs, rows = unit(rng, 400), rows_for(rng, 400)
    store.upsert(NAME, ids.tolist(), vecs, rows)
    store.flush(NAME)
    yield store, ids, vecs, rows, rng
    store.close()


def test_store_serves_from_mirror_once_warm_and_agrees_with_milvus(filled: Any) -> None:
    store, ids, vecs, rows, rng = filled
    assert store.mirror(NAME) is None
    store.search(NAME, unit(rng, 1), 5)  # a one-shot process: Milvus answers, nothing builds
    assert store.mirror(NAME) is None
    assert store.search_backend(NAME) == "Milvus Lite, HNSW (no mirror)"
    store.warm(NAME)
    assert store.search_backend(NAME) == "in-memory mirror (exact, 400 vectors)"
    mirror = store.mirror(NAME)
    assert mirror is not None and len(mirror) == 400 == store.count(NAME)
    agree = []
    for f in FILTERS:
        for q in unit(rng, 4):
            got = [h.id for h in store.search(NAME, q[None], 10, f)[0]]
            assert got == reference(ids, vecs, rows, q, 10, f)
            ann = [h.id for h in store.search_ann(NAME, q[None], 10, f)[0]]  # Milvus itself
            agree.append(len(set(got) & set(ann)) / max(len(got), 1) if got or ann else 1.0)
    # Same filter semantics as the Milvus expression, and Milvus's ANN finds the same rows.
    assert np.mean(agree) >= 0.95


def test_vectors_by_id_come_from_the_mirror_as_milvus_returns_them(filled: Any) -> None:
    store, ids, vecs, _rows, _rng = filled
    ask = [int(ids[5]), 12345, int(ids[0]), int(ids[5]), int(ids[399])]  # unknown, repeat
    from_milvus = store.vectors(NAME, ask)  # no mirror yet: Milvus answers
    store.warm(NAME)
    got_ids, got = store.vectors(NAME, ask)
    assert got_ids.tolist() == from_milvus[0].tolist() == [ask[0], ask[2], ask[4]]
    np.testing.assert_allclose(got, from_milvus[1], atol=1e-6)
    np.testing.assert_allclose(got, vecs[[5, 0, 399]], atol=1e-6)
    empty_ids, empty = store.vectors(NAME, [1, 2])
    assert empty_ids.size == 0 and empty.shape == (0, DIM)


def test_writes_pass_through_to_the_mirror(filled: Any) -> None:
    store, ids, _vecs, _rows, rng = filled
    store.warm(NAME)
    new_ids = [5, 6, 7]
    new_vecs = unit(rng, 3)
    store.upsert(NAME, new_ids, new_vecs, [VectorRow(make="Tesla", year=2012)] * 3)
    store.delete(NAME, [int(ids[0]), int(ids[1])])
    hits = store.search(NAME, new_vecs[:1], 3, SearchFilters(make="Tesla"))[0]
    assert sorted(h.id for h in hits) == new_ids
    mirror = store.mirror(NAME)
    assert mirror is not None
    assert set(mirror.ids.tolist()) == store.ids(NAME)
    assert len(mirror) == 401


class _PausingStore(MirroredStore):
    """Pauses a build before or after its scan of Milvus, so a test can write meanwhile."""

    def __init__(self, uri: str, when: str) -> None:
        super().__init__(uri)
        self.when = when
        self.paused = threading.Event()
        self.go = threading.Event()

    def _scan(self, name: str, batch: int = 10_000) -> VectorMirror:
        if self.when == "before":
            self.paused.set()
            self.go.wait(30)
        mirror = super()._scan(name, batch=batch)
        if self.when == "after":
            self.paused.set()
            self.go.wait(30)
        return mirror


@pytest.mark.parametrize("when", ["before", "after"])
def test_writes_during_a_build_are_not_lost(tmp_path: Path, when: str) -> None:
    rng = np.random.default_rng(4)
    store = _PausingStore(str(tmp_path / "milvus.db"), when)
    try:
        store.ensure_collection(NAME, DIM)
        store.upsert(NAME, list(range(1, 101)), unit(rng, 100), rows_for(rng, 100))
        store.flush(NAME)
        store.warm(NAME, wait=False)
        assert store.paused.wait(30)
        store.upsert(NAME, list(range(200, 220)), unit(rng, 20), rows_for(rng, 20))
        store.delete(NAME, list(range(1, 11)))
        assert store.mirror(NAME) is None  # still building: searches go to Milvus
        store.go.set()
        store.warm(NAME)  # joins the build
        mirror = store.mirror(NAME)
        assert mirror is not None
        assert set(mirror.ids.tolist()) == store.ids(NAME) == (
            set(range(11, 101)) | set(range(200, 220)))
    finally:
        store.go.set()
        store.close()


def test_auto_build_starts_on_a_search_and_drop_forgets(filled: Any) -> None:
    store, _ids, _vecs, _rows, rng = filled
    store.auto_build = True
    store.search(NAME, unit(rng, 1), 5)  # Milvus answers this one and a build starts
    store.warm(NAME)  # wait for it
    assert store.mirror(NAME) is not None
    store.drop(NAME)
    assert store.mirror(NAME) is None and not store.has_collection(NAME)


def test_settings_choose_the_mirror_for_lite_only(tmp_path: Path) -> None:
    lite = Settings(data_dir=tmp_path)
    assert lite.mirror_enabled
    assert not Settings(data_dir=tmp_path, search_mirror="off").mirror_enabled
    server = Settings(data_dir=tmp_path, milvus_uri="http://milvus:19530")
    assert not server.mirror_enabled  # other processes write to a server
    assert Settings(data_dir=tmp_path, milvus_uri="http://m:19530",
                    search_mirror="on").mirror_enabled
    p = Platform(lite)
    try:
        assert isinstance(p.store, MirroredStore)
    finally:
        p.close()
    p = Platform(Settings(data_dir=tmp_path / "b", search_mirror="off"))
    try:
        assert type(p.store) is MilvusStore
    finally:
        p.close()
