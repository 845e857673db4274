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
    "RetrievalMetrics",
    "recall_at_k_vs_exact",
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
