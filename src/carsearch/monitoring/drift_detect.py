"""Drift detection: isolated clusters of new embeddings, by kNN density (numpy + FAISS).

Unit vectors, cosine = inner product:

1. Density of a point = the mean similarity to its ``k`` nearest *reference* neighbours.
2. The threshold is a low percentile of the reference set's own leave-one-out density, so
   "novel" means "sparser than all but ``percentile``% of the catalogue already is".
3. Novel new points are linked when one is among the other's ``k`` nearest novel points,
   their similarity reaches the same threshold (as close as catalogue neighbours normally
   are) and exceeds each one's similarity to its nearest reference (closer to each other
   than to anything indexed). The last rule keeps apart the sparse fringes of a known class
   that the reference sample covers thinly. Connected components are candidate clusters.
4. A component of at least ``min_cluster_size`` points is an *isolated cluster*: a group of
   new images dense among themselves and far from everything indexed before, which is what
   a vehicle the model has not seen looks like. Scattered novel points (and smaller
   components) are noise: odd photos, not a new vehicle.

The job that reads the vectors and records reports is ``carsearch.monitoring.drift``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["EXAMPLES", "DriftDetection", "IsolatedCluster", "detect_drift", "knn_density"]

EXAMPLES = 10  # member image ids kept per cluster in the report

@dataclass
class IsolatedCluster:
    """A group of new images dense among themselves and far from the reference set."""

    size: int
    member_ids: list[int]  # up to EXAMPLES, the most central first
    mean_density: float  # members' mean kNN similarity to the references (under threshold)
    cohesion: float  # members' mean similarity to the cluster's centroid
    nearest_reference_id: int | None  # the reference image nearest to the centroid
    nearest_similarity: float | None
    nearest_class_name: str | None = None  # filled in by the job from the images table
    nearest_make: str | None = None
    # Every member's id, the most central first (the labelling task's images; left out of
    # the report, which keeps the examples above).
    all_ids: list[int] = field(default_factory=list, repr=False)


@dataclass
class DriftDetection:
    """What ``detect_drift`` found, with the thresholds it used."""

    k: int  # neighbours actually used (k capped by the reference size)
    percentile: float
    min_cluster_size: int
    threshold: float  # density under which a new point is novel; also the link level
    n_reference: int
    n_new: int
    n_novel: int
    n_noise: int  # novel points outside every isolated cluster
    reference_density: dict[str, float]
    new_density: dict[str, float]
    clusters: list[IsolatedCluster] = field(default_factory=list)

    @property
    def n_isolated(self) -> int:
        return len(self.clusters)

    @property
    def novel_fraction(self) -> float:
        return self.n_novel / self.n_new if self.n_new else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for c in d.get("clusters") or []:
            c.pop("all_ids", None)  # the labelling task holds them
        d["n_isolated"] = self.n_isolated
        d["novel_fraction"] = self.novel_fraction
        d["expected_novel_fraction"] = self.percentile / 100.0
        return d


def _unit_matrix(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {arr.shape}")
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contain NaN or infinity")
    if len(arr) and not np.allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-3):
        raise ValueError(f"{name} must be L2-normalised")
    return arr


def _flat_index(vectors: np.ndarray) -> Any:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def knn_density(
    reference: np.ndarray, queries: np.ndarray | None, k: int, *, index: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(density, nearest_similarity, nearest_row)`` of each query: its mean similarity to
    its ``k`` nearest references, the similarity to the nearest one and that one's row.
    ``queries=None`` means the references themselves, each left out of its own neighbours
    (leave-one-out density)."""
    index = index if index is not None else _flat_index(reference)
    if queries is not None:
        sims, rows = index.search(queries, k)
    else:
        n = len(reference)
        sims, rows = index.search(reference, k + 1)
        keep = rows != np.arange(n)[:, None]
        # Exact duplicates can push a point's own row out of its k + 1: then drop the last.
        keep[keep.all(axis=1), -1] = False
        sims, rows = sims[keep].reshape(n, k), rows[keep].reshape(n, k)
    return sims.mean(axis=1, dtype=np.float64), sims[:, 0].astype(np.float64), rows[:, 0]


def _stats(x: np.ndarray) -> dict[str, float]:
    if not len(x):
        return {}
    p5, p50 = np.percentile(x, [5, 50])
    return {"min": float(x.min()), "p5": float(p5), "p50": float(p50), "mean": float(x.mean())}


