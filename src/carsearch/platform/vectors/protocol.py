"""The store boundary: what the platform asks of a vector database, and what only
lifecycle and operations code may ask of it.

`VectorStore` is the data path: collections, rows, searches, full scans, and the few
decisions a store makes for itself (sealing small writes, keeping a search cache for the
collections that serve). Every caller is typed against it; the search service and the
ingest pipeline see nothing else. `VectorAdmin` is Milvus's administration (the serving
alias, flushes after bulk loads, index description, what answers searches, the
deployment shape), for lifecycle, backup, monitoring and the status page; `Platform.admin`
hands it out. The implementations: the Milvus adapter (vectors.milvus, a Lite file or a
server), the exact in-memory mirror over it for Lite (vectors.mirror) and the in-memory
`ExactStore` (vectors.memory), on which the tests run the whole platform to show nothing
reaches past these Protocols.

One collection per model version. Vectors are L2-normalised float32 and compared by
inner product, so scores are cosine similarities.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from carsearch.platform.errors import CarsearchError
from carsearch.platform.vectors.filters import SCALAR_FIELDS, SearchFilters

Consistency = Literal["Strong", "Session", "Bounded", "Eventually"]

# Consistency (a Milvus server; Milvus Lite, one process, always reads its own writes).
# Reads that must see every write finished before them (reconcile's id sets, re-index
# skip sets, counts, full scans, the drift job's reads) use Strong: the server waits for
# its time tick to pass the request's timestamp (200-400 ms a call on a 2.3 standalone
# here). Searches use SEARCH_CONSISTENCY by default (Settings.milvus_consistency).
STRONG: Consistency = "Strong"
SERVING_ALIAS = "carsearch_serving"


class VectorStoreError(CarsearchError):
    """The vector database failed or is unreachable."""


@dataclass(frozen=True)
class VectorRow:
    """The scalar fields stored beside a vector ("" / 0 where unknown)."""

    make: str = ""
    body: str = ""
    colour: str = ""
    source: str = ""
    year: int = 0

    def as_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"year": int(self.year or 0)}
        for name, max_len in SCALAR_FIELDS.items():
            out[name] = str(getattr(self, name) or "")[:max_len]
        return out


@dataclass(frozen=True)
class Hit:
    id: int
    score: float
    fields: dict[str, Any] = field(default_factory=dict)


def has_rows(ids: Sequence[int], vectors: np.ndarray, rows: Sequence[VectorRow]) -> bool:
    """Whether an upsert has anything to write; its three parts must be of one length."""
    if not (len(ids) == len(rows) == len(vectors)):
        raise ValueError("ids, vectors and rows differ in length")
    return bool(len(ids))


def check_vectors(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    arr = np.ascontiguousarray(vectors, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"vectors have dimension {arr.shape[1]}, collection has {dim}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("vectors contain NaN or infinity")
    norms = np.linalg.norm(arr, axis=1)
    if arr.shape[0] and not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError("vectors must be L2-normalised")
    return arr


class VectorStore(Protocol):
    """What the platform needs from a vector database: the data path.

    Besides rows and searches, a store makes three decisions of its own, so that no
    caller needs to know which store it holds: whether small writes need sealing
    (`settle`), whether and when to keep a search cache (`prepare`, `retain`), and what
    answered a search (`search_path`, for the latency histogram)."""

    uri: str

    def has_collection(self, name: str) -> bool: ...

    def list_collections(self) -> list[str]: ...

    def ensure_collection(self, name: str, dim: int) -> None: ...

    def dimension(self, name: str) -> int: ...

    def upsert(
        self, name: str, ids: Sequence[int], vectors: np.ndarray, rows: Sequence[VectorRow]
    ) -> int: ...

    def delete(self, name: str, ids: Sequence[int]) -> None: ...

    def settle(self, name: str) -> None:
        """Small writes just made should be searched at full speed: a store that
        brute-forces unsealed rows (Milvus Lite) seals them now; others do nothing."""
        ...

    def search(
        self, name: str, vectors: np.ndarray, k: int, filters: SearchFilters | None = None
    ) -> list[list[Hit]]: ...

    def count(self, name: str, *, consistency: Consistency = "Strong") -> int: ...

    def ids(self, name: str, batch: int = 10_000) -> set[int]: ...

    def scan(
        self, name: str, fields: Sequence[str], *, batch: int = 10_000,
        stop: threading.Event | None = None,
    ) -> Iterator[list[dict[str, Any]]]: ...

    def vectors(
        self, name: str, ids: Sequence[int], *, batch: int = 1000,
        consistency: Consistency | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def drop(self, name: str) -> None: ...

    def prepare(self, names: Iterable[str], *, wait: bool = False) -> None:
        """A long-running process will serve searches on ``names``: a store that answers
        from a cache (the mirror) builds theirs now (in the background unless ``wait``)
        and from then on builds a collection's cache on its first search. Others do
        nothing."""
        ...

    def retain(self, names: Iterable[str]) -> None:
        """Only ``names`` serve now: a store with a search cache frees the caches of every
        other collection (the collections themselves stay). Others do nothing."""
        ...

    def search_path(self, name: str) -> str:
        """What answers searches on ``name`` now, as a metric label: ``mirror``,
        ``milvus_lite``, ``milvus_server`` or ``memory``."""
        ...

    def close(self) -> None: ...


class VectorAdmin(Protocol):
    """Milvus's administration, apart from the data path: lifecycle (promotion's alias
    switch, re-index and reconcile flushes), backup, monitoring (the ANN audit's index
    description, the deployment shape) and the status page use it, through
    `Platform.admin`; the search service and ingest never do."""

    uri: str
    is_lite: bool  # one process holds it (a Lite file): it sees every write

    def flush(self, name: str) -> None:
        """Seal what was written (after a bulk load), so that its index is built."""
        ...

    def alias_target(self, alias: str = SERVING_ALIAS) -> str | None: ...

    def point_alias(self, collection: str, alias: str = SERVING_ALIAS) -> None: ...

    def index_info(self, name: str) -> dict[str, Any]: ...

    def search_backend(self, name: str) -> str:
        """What answers searches on ``name``, in words, for the status page."""
        ...


class ManagedStore(VectorStore, VectorAdmin, Protocol):
    """A store with its administration: what `Platform` is built on (every
    implementation here is one)."""
