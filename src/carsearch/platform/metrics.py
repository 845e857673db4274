"""Retrieval metrics: text→image ranking quality with class-level relevance, and ANN audits.

Definitions (one query = one row of the score matrix; the items are the images):

- An item is *relevant* to a query when its class is one of the query's relevant classes
  (class-level relevance: every image of the queried class counts).
- Ranking: items sorted by descending score; equal scores are broken by ascending item index
  (a stable sort of ``-score``), so results are deterministic.
- **Recall@K**: the fraction of queries with at least one relevant item in the top K. This is
  the "R@K" of class-level text→image retrieval, not the fraction of all relevant items
  retrieved (which would be bounded by K / number relevant).
- **mAP**: the mean over queries of average precision over *all* relevant items in the full
  ranking: AP = (1/R) Σ_{relevant at rank r} precision@r, with R the number of relevant items.
- **MRR**: the mean over queries of 1 / (rank of the first relevant item).
- Queries with no relevant item among the items are excluded from every mean and counted in
  ``n_excluded``.

The work is chunked over queries so that a 10k × 100k evaluation holds only two
(chunk × n_items) arrays at a time. Instead of a full argsort per query, each row is sorted
once (SIMD sort) and the relevant items' ranks are found by binary search; equal scores are
resolved by item index among the equal items only, so tie-breaking stays exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from carsearch.platform.errors import QueryError

__all__ = [
    "QueryScores",
    "RetrievalMetrics",
    "bootstrap_interval",
    "expected_random_ap",
    "query_scores",
    "random_hit_at_k",
    "random_reciprocal_rank",
    "recall_at_k_vs_exact",
    "reliability",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
    "score_agreement",
]

log = logging.getLogger(__name__)

# Elements per (chunk × n_items) working array; two such arrays live at once (~tens of MB).
_CHUNK_ELEMENTS = 1 << 22
# Show a progress bar from this many query-item scores on (a few seconds of work).
_PROGRESS_ELEMENTS = 1 << 28

QueryRelevance = Sequence[Iterable[Hashable] | str] | np.ndarray


@dataclass(frozen=True)
class RetrievalMetrics:
    """Aggregate text→image retrieval metrics (see the module docstring for definitions)."""

    recall: dict[int, float]
    mean_average_precision: float
    mean_reciprocal_rank: float
    n_queries: int
    n_excluded: int
    n_items: int

    def to_dict(self) -> dict[str, float | int]:
        """Flat, JSON-ready mapping: ``recall@K`` keys, ``mAP``, ``MRR`` and the counts."""
        out: dict[str, float | int] = {f"recall@{k}": v for k, v in sorted(self.recall.items())}
        out["mAP"] = self.mean_average_precision
        out["MRR"] = self.mean_reciprocal_rank
        out["n_queries"] = self.n_queries
        out["n_excluded"] = self.n_excluded
        out["n_items"] = self.n_items
        return out


def retrieval_metrics(
    scores: np.ndarray,
    query_relevant: QueryRelevance,
    item_classes: Sequence[Hashable] | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> RetrievalMetrics:
    """Metrics from a score matrix ``(n_queries, n_items)`` (higher = more similar).

    ``query_relevant`` is either one class label per query (an array or a sequence of labels)
    or, per query, a set of relevant class labels. ``item_classes`` is one label per item.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_queries, n_items), got shape {scores.shape}")
    n_queries, n_items = scores.shape

    def chunk_scores(start: int, stop: int) -> np.ndarray:
        return scores[start:stop]

    return _evaluate(chunk_scores, n_queries, n_items, query_relevant, item_classes, ks)