def _components(novel: np.ndarray, nearest_ref: np.ndarray, k: int, level: float) -> np.ndarray:
    """Component labels of the novel points' kNN graph. Two points are linked when one is
    among the other's ``k`` nearest, their similarity reaches ``level`` and they are closer
    to each other than either is to its nearest reference (isolated *together*)."""
    m = len(novel)
    kk = min(k, m - 1)
    sims, rows = _flat_index(novel).search(novel, kk + 1)
    src = np.repeat(np.arange(m), kk + 1)
    dst, w = rows.ravel(), sims.ravel()
    ok = (dst >= 0) & (dst != src) & (w >= level)
    ok &= (w > nearest_ref[src]) & (w > nearest_ref[np.where(dst >= 0, dst, 0)])
    graph = coo_matrix((np.ones(int(ok.sum())), (src[ok], dst[ok])), shape=(m, m))
    _, labels = connected_components(graph, directed=True, connection="weak")
    return np.asarray(labels)


def _cluster(
    members: np.ndarray, vectors: np.ndarray, ids: np.ndarray, density: np.ndarray,
    ref_index: Any, ref_ids: np.ndarray | None,
) -> IsolatedCluster:
    x = vectors[members]
    centroid = x.mean(axis=0)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    to_centre = x @ centroid
    everyone = np.argsort(-to_centre, kind="stable")
    order = everyone[:EXAMPLES]
    sim, row = ref_index.search(centroid[None, :].astype(np.float32), 1)
    r = int(row[0, 0])
    return IsolatedCluster(
        size=len(members),
        member_ids=[int(ids[members[i]]) for i in order],
        all_ids=[int(ids[members[i]]) for i in everyone],
        mean_density=float(density[members].mean()),
        cohesion=float(to_centre.mean()),
        nearest_reference_id=(int(ref_ids[r]) if ref_ids is not None else r) if r >= 0 else None,
        nearest_similarity=float(sim[0, 0]) if r >= 0 else None,
    )


def detect_drift(
    reference: np.ndarray,
    new: np.ndarray,
    *,
    new_ids: Sequence[int] | np.ndarray | None = None,
    reference_ids: Sequence[int] | np.ndarray | None = None,
    k: int = 10,
    percentile: float = 5.0,
    min_cluster_size: int = 5,
) -> DriftDetection:
    """Find isolated clusters of ``new`` unit vectors relative to ``reference`` (see the
    module docstring). Ids default to row numbers. Needs more than one reference vector."""
    ref = _unit_matrix(reference, "reference vectors")
    cur = _unit_matrix(new, "new vectors")
    if len(ref) < 2:
        raise ValueError("drift detection needs at least two reference vectors")
    if cur.shape[1] != ref.shape[1]:
        raise ValueError(f"new vectors have dimension {cur.shape[1]}, references {ref.shape[1]}")
    if k < 1 or min_cluster_size < 2 or not 0.0 < percentile < 100.0:
        raise ValueError("need k >= 1, min_cluster_size >= 2 and 0 < percentile < 100")
    ids = np.arange(len(cur)) if new_ids is None else np.asarray(new_ids, dtype=np.int64)
    rids = None if reference_ids is None else np.asarray(reference_ids, dtype=np.int64)
    if len(ids) != len(cur) or (rids is not None and len(rids) != len(ref)):
        raise ValueError("ids and vectors differ in length")
    k_used = min(k, len(ref) - 1)
    ref_index = _flat_index(ref)
    ref_density, _, _ = knn_density(ref, None, k_used, index=ref_index)
    threshold = float(np.percentile(ref_density, percentile))
    if len(cur):
        new_density, nearest, _ = knn_density(ref, cur, k_used, index=ref_index)
    else:
        new_density, nearest = np.empty(0), np.empty(0)
    novel = np.flatnonzero(new_density < threshold)
    clusters: list[IsolatedCluster] = []
    if len(novel) >= min_cluster_size:
        labels = _components(cur[novel], nearest[novel], max(k_used, min_cluster_size),
                             threshold)
        for label in np.unique(labels):
            members = novel[labels == label]
            if len(members) >= min_cluster_size:
                clusters.append(_cluster(members, cur, ids, new_density, ref_index, rids))
    clusters.sort(key=lambda c: (-c.size, c.mean_density))
    return DriftDetection(
        k=k_used,
        percentile=float(percentile),
        min_cluster_size=min_cluster_size,
        threshold=threshold,
        n_reference=len(ref),
        n_new=len(cur),
        n_novel=len(novel),
        n_noise=len(novel) - sum(c.size for c in clusters),
        reference_density=_stats(ref_density),
        new_density=_stats(new_density),
        clusters=clusters,
    )
