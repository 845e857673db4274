"""Retrieval metrics against a pure-Python brute-force reference and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from carsearch.platform import metrics
from carsearch.platform.errors import QueryError
from carsearch.platform.metrics import (
    recall_at_k_vs_exact,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
    score_agreement,
)


def reference(scores, relevant, item_classes, ks):
    """Brute force, one query at a time: sort by (-score, index), walk the ranking."""
    recall_hits = dict.fromkeys(ks, 0)
    aps, rrs, excluded = [], [], 0
    for q, row in enumerate(scores.tolist()):
        wanted = {relevant[q]} if isinstance(relevant[q], str) else set(relevant[q])
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        rel = [item_classes[j] in wanted for j in order]
        if not any(rel):
            excluded += 1
            continue
        first = rel.index(True) + 1
        for k in ks:
            recall_hits[k] += first <= k
        found, precisions = 0, []
        for rank, is_rel in enumerate(rel, start=1):
            if is_rel:
                found += 1
                precisions.append(found / rank)
        aps.append(sum(precisions) / len(precisions))
        rrs.append(1 / first)
    n = len(aps)
    return {
        **{f"recall@{k}": recall_hits[k] / n for k in ks},
        "mAP": sum(aps) / n,
        "MRR": sum(rrs) / n,
        "n_queries": n,
        "n_excluded": excluded,
    }


def random_case(seed, ties=True):
    rng = np.random.default_rng(seed)
    n_q, n_items = int(rng.integers(1, 30)), int(rng.integers(1, 60))
    classes = [f"c{i}" for i in range(int(rng.integers(1, 8)))]
    item_classes = [classes[i] for i in rng.integers(0, len(classes), n_items)]
    if ties:  # few distinct score values, so ties are frequent
        scores = rng.integers(0, 4, (n_q, n_items)).astype(np.float64) / 4
    else:
        scores = rng.normal(size=(n_q, n_items))
    pool = [*classes, "absent"]
    relevant = []
    for _ in range(n_q):
        size = int(rng.integers(0, 3))
        picked = rng.choice(len(pool), size, replace=False)
        relevant.append(frozenset(pool[i] for i in picked))
    relevant[0] = frozenset({item_classes[0]})  # at least one evaluable query
    return scores, relevant, item_classes


def assert_matches(got, want):
    assert got.keys() - {"n_items"} == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_reference(seed, ties):
    scores, relevant, item_classes = random_case(seed, ties)
    ks = (1, 3, 10)
    got = retrieval_metrics(scores, relevant, item_classes, ks=ks).to_dict()
    assert_matches(got, reference(scores, relevant, item_classes, ks))


def test_chunking_does_not_change_results(monkeypatch):
    scores, relevant, item_classes = random_case(99)
    whole = retrieval_metrics(scores, relevant, item_classes).to_dict()
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 1)  # one query per chunk
    assert retrieval_metrics(scores, relevant, item_classes).to_dict() == whole


def test_single_label_array_and_embeddings_path():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(20, 8)).astype(np.float32)
    items = rng.normal(size=(50, 8)).astype(np.float32)
    q_labels = np.array([f"c{i % 5}" for i in range(20)])
    item_labels = np.array([f"c{i % 5}" for i in range(50)])
    from_emb = retrieval_metrics_from_embeddings(q, items, q_labels, item_labels).to_dict()
    from_scores = retrieval_metrics(q @ items.T, q_labels, item_labels).to_dict()
    assert from_emb == pytest.approx(from_scores)
    want = reference(q @ items.T, [str(c) for c in q_labels], [str(c) for c in item_labels],
                     (1, 5, 10))
    assert_matches(from_scores, want)


def test_hand_made_case():
    item_classes = ["a", "b", "a", "c", "b"]
    relevant = ["a", "b", frozenset({"z"}), frozenset({"c", "b"})]
    scores = np.array([
        # ranking 1(b) 2(a) 4(b) 3(c) 0(a): relevant at ranks 2, 5
        # AP = (1/2 + 2/5) / 2 = 0.45, RR = 1/2
        [0.1, 0.9, 0.8, 0.3, 0.5],
        # four-way tie at 0.5 broken by index: 0(a) 2(a) 3(c) 4(b) 1(b): ranks 4, 5
        # AP = (1/4 + 2/5) / 2 = 0.325, RR = 1/4
        [0.5, 0.2, 0.5, 0.5, 0.5],
        # class "z" has no item: excluded
        [0.0, 0.0, 0.0, 0.0, 0.0],
        # 1(b) 3(c) then tie 0(a) 2(a) 4(b): relevant at ranks 1, 2, 5
        # AP = (1/1 + 2/2 + 3/5) / 3 = 0.8666..., RR = 1
        [0.0, 0.7, 0.0, 0.6, 0.0],
    ])
    m = retrieval_metrics(scores, relevant, item_classes, ks=(1, 2, 5))
    assert m.n_queries == 3
    assert m.n_excluded == 1
    assert m.n_items == 5
    # first relevant ranks 2, 4, 1
    assert m.recall == pytest.approx({1: 1 / 3, 2: 2 / 3, 5: 1.0})
    assert m.mean_average_precision == pytest.approx((0.45 + 0.325 + 2.6 / 3) / 3)
    assert m.mean_reciprocal_rank == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    d = m.to_dict()
    assert list(d)[:3] == ["recall@1", "recall@2", "recall@5"]
    assert d["mAP"] == pytest.approx(0.547222222)


def test_perfect_ranking_scores_one():
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.9]])
    m = retrieval_metrics(scores, ["x", "y"], ["x", "x", "y"], ks=(1,))
    assert m.recall == {1: 1.0}
    assert m.mean_average_precision == 1.0
    assert m.mean_reciprocal_rank == 1.0


def test_no_relevant_query_at_all_is_a_query_error():
    with pytest.raises(QueryError):
        retrieval_metrics(np.zeros((2, 3)), ["q", "r"], ["a", "b", "c"])


@pytest.mark.parametrize(
    ("scores", "relevant", "items", "ks"),
    [
        (np.zeros(3), ["a"], ["a", "b", "c"], (1,)),  # not 2-D
        (np.zeros((2, 3)), ["a"], ["a", "b", "c"], (1,)),  # too few relevance entries
        (np.zeros((1, 3)), ["a"], ["a", "b"], (1,)),  # too few item classes
        (np.zeros((1, 3)), ["a"], ["a", "b", "c"], (0,)),  # bad k
        (np.array([[np.nan, 0, 0]]), ["a"], ["a", "b", "c"], (1,)),  # NaN
    ],
)
def test_rejects_bad_input(scores, relevant, items, ks):
    with pytest.raises(ValueError):
        retrieval_metrics(scores, relevant, items, ks=ks)


def test_recall_vs_exact_hand_made():
    exact = np.array([[1, 2, 3], [4, 5, 6], [7, -1, -1], [-1, -1, -1]])
    ann = np.array([[3, 2, 9], [6, -1, -1], [7, 8, -1], [1, 2, 3]])
    # q0 2/3, q1 1/3, q2 1/1 (only one exact result exists), q3 skipped (no exact result)
    assert recall_at_k_vs_exact(ann, exact) == pytest.approx((2 / 3 + 1 / 3 + 1) / 3)
    # k=1: exact [1, 4, 7], ann [3, 6, 7] -> 0, 0, 1
    assert recall_at_k_vs_exact(ann, exact, k=1) == pytest.approx(1 / 3)
    # a repeated ANN id counts once
    assert recall_at_k_vs_exact(np.array([[1, 1, 1]]), np.array([[1, 2, 3]])) == pytest.approx(
        1 / 3
    )


@pytest.mark.parametrize("seed", range(5))
def test_recall_vs_exact_random_matches_sets(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 40)  # several chunks
    exact = np.stack([rng.permutation(30)[:10] for _ in range(17)])
    ann = np.stack([rng.permutation(30)[:10] for _ in range(17)])
    want = sum(len(set(a) & set(e)) / 10 for a, e in zip(ann.tolist(), exact.tolist(),
                                                         strict=True)) / 17
    assert recall_at_k_vs_exact(ann, exact) == pytest.approx(want)
    assert recall_at_k_vs_exact(exact, exact) == 1.0


def test_score_agreement():
    pad = -3.4028235e38  # FAISS's padding score
    ann = np.array([[0.9, 0.5, -np.inf], [0.7, 0.6, pad]])
    exact = np.array([[0.9, 0.6, 0.1], [0.8, 0.6, 0.2]])
    # matched ranks: |0|, |0.1|, |0.1|, |0| -> mean 0.05
    assert score_agreement(ann, exact) == pytest.approx(0.05)
    ids = np.array([[1, 2, -1], [3, -1, -1]])  # an id of -1 also marks a missing rank
    # matched ranks: 0, 0.1, 0.1 -> 0.2 / 3
    assert score_agreement(ann, exact, ann_ids=ids) == pytest.approx(0.2 / 3)
    with pytest.raises(ValueError):
        score_agreement(np.full((1, 2), -np.inf), exact[:1, :2])
    assert math.isclose(score_agreement(exact, exact), 0.0)