def retrieval_metrics_from_embeddings(
    query_embeddings: np.ndarray,
    item_embeddings: np.ndarray,
    query_relevant: QueryRelevance,
    item_classes: Sequence[Hashable] | np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> RetrievalMetrics:
    """Metrics with scores = inner products of the embeddings, computed chunk by chunk.

    Pass L2-normalised embeddings for cosine similarity.
    """
    queries = np.asarray(query_embeddings, dtype=np.float32)
    items = np.asarray(item_embeddings, dtype=np.float32)
    if queries.ndim != 2 or items.ndim != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(
            f"embeddings must be 2-D with equal width, got {queries.shape} and {items.shape}"
        )
    items_t = np.ascontiguousarray(items.T)

    def chunk_scores(start: int, stop: int) -> np.ndarray:
        return queries[start:stop] @ items_t

    return _evaluate(
        chunk_scores, queries.shape[0], items.shape[0], query_relevant, item_classes, ks
    )


def _evaluate(
    chunk_scores: Callable[[int, int], np.ndarray],
    n_queries: int,
    n_items: int,
    query_relevant: QueryRelevance,
    item_classes: Sequence[Hashable] | np.ndarray,
    ks: Sequence[int],
) -> RetrievalMetrics:
    ks_t = _check_ks(ks)
    item_idx, relevant_idx, n_classes = _encode_classes(query_relevant, item_classes)
    if len(relevant_idx) != n_queries:
        raise ValueError(f"{len(relevant_idx)} query relevance entries for {n_queries} queries")
    if item_idx.shape[0] != n_items:
        raise ValueError(f"{item_idx.shape[0]} item classes for {n_items} items")

    members = _class_members(item_idx, n_classes)
    first_ranks: list[int] = []  # 1-based rank of the first relevant item, per valid query
    aps: list[float] = []
    chunk = max(1, _CHUNK_ELEMENTS // max(n_items, 1))
    bar = tqdm(total=n_queries, unit="query", desc="ranking", leave=False,
               disable=n_queries * n_items < _PROGRESS_ELEMENTS)
    for start in range(0, n_queries, chunk):
        stop = min(start + chunk, n_queries)
        neg = -np.asarray(chunk_scores(start, stop))  # ascending neg = descending score
        if not np.isfinite(neg).all():
            raise ValueError("scores contain NaN or infinite values")
        neg_sorted = np.sort(neg, axis=1)
        for row, classes in enumerate(relevant_idx[start:stop]):
            cols = np.concatenate([members[c] for c in classes]) if classes.size else classes
            if not cols.size:
                continue
            ranks = _ranks(neg[row], neg_sorted[row], cols)
            aps.append(float((np.arange(1, ranks.size + 1) / ranks).mean()))
            first_ranks.append(int(ranks[0]))
        bar.update(stop - start)
    bar.close()

    n_valid = len(aps)
    n_excluded = n_queries - n_valid
    if n_valid == 0:
        raise QueryError(f"none of the {n_queries} queries has a relevant item among the items")
    if n_excluded:
        log.warning("%d of %d queries have no relevant item and are excluded", n_excluded,
                    n_queries)
    first = np.asarray(first_ranks, dtype=np.float64)
    return RetrievalMetrics(
        recall={k: float((first <= k).mean()) for k in ks_t},
        mean_average_precision=float(np.mean(aps)),
        mean_reciprocal_rank=float((1.0 / first).mean()),
        n_queries=n_valid,
        n_excluded=n_excluded,
        n_items=n_items,
    )


def _ranks(neg: np.ndarray, neg_sorted: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sorted 1-based ranks of items ``cols`` when ranking by (neg score, item index).

    rank = 1 + (items with a strictly higher score) + (items with an equal score and a smaller
    index). The first term comes from binary search in the sorted row; the second is needed
    only for items whose score occurs more than once, and is found among those equal items.
    """
    values = neg[cols]
    left = np.searchsorted(neg_sorted, values, side="left")
    right = np.searchsorted(neg_sorted, values, side="right")
    ranks = left + 1
    tied = right - left > 1
    if tied.any():
        tied_values = values[tied]
        equal = np.flatnonzero(np.isin(neg, tied_values))  # ascending item indices
        order = np.argsort(neg[equal], kind="stable")  # by value, then by index
        place = np.empty_like(order)
        place[order] = np.arange(order.size)
        group_start = np.searchsorted(neg[equal][order], tied_values, side="left")
        ranks[tied] += place[np.searchsorted(equal, cols[tied])] - group_start
    return np.sort(ranks)


def _class_members(item_idx: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """For each class index, the indices of its items."""
    order = np.argsort(item_idx, kind="stable")
    bounds = np.cumsum(np.bincount(item_idx, minlength=n_classes))[:-1]
    return np.split(order, bounds)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks_t = tuple(sorted({int(k) for k in ks}))
    if not ks_t or ks_t[0] < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    return ks_t


def _encode_classes(
    query_relevant: QueryRelevance, item_classes: Sequence[Hashable] | np.ndarray
) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Map labels to 0..C-1: item class indices, per-query relevant class indices, C.

    Relevant labels that no item has are dropped (they can match nothing).
    """
    vocab: dict[Hashable, int] = {}
    item_idx = np.fromiter(
        (vocab.setdefault(_plain(c), len(vocab)) for c in item_classes), dtype=np.int64
    )
    relevant_idx: list[np.ndarray] = []
    for entry in query_relevant:
        labels = [entry] if _is_single_label(entry) else list(entry)  # type: ignore[arg-type]
        found = {vocab[p] for p in map(_plain, labels) if p in vocab}
        relevant_idx.append(np.fromiter(sorted(found), dtype=np.int64, count=len(found)))
    return item_idx, relevant_idx, max(len(vocab), 1)


def _is_single_label(entry: object) -> bool:
    return isinstance(entry, str | bytes | int | np.generic)


def _plain(label: Hashable) -> Hashable:
    """numpy scalars → Python scalars, so np.str_('a') and 'a' are one class."""
    return label.item() if isinstance(label, np.generic) else label


# --- ANN audit -----------------------------------------------------------------------------


def recall_at_k_vs_exact(
    ann_ids: np.ndarray, exact_ids: np.ndarray, k: int | None = None
) -> float:
    """Mean over queries of |ANN top-k ∩ exact top-k| / (number of exact ids in the top k).

    Both arrays are ``(n_queries, k)`` ids with -1 marking a missing result; ``k`` (optional)
    keeps only the first k columns of each, so one top-100 search yields recall@1/10/100.
    The denominator is k unless the collection holds fewer than k items, in which case it is
    the number of exact results; queries with no exact result are skipped. A duplicated ANN id
    counts once.
    """
    ann = np.asarray(ann_ids, dtype=np.int64)
    exact = np.asarray(exact_ids, dtype=np.int64)
    if ann.ndim != 2 or ann.shape != exact.shape:
        raise ValueError(f"ann/exact ids need one 2-D shape: {ann.shape}, {exact.shape}")
    if k is not None:
        if not 1 <= k <= ann.shape[1]:
            raise ValueError(f"k={k} outside 1..{ann.shape[1]}")
        ann, exact = ann[:, :k], exact[:, :k]
    ann = np.sort(ann, axis=1)
    keep = ann != -1
    keep[:, 1:] &= ann[:, 1:] != ann[:, :-1]  # drop duplicates
    n_exact = (exact != -1).sum(axis=1)
    found = np.zeros(ann.shape[0], dtype=np.int64)
    chunk = max(1, _CHUNK_ELEMENTS // max(ann.shape[1] ** 2, 1))
    for start in range(0, ann.shape[0], chunk):
        a, e = ann[start:start + chunk], exact[start:start + chunk]
        member = (a[:, :, None] == e[:, None, :]).any(axis=2) & keep[start:start + chunk]
        found[start:start + chunk] = member.sum(axis=1)
    valid = n_exact > 0
    if not valid.any():
        raise ValueError("no query has an exact result")
    return float((found[valid] / n_exact[valid]).mean())


def score_agreement(
    ann_scores: np.ndarray,
    exact_scores: np.ndarray,
    ann_ids: np.ndarray | None = None,
    exact_ids: np.ndarray | None = None,
) -> float:
    """Mean |ANN score − exact score| at equal rank, over ranks where both have a result.

    A rank is missing where its id is -1 (when ids are given) or its score is not finite or
    is FAISS's -FLT_MAX padding.
    """
    ann = np.asarray(ann_scores, dtype=np.float64)
    exact = np.asarray(exact_scores, dtype=np.float64)
    if ann.shape != exact.shape:
        raise ValueError(f"score shapes differ: {ann.shape} vs {exact.shape}")
    both = _present(ann) & _present(exact)
    if ann_ids is not None:
        both &= np.asarray(ann_ids) != -1
    if exact_ids is not None:
        both &= np.asarray(exact_ids) != -1
    if not both.any():
        raise ValueError("no rank has a result in both score arrays")
    return float(np.abs(ann[both] - exact[both]).mean())


def _present(scores: np.ndarray) -> np.ndarray:
    return np.isfinite(scores) & (scores > -1e30)


# -- chance levels, per-query scores and intervals (served-view evaluation) -----------------
def expected_random_ap(n_relevant: int, n_items: int, depth: int | None = None) -> float:
    """The expected average precision of a uniformly random ranking of `n_items` items of
    which `n_relevant` are relevant, AP cut at `depth` (None: the whole ranking) and
    normalised by `n_relevant`.

    With rel_r the indicator at rank r, E[rel_r] = R/N and E[rel_r rel_j] = R(R-1)/(N(N-1))
    for r != j, so E[AP@K] = (1/R) sum_{r<=K} E[rel_r (1 + sum_{j<r} rel_j)] / r
    = H_K / N + (R-1) (K - H_K) / (N (N-1)), H_K the K-th harmonic number. It is not R/N:
    a random ranking still puts some relevant item near the top, which AP rewards."""
    n, r = int(n_items), int(n_relevant)
    if n <= 0 or r <= 0:
        return 0.0
    r = min(r, n)
    k = n if depth is None else max(0, min(int(depth), n))
    h_k = float(np.sum(1.0 / np.arange(1, k + 1))) if k else 0.0
    if n == 1:
        return 1.0
    return h_k / n + (r - 1) * (k - h_k) / (n * (n - 1))


def random_hit_at_k(n_relevant: int, n_items: int, k: int) -> float:
    """P(at least one relevant item in the top k) under a random ranking."""
    n, r, k = int(n_items), int(n_relevant), min(int(k), int(n_items))
    if r <= 0 or n <= 0:
        return 0.0
    if n - r < k:
        return 1.0
    miss = 1.0
    for i in range(k):  # C(n - r, k) / C(n, k) as a product
        miss *= (n - r - i) / (n - i)
    return 1.0 - miss


def random_reciprocal_rank(n_relevant: int, n_items: int) -> float:
    """E[1 / rank of the first relevant item] under a random ranking."""
    n, r = int(n_items), int(n_relevant)
    if r <= 0 or n <= 0:
        return 0.0
    total, p_none_before = 0.0, 1.0
    for rank in range(1, n - r + 2):
        # P(first relevant at `rank`) = P(none in the first rank-1) * r / (n - rank + 1)
        p_here = p_none_before * r / (n - rank + 1)
        total += p_here / rank
        p_none_before *= (n - rank + 1 - r) / (n - rank + 1)
    return total


@dataclass(frozen=True)
class QueryScores:
    """Per-query retrieval scores over a ranked list of at most `depth` results.

    `hits[k]` holds 1.0 where a relevant item is in the top k; `ap` is average precision
    normalised by the query's number of relevant items (so relevant items beyond the
    list count as missed: AP@depth); `rr` is 1 / rank of the first relevant (0: none in
    the list). Queries with no relevant item are left out (`excluded`)."""

    hits: dict[int, np.ndarray]
    ap: np.ndarray
    rr: np.ndarray
    n_relevant: np.ndarray
    n_items: int
    depth: int
    excluded: int

    def means(self) -> dict[str, float]:
        out = {f"recall@{k}": float(np.mean(v)) if len(v) else 0.0
               for k, v in sorted(self.hits.items())}
        out["mAP"] = float(np.mean(self.ap)) if len(self.ap) else 0.0
        out["MRR"] = float(np.mean(self.rr)) if len(self.rr) else 0.0
        return out

    def chance(self) -> dict[str, float]:
        """The same metrics expected of a random ranking of the same items."""
        rel = [int(r) for r in self.n_relevant]
        if not rel:
            return {}
        out = {f"recall@{k}": float(np.mean([random_hit_at_k(r, self.n_items, k)
                                             for r in rel])) for k in sorted(self.hits)}
        out["mAP"] = float(np.mean([expected_random_ap(r, self.n_items, self.depth)
                                    for r in rel]))
        out["MRR"] = float(np.mean([random_reciprocal_rank(r, self.n_items) for r in rel]))
        return out

    def intervals(self, level: float = 0.95, n_boot: int = 2000,
                  seed: int = 0) -> dict[str, tuple[float, float]]:
        """Percentile bootstrap intervals of every mean, resampling queries."""
        columns = {f"recall@{k}": v for k, v in sorted(self.hits.items())}
        columns["mAP"], columns["MRR"] = self.ap, self.rr
        return {name: bootstrap_interval(v, level=level, n_boot=n_boot, seed=seed)
                for name, v in columns.items()}


def query_scores(
    ranked_relevance: Sequence[Sequence[bool] | np.ndarray],
    n_relevant: Sequence[int],
    n_items: int,
    ks: Sequence[int] = (1, 5, 10),
) -> QueryScores:
    """Per-query scores from each query's ranked list (True where the item at that rank
    is relevant) and its total number of relevant items among the `n_items` searched."""
    ks = _check_ks(ks)
    depth = max((len(r) for r in ranked_relevance), default=0)
    hits: dict[int, list[float]] = {k: [] for k in ks}
    aps, rrs, rels = [], [], []
    excluded = 0
    for ranked, total in zip(ranked_relevance, n_relevant, strict=True):
        flags = np.asarray(ranked, dtype=bool)
        if total <= 0:
            excluded += 1
            continue
        positions = np.flatnonzero(flags) + 1  # 1-based ranks of relevant results
        for k in ks:
            hits[k].append(1.0 if len(positions) and positions[0] <= k else 0.0)
        precisions = np.arange(1, len(positions) + 1) / positions if len(positions) else []
        aps.append(float(np.sum(precisions)) / total)
        rrs.append(1.0 / positions[0] if len(positions) else 0.0)
        rels.append(total)
    return QueryScores(
        hits={k: np.asarray(v) for k, v in hits.items()}, ap=np.asarray(aps),
        rr=np.asarray(rrs), n_relevant=np.asarray(rels, dtype=int), n_items=int(n_items),
        depth=int(depth), excluded=excluded)


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, *, level: float = 0.95, n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query `values` (resampling them
    with replacement `n_boot` times, seeded); (nan, nan) for no values."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    # clamped so that a degenerate sample (all resampled means on one side) still holds it
    mean = float(arr.mean())
    return min(float(lo), mean), max(float(hi), mean)


def reliability(probabilities: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray,
                n_bins: int = 10) -> dict[str, object]:
    """A reliability table and the expected calibration error of predicted probabilities.

    Pairs are binned by probability into `n_bins` equal-width bins over [0, 1]; each
    non-empty bin reports its count, mean predicted probability and observed frequency of
    positives. ECE = sum over bins of (count / N) * |observed - predicted|; a calibrated
    model has ECE near 0. Also the Brier score (mean squared error of the probability)."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} probabilities but {y.size} labels")
    if p.size == 0:
        return {"n": 0, "ece": float("nan"), "brier": float("nan"), "bins": []}
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    bins = []
    ece = 0.0
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        if not count:
            continue
        predicted, observed = float(p[mask].mean()), float(y[mask].mean())
        ece += count / p.size * abs(observed - predicted)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": count,
                     "predicted": predicted, "observed": observed})
    return {"n": int(p.size), "positives": int(y.sum()), "ece": float(ece),
            "brier": float(np.mean((p - y) ** 2)), "bins": bins}
