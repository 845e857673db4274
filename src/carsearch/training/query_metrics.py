"""Per-query retrieval metrics and bootstrap intervals over queries.

`per_query` scores each query against every item (class-level relevance: an item is
relevant when its class is the query's) and returns R@K and average precision per query;
`bootstrap` resamples the queries to give a 95 % interval of each mean. The aggregates
equal `platform.metrics.retrieval_metrics` (tests check this).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def per_query(
    scores: np.ndarray, query_classes: Sequence[int], item_classes: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, np.ndarray]:
    """R@K (1 if a relevant item is in the top K) and AP of each query."""
    scores = np.asarray(scores, dtype=np.float64)
    items = np.asarray(item_classes)
    out: dict[str, list[float]] = {f"recall@{k}": [] for k in ks}
    out["AP"] = []
    for row, cls in zip(scores, query_classes, strict=True):
        order = np.argsort(-row, kind="stable")
        rel = items[order] == cls
        n_rel = int(rel.sum())
        if n_rel == 0:
            raise ValueError(f"query class {cls} has no relevant item")
        first = int(np.argmax(rel))
        for k in ks:
            out[f"recall@{k}"].append(1.0 if first < k else 0.0)
        hits = np.cumsum(rel)
        out["AP"].append(float((hits[rel] / (np.flatnonzero(rel) + 1)).sum() / n_rel))
    return {k: np.asarray(v) for k, v in out.items()}


def bootstrap(
    values: dict[str, np.ndarray], n: int = 2000, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """(mean, 2.5 %, 97.5 %) of each metric, resampling queries with replacement."""
    rng = np.random.default_rng(seed)
    first = next(iter(values.values()))
    idx = rng.integers(0, len(first), size=(n, len(first)))
    out = {}
    for name, v in values.items():
        means = v[idx].mean(axis=1)
        out[name] = (float(v.mean()), float(np.percentile(means, 2.5)),
                     float(np.percentile(means, 97.5)))
    return out
