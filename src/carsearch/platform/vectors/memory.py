"""An in-memory vector store: the second implementation of the VectorStore and
VectorAdmin Protocols (vectors.protocol).

Each collection is a :class:`VectorMirror` (an exact FAISS ``IndexFlatIP`` with the filter
fields beside it), so searches are exact and filters mean what the Milvus expression
means. Nothing is persisted. The tests run the whole platform (ingest, search, promotion,
reconcile) on it, which shows that no caller reaches past the Protocol into Milvus.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from carsearch.platform.errors import QueryError
from carsearch.platform.vectors.filters import SearchFilters
from carsearch.platform.vectors.mirror import VectorMirror
from carsearch.platform.vectors.protocol import (
    SERVING_ALIAS,
    Consistency,
    Hit,
    VectorRow,
    VectorStoreError,
    check_vectors,
    has_rows,
)


class ExactStore:
    """Collections held in this process's memory, searched exactly."""

    def __init__(self, uri: str = "memory://") -> None:
        self.uri = uri
        self.is_lite = True  # one process sees every write
        self._collections: dict[str, VectorMirror] = {}
        self._aliases: dict[str, str] = {}
        self._lock = threading.RLock()

    def _get(self, name: str) -> VectorMirror:
        name = self._aliases.get(name, name)
        try:
            return self._collections[name]
        except KeyError:
            raise VectorStoreError(f"no collection {name} in {self.uri}") from None

    def has_collection(self, name: str) -> bool:
        return name in self._collections

    def list_collections(self) -> list[str]:
        return sorted(self._collections)

    def ensure_collection(self, name: str, dim: int) -> None:
        with self._lock:
            have = self._collections.setdefault(name, VectorMirror(dim))
        if have.dim != dim:
            raise VectorStoreError(f"collection {name} has dimension {have.dim}, model gives {dim}")

    def dimension(self, name: str) -> int:
        return self._get(name).dim

    def upsert(
        self, name: str, ids: Sequence[int], vectors: np.ndarray, rows: Sequence[VectorRow]
    ) -> int:
        if not has_rows(ids, vectors, rows):
            return 0
        mirror = self._get(name)
        arr = check_vectors(vectors, mirror.dim)
        with self._lock:
            mirror.upsert(ids, arr, rows)
        return len(ids)

    def delete(self, name: str, ids: Sequence[int]) -> None:
        with self._lock:
            self._get(name).delete(ids)

    def flush(self, name: str) -> None:
        self._get(name)

    def settle(self, name: str) -> None:
        self._get(name)

    def prepare(self, names: Iterable[str], *, wait: bool = False) -> None:
        del names, wait  # every collection is searched from memory already

    def retain(self, names: Iterable[str]) -> None:
        del names  # the collections are the data, not a cache: nothing to free

    def search_path(self, name: str) -> str:
        del name
        return "memory"

    def search(
        self, name: str, vectors: np.ndarray, k: int, filters: SearchFilters | None = None
    ) -> list[list[Hit]]:
        if k < 1:
            raise QueryError("k must be at least 1")
        mirror = self._get(name)
        with self._lock:
            return mirror.search(check_vectors(vectors, mirror.dim), k, filters)

    def count(self, name: str, *, consistency: Consistency = "Strong") -> int:
        del consistency
        return len(self._collections[name]) if name in self._collections else 0

    def ids(self, name: str, batch: int = 10_000) -> set[int]:
        return {int(i) for i in self._get(name).ids}

    def scan(
        self, name: str, fields: Sequence[str], *, batch: int = 10_000,
        stop: threading.Event | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        mirror = self._get(name)
        with self._lock:
            ids = mirror.ids.copy()
        for start in range(0, len(ids), batch):
            if stop is not None and stop.is_set():
                return
            chunk = ids[start:start + batch]
            _, vecs = mirror.vectors(chunk)
            rows = []
            for j, i in enumerate(chunk):
                hit = mirror.hit(mirror.position(int(i)), 0.0)
                row = {"id": int(i), "vector": vecs[j].tolist(), **hit.fields}
                rows.append({f: row[f] for f in ("id", *fields) if f in row})
            yield rows

    def vectors(
        self, name: str, ids: Sequence[int], *, batch: int = 1000,
        consistency: Consistency | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        del batch, consistency
        with self._lock:
            return self._get(name).vectors(ids)

    def drop(self, name: str) -> None:
        with self._lock:
            self._collections.pop(name, None)
            self._aliases = {a: c for a, c in self._aliases.items() if c != name}

    def search_backend(self, name: str) -> str:
        return f"in-memory exact store ({self.count(name):,} vectors)"

    def index_info(self, name: str) -> dict[str, Any]:
        self._get(name)
        return {"index_type": "FLAT"}

    def alias_target(self, alias: str = SERVING_ALIAS) -> str | None:
        return self._aliases.get(alias)

    def point_alias(self, collection: str, alias: str = SERVING_ALIAS) -> None:
        self._get(collection)
        self._aliases[alias] = collection

    def close(self) -> None:
        with self._lock:
            self._collections.clear()
            self._aliases.clear()
