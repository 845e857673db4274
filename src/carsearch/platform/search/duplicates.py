"""Near-duplicate images in a collection: groups of images whose stored vectors have a
cosine of at least a threshold (`DUPLICATE_COSINE` by default). The same content is
already one row (an image's id is its sha256's within a collection).

Read from the serving collection a page at a time; pairs found with an exact FAISS
range search over all its vectors (the whole collection in memory: 100k x 192 floats is
77 MB); groups are the connected components of those pairs (union-find), largest first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from carsearch.platform.db import Database, images
from carsearch.platform.vectors.protocol import VectorStore


@dataclass(frozen=True)
class DuplicateGroup:
    """One kept image and the images that duplicate it (cosine to at least one of the
    group at or above the threshold)."""

    keep: int
    others: tuple[int, ...]
    min_cosine: float

    @property
    def size(self) -> int:
        return 1 + len(self.others)


def _vectors(store: VectorStore, collection: str, batch: int = 10_000
             ) -> tuple[np.ndarray, np.ndarray]:
    ids: list[int] = []
    vecs: list[np.ndarray] = []
    for page in store.scan(collection, ["id", "vector"], batch=batch):
        ids.extend(int(r["id"]) for r in page)
        vecs.append(np.asarray([r["vector"] for r in page], dtype=np.float32))
    if not ids:
        return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
    return np.asarray(ids, dtype=np.int64), np.concatenate(vecs)


def _pairs(vecs: np.ndarray, threshold: float, chunk: int = 4096
           ) -> Iterator[tuple[int, int, float]]:
    import faiss

    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs))
    for start in range(0, len(vecs), chunk):
        lims, dist, found = index.range_search(
            np.ascontiguousarray(vecs[start:start + chunk]), float(threshold))
        for q in range(len(lims) - 1):
            a = start + q
            for j in range(lims[q], lims[q + 1]):
                b = int(found[j])
                if b > a:
                    yield a, b, float(dist[j])


def find_duplicates(db: Database, store: VectorStore, collection: str,
                    threshold: float) -> list[DuplicateGroup]:
    """The near-duplicate groups of a Milvus collection, largest first; each group keeps
    its earliest-ingested image (then the lowest id)."""
    ids, vecs = _vectors(store, collection)
    if not len(ids):
        return []
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    low: dict[int, float] = {}
    for a, b, cos in _pairs(vecs, threshold):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        r = root(a)
        low[r] = min(low.get(r, 1.0), low.pop(max(ra, rb), 1.0), cos)
    groups: dict[int, list[int]] = {}
    for i in range(len(ids)):
        groups.setdefault(root(i), []).append(i)
    multi = {r: m for r, m in groups.items() if len(m) > 1}
    rows = images.by_ids(db, [int(ids[i]) for m in multi.values() for i in m])
    out = []
    for r, members in multi.items():
        member_ids = [int(ids[i]) for i in members]
        member_ids.sort(key=lambda i: (rows[i].ingested_at.timestamp()
                                       if i in rows and rows[i].ingested_at else 0.0, i))
        out.append(DuplicateGroup(member_ids[0], tuple(member_ids[1:]),
                                  round(low.get(r, threshold), 6)))
    out.sort(key=lambda g: (-g.size, g.keep))
    return out
