"""The FAISS exact index against numpy brute force, and its save/load/tamper checks."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from carsearch.platform.errors import ArtifactTamperedError, ModelNotFoundError
from carsearch.platform.vectors.exact import INDEX_FILE, META_FILE, ExactIndex, set_threads


def unit(rng, n, dim):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    ids = rng.choice(10**9, size=200, replace=False).astype(np.int64)
    return ids, unit(rng, 200, 16), unit(rng, 7, 16)


def brute_force(ids, vectors, queries, k):
    sims = queries @ vectors.T
    order = np.argsort(-sims, axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[order]


@pytest.mark.parametrize("k", [1, 10, 200, 250])
def test_search_equals_numpy_brute_force(data, k):
    ids, vectors, queries = data
    index = ExactIndex.from_arrays(ids, vectors, threads=1)
    scores, got = index.search(queries, k)
    assert scores.shape == got.shape == (7, k)
    assert got.dtype == np.int64
    n = min(k, len(ids))
    want_scores, want_ids = brute_force(ids, vectors, queries, n)
    np.testing.assert_array_equal(got[:, :n], want_ids)
    np.testing.assert_allclose(scores[:, :n], want_scores, rtol=0, atol=1e-5)
    assert (got[:, n:] == -1).all()  # k > n: padded
    assert np.isneginf(scores[:, n:]).all()


def test_empty_index_and_empty_query_batch():
    index = ExactIndex(4)
    q = np.eye(4, dtype=np.float32)[:1]
    scores, ids = index.search(q, 3)
    assert (ids == -1).all()
    assert np.isneginf(scores).all()
    assert len(index) == 0
    scores, ids = index.search(np.empty((0, 4), np.float32), 5)
    assert ids.shape == (0, 5)


def test_remove_and_upsert(data):
    ids, vectors, queries = data
    index = ExactIndex.from_arrays(ids, vectors)
    gone = ids[:50]
    assert index.remove(np.append(gone, 12345)) == 50  # unknown id ignored
    assert len(index) == 150
    assert set(index.ids().tolist()) == set(ids[50:].tolist())
    _, got = index.search(queries, 150)
    assert not np.isin(got, gone).any()
    _, want_ids = brute_force(ids[50:], vectors[50:], queries, 10)
    np.testing.assert_array_equal(got[:, :10], want_ids)

    # upsert: the id now points at the query vector itself, so it ranks first with score 1
    target = int(ids[60])
    index.upsert(np.array([target]), queries[:1])
    assert len(index) == 150
    scores, got = index.search(queries[:1], 1)
    assert got[0, 0] == target
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_validation(data):
    ids, vectors, _ = data
    index = ExactIndex.from_arrays(ids[:10], vectors[:10])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(ids[5:15], vectors[5:15])
    with pytest.raises(ValueError, match="repeat"):
        index.add(np.array([1, 1]), vectors[:2])
    with pytest.raises(ValueError, match="non-negative"):
        index.add(np.array([-1]), vectors[:1])
    with pytest.raises(ValueError, match="not L2-normalised"):
        index.add(np.array([7]), vectors[:1] * 2)
    with pytest.raises(ValueError, match="floating"):
        index.add(np.array([7]), np.ones((1, 16), dtype=np.int32))
    with pytest.raises(ValueError, match="shape"):
        index.add(np.array([7]), vectors[:1, :8])
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 16), np.nan, np.float32), 1)
    with pytest.raises(ValueError, match="ids for"):
        index.add(np.array([7, 8]), vectors[:1])
    with pytest.raises(ValueError, match="k must"):
        index.search(vectors[:1], 0)
    assert len(index) == 10  # nothing half-added


def test_normalize_option_accepts_float64_and_scales(data):
    ids, vectors, _ = data
    index = ExactIndex(16)
    index.add(ids[:3], vectors[:3].astype(np.float64) * 5, normalize=True)
    scores, got = index.search(vectors[:1] * 3, 1, normalize=True)
    assert got[0, 0] == ids[0]
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="zero"):
        index.add(np.array([1]), np.zeros((1, 16)), normalize=True)


def test_save_load_round_trip(tmp_path, data):
    ids, vectors, queries = data
    index = ExactIndex.from_arrays(ids, vectors, model_version="v3")
    index.remove(ids[:5])
    index.save(tmp_path / "exact")
    meta = json.loads((tmp_path / "exact" / META_FILE).read_text())
    assert meta["dim"] == 16
    assert meta["count"] == 195
    assert meta["model_version"] == "v3"
    assert len(meta["sha256"]) == 64

    loaded = ExactIndex.load(tmp_path / "exact", threads=1)
    assert len(loaded) == 195
    assert loaded.model_version == "v3"
    assert loaded.dim == 16
    for a, b in zip(index.search(queries, 20), loaded.search(queries, 20), strict=True):
        np.testing.assert_array_equal(a, b)
    loaded.add(ids[:1], vectors[:1])  # still a working index
    assert len(loaded) == 196


def test_tampered_index_file_detected(tmp_path, data):
    ids, vectors, _ = data
    ExactIndex.from_arrays(ids, vectors).save(tmp_path)
    path = tmp_path / INDEX_FILE
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # flip one byte (in the stored id map)
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactTamperedError, match="sha256"):
        ExactIndex.load(tmp_path)


def test_metadata_mismatch_detected(tmp_path, data):
    ids, vectors, _ = data
    ExactIndex.from_arrays(ids, vectors).save(tmp_path)
    meta_path = tmp_path / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["count"] = 199
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactTamperedError, match="count"):
        ExactIndex.load(tmp_path)
    meta_path.write_text("{not json")
    with pytest.raises(ArtifactTamperedError, match="metadata"):
        ExactIndex.load(tmp_path)


def test_missing_index_is_reported(tmp_path):
    with pytest.raises(ModelNotFoundError):
        ExactIndex.load(tmp_path / "nowhere")


def test_threads_setting():
    set_threads(1)
    assert faiss.omp_get_max_threads() == 1
    with pytest.raises(ValueError):
        set_threads(0)


# ---- trusted artifacts: the sha256 recorded in the database at save (issue 17) -------------


def _forge(directory, ids, vectors):
    """What someone who can write the directory does: a different index, and index.json
    rewritten to match it, so that the JSON beside it vouches for it."""
    forged = vectors.copy()
    forged[0] = -forged[0]  # the first image's vector, turned around
    ExactIndex.from_arrays(ids, forged, model_version="v1").save(directory)


def test_the_json_beside_the_index_cannot_catch_a_forgery(tmp_path, data):
    """Why the ledger exists: a consistent forgery passes the JSON check."""
    ids, vectors, _ = data
    ExactIndex.from_arrays(ids, vectors, model_version="v1").save(tmp_path / "v1")
    _forge(tmp_path / "v1", ids, vectors)
    forged = ExactIndex.load(tmp_path / "v1")
    assert forged.search(vectors[:1], 1)[1][0, 0] != ids[0]


def test_a_forged_index_is_refused_against_the_recorded_hash(tmp_path, data, database):
    from carsearch.platform.artifacts import EXACT_INDEX, ArtifactLedger

    ids, vectors, queries = data
    ledger = ArtifactLedger(database)
    ExactIndex.from_arrays(ids, vectors, model_version="v1").save(tmp_path / "v1",
                                                                  ledger=ledger)
    recorded = ledger.recorded(EXACT_INDEX, "v1")
    assert recorded is not None and set(recorded) == {INDEX_FILE, META_FILE}
    loaded = ExactIndex.load(tmp_path / "v1", ledger=ledger)  # untouched: loads
    np.testing.assert_array_equal(loaded.search(queries, 5)[1],
                                  brute_force(ids, vectors, queries, 5)[1])

    _forge(tmp_path / "v1", ids, vectors)
    with pytest.raises(ArtifactTamperedError) as err:
        ExactIndex.load(tmp_path / "v1", ledger=ledger)
    assert str(tmp_path / "v1" / INDEX_FILE) in str(err.value)
    assert "recorded" in str(err.value)

    # Only index.json changed (a count to make the audit report lie): refused, named.
    ExactIndex.from_arrays(ids, vectors, model_version="v1").save(tmp_path / "v1",
                                                                  ledger=ledger)
    meta_path = tmp_path / "v1" / META_FILE
    meta_path.write_text(meta_path.read_text().replace('"v1"', '"v2"'))
    with pytest.raises(ArtifactTamperedError, match=str(meta_path)):
        ExactIndex.load(tmp_path / "v1", ledger=ledger)


def test_an_index_with_no_record_is_refused(tmp_path, data, database):
    from carsearch.platform.artifacts import ArtifactLedger

    ids, vectors, _ = data
    ExactIndex.from_arrays(ids, vectors).save(tmp_path / "v9")  # saved without the ledger
    with pytest.raises(ArtifactTamperedError, match="no sha256 was recorded"):
        ExactIndex.load(tmp_path / "v9", ledger=ArtifactLedger(database))
