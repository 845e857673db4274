"""Vector store: a small Protocol and its Milvus adapter (Milvus Lite file or server).

One collection per model version. Vectors are L2-normalised float32 and compared by
inner product, so scores are cosine similarities. Each row carries the scalar fields
that filters use (make, body, year, colour, source); filter values are validated and
quoted here, never pasted into an expression as typed.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from carsearch.platform.errors import CarsearchError, QueryError

log = logging.getLogger(__name__)

SCALAR_FIELDS: dict[str, int] = {"make": 64, "body": 32, "colour": 32, "source": 64}
# Letters (any script), digits, space and a few joiners: everything a make, body type,
# colour or source name needs, and nothing an expression could be built from.
_SAFE_VALUE = re.compile(r"^[\w][\w .\-/&']{0,63}$", re.UNICODE)


class VectorStoreError(CarsearchError):
    """The vector database failed or is unreachable."""


class SearchFilters(BaseModel):
    """Typed metadata filters. Lists mean "any of"; an empty list means no filter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    make: tuple[str, ...] = ()
    body: tuple[str, ...] = ()
    colour: tuple[str, ...] = ()
    source: tuple[str, ...] = ()
    year_min: int | None = Field(default=None, ge=1886, le=2100)
    year_max: int | None = Field(default=None, ge=1886, le=2100)

    @field_validator("make", "body", "colour", "source", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        if v is None:
            return ()
        if isinstance(v, str):
            return (v,)
        return v

    @field_validator("make", "body", "colour", "source")
    @classmethod
    def _safe_values(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) > 32:
            raise ValueError("at most 32 values per filter")
        out = []
        for item in v:
            item = item.strip()
            if not _SAFE_VALUE.fullmatch(item):
                raise ValueError(f"unusable filter value {item!r}")
            out.append(item)
        return tuple(out)

    @model_validator(mode="after")
    def _year_order(self) -> SearchFilters:
        lo, hi = self.year_min, self.year_max
        if lo is not None and hi is not None and lo > hi:
            raise ValueError("year_min is after year_max")
        return self

    def is_empty(self) -> bool:
        return not (self.make or self.body or self.colour or self.source) and (
            self.year_min is None and self.year_max is None
        )


def _quote(value: str) -> str:
    # A JSON string literal is a valid Milvus string literal: quotes and backslashes
    # are escaped. Values were already checked against _SAFE_VALUE.
    return json.dumps(value, ensure_ascii=False)


def build_filter_expression(filters: SearchFilters | None) -> str:
    """The Milvus boolean expression for typed filters ("" for none)."""
    if filters is None or filters.is_empty():
        return ""
    clauses: list[str] = []
    for name in ("make", "body", "colour", "source"):
        values: tuple[str, ...] = getattr(filters, name)
        if values:
            clauses.append(f"{name} in [{', '.join(_quote(v) for v in values)}]")
    if filters.year_min is not None:
        clauses.append(f"year >= {int(filters.year_min)}")
    if filters.year_max is not None:
        clauses.append(f"year <= {int(filters.year_max)}")
    return " and ".join(clauses)


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


IndexType = Literal["FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX"]


@dataclass(frozen=True)
class IndexSpec:
    """How a collection's vector field is indexed and searched."""

    type: IndexType = "FLAT"
    params: dict[str, int] = field(default_factory=dict)
    search_params: dict[str, int] = field(default_factory=dict)

    @classmethod
    def default_for(cls, lite: bool) -> IndexSpec:
        """HNSW (M 16, efConstruction 200, ef 64) on Lite and server alike.

        Measured on Milvus Lite 3.2.2 (docs/BENCHMARKS.md): recall@10 >= 0.996 at 10k and
        100k rows, with single-query latency no worse than IVF_FLAT; FLAT copies every
        vector per query and is the slowest beyond a few thousand rows.
        """
        del lite  # same choice for both today; kept so callers state where they run
        return cls("HNSW", {"M": 16, "efConstruction": 200}, {"ef": 64})


def lite_index_params(params: dict[str, int]) -> dict[str, Any]:
    """Index build parameters in a form both Milvus Lite and a server read.

    pymilvus 3.0 flattens ``params`` into top-level pairs (``nlist=1024``), which a server
    reads but Milvus Lite 3.2.2 ignores (it reads only a JSON ``params`` key, and silently
    falls back to its defaults). Sending both forms works on both.
    """
    return {**params, "params": dict(params)} if params else {}


def lite_file_in_use(uri: str) -> bool:
    """Whether another process holds the lock of a Milvus Lite file (a directory with a
    LOCK file that Milvus Lite holds with flock while it has the file open)."""
    import fcntl
    import os

    lock = os.path.join(uri, "LOCK")
    if not os.path.isfile(lock):
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class VectorStore(Protocol):
    def ensure_collection(self, name: str, dim: int) -> None: ...

    def upsert(
        self, name: str, ids: Sequence[int], vectors: np.ndarray, rows: Sequence[VectorRow]
    ) -> int: ...

    def delete(self, name: str, ids: Sequence[int]) -> None: ...

    def search(
        self, name: str, vectors: np.ndarray, k: int, filters: SearchFilters | None = None
    ) -> list[list[Hit]]: ...

    def count(self, name: str) -> int: ...

    def drop(self, name: str) -> None: ...

    def vectors(
        self, name: str, ids: Sequence[int], *, batch: int = 1000
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def search_backend(self, name: str) -> str: ...


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


class MilvusStore:
    """The Milvus adapter: a Milvus Lite file path or an http(s):// server URI."""

    def __init__(self, uri: str, *, token: str = "", index: IndexSpec | None = None) -> None:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        self.uri = uri
        self.is_lite = not uri.startswith(("http://", "https://", "tcp://", "unix://"))
        self.index = index or IndexSpec.default_for(self.is_lite)
        self._loaded: set[str] = set()
        self._dims: dict[str, int] = {}
        self._lock = threading.Lock()
        self._create_lock = threading.Lock()
        if self.is_lite:
            from pathlib import Path

            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = MilvusClient(uri=uri, token=token)
        except MilvusException as exc:
            if self.is_lite and lite_file_in_use(uri):
                raise VectorStoreError(
                    f"cannot open the Milvus Lite file {uri}: another process has it open "
                    "(one process may open a Lite file at a time; stop that process, or run "
                    "the ingest worker inside the page with `carsearch serve --ingest`)"
                ) from None
            raise VectorStoreError(f"cannot open Milvus at {uri}: {exc.message}") from None

    # -- collections -------------------------------------------------------------
    def has_collection(self, name: str) -> bool:
        return bool(self.client.has_collection(name))

    def list_collections(self) -> list[str]:
        return list(self.client.list_collections())

    def ensure_collection(self, name: str, dim: int) -> None:
        """Create the collection if it does not exist; check its dimension if it does.

        Threads of one process take turns (the lock); a worker in another process that
        creates it at the same moment makes our create fail, after which it exists.
        """
        with self._create_lock:
            if self.has_collection(name):
                have = self.dimension(name)
                if have != dim:
                    raise VectorStoreError(
                        f"collection {name} has dimension {have}, model gives {dim}"
                    )
                return
            self._create_collection(name, dim)

    def _create_collection(self, name: str, dim: int) -> None:
        from pymilvus import DataType, MilvusClient
        from pymilvus.exceptions import MilvusException

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        for fname, max_len in SCALAR_FIELDS.items():
            schema.add_field(fname, DataType.VARCHAR, max_length=max_len)
        schema.add_field("year", DataType.INT64)
        params = self.client.prepare_index_params()
        params.add_index(
            field_name="vector",
            index_type=self.index.type,
            metric_type="IP",
            params=lite_index_params(self.index.params),
        )
        try:
            self.client.create_collection(name, schema=schema, index_params=params)
        except MilvusException:
            for _ in range(20):  # another process won the race: wait until it is visible
                if self.has_collection(name):
                    return
                time.sleep(0.1)
            raise
        log.info("created collection %s (dim %d, IP, %s)", name, dim, self.index.type)
        self._dims[name] = dim

    def dimension(self, name: str) -> int:
        if name not in self._dims:
            desc = self.client.describe_collection(name)
            for f in desc["fields"]:
                if f["name"] == "vector":
                    self._dims[name] = int(f["params"]["dim"])
        return self._dims[name]

    def _ensure_loaded(self, name: str) -> None:
        if name in self._loaded:
            return
        with self._lock:
            if name not in self._loaded:
                if not self.has_collection(name):
                    raise VectorStoreError(f"no collection {name} in Milvus at {self.uri}")
                self.client.load_collection(name)
                self._loaded.add(name)

    def drop(self, name: str) -> None:
        if self.has_collection(name):
            self.client.drop_collection(name)
        self._loaded.discard(name)
        self._dims.pop(name, None)

    # -- rows ----------------------------------------------------------------------
    def upsert(
        self, name: str, ids: Sequence[int], vectors: np.ndarray, rows: Sequence[VectorRow]
    ) -> int:
        if not (len(ids) == len(rows) == len(vectors)):
            raise ValueError("ids, vectors and rows differ in length")
        if not len(ids):
            return 0
        self._ensure_loaded(name)
        arr = check_vectors(vectors, self.dimension(name))
        data = [
            {"id": int(i), "vector": arr[j].tolist(), **rows[j].as_fields()}
            for j, i in enumerate(ids)
        ]
        res = self.client.upsert(name, data)
        return int(res.get("upsert_count", len(data)))

    def flush(self, name: str) -> None:
        """Seal growing segments: searches on unflushed rows are far slower."""
        self.client.flush(name)

    def delete(self, name: str, ids: Sequence[int]) -> None:
        if not len(ids):
            return
        self._ensure_loaded(name)
        self.client.delete(name, ids=[int(i) for i in ids])

    def count(self, name: str) -> int:
        if not self.has_collection(name):
            return 0
        self._ensure_loaded(name)
        res = self.client.query(name, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def ids(self, name: str, batch: int = 10_000) -> set[int]:
        """Every primary key in a collection (for reconcile)."""
        self._ensure_loaded(name)
        out: set[int] = set()
        it = self.client.query_iterator(name, batch_size=batch, filter="", output_fields=["id"])
        try:
            while True:
                page = it.next()
                if not page:
                    break
                out.update(int(r["id"]) for r in page)
        finally:
            it.close()
        return out

    def search(
        self, name: str, vectors: np.ndarray, k: int, filters: SearchFilters | None = None
    ) -> list[list[Hit]]:
        """Top-k hits per query vector, best first (Milvus's ANN search here)."""
        return self.search_ann(name, vectors, k, filters)

    def search_backend(self, name: str) -> str:
        """What answers searches on ``name``, for the status page."""
        del name
        return f"Milvus {'Lite' if self.is_lite else 'server'}, {self.index.type}"

    def search_ann(
        self, name: str, vectors: np.ndarray, k: int, filters: SearchFilters | None = None
    ) -> list[list[Hit]]:
        """Milvus's own search, whatever serves `search` (the ANN audit measures this)."""
        if k < 1:
            raise QueryError("k must be at least 1")
        self._ensure_loaded(name)
        arr = check_vectors(vectors, self.dimension(name))
        res = self.client.search(
            name,
            data=[v.tolist() for v in arr],
            limit=int(k),
            filter=build_filter_expression(filters),
            output_fields=[*SCALAR_FIELDS, "year"],
            search_params={"metric_type": "IP", "params": dict(self.index.search_params)},
        )
        return [
            [Hit(id=int(h["id"]), score=float(h["distance"]), fields=dict(h["entity"])) for h in q]
            for q in res
        ]

    def close(self) -> None:
        """Close the client; for Milvus Lite also stop its in-process server, which
        releases the file lock so that another process (a restarted worker) can open it."""
        self.client.close()
        if self.is_lite:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)
        self._loaded.clear()

    def vectors(
        self, name: str, ids: Sequence[int], *, batch: int = 1000
    ) -> tuple[np.ndarray, np.ndarray]:
        """The stored vectors of ``ids``: ``(ids found (int64), float32 (n, dim))``, in the
        order asked (repeats once); ids the collection does not hold are left out. Ids are
        cast to int, so the ``id in [...]`` expression is built from numbers only."""
        self._ensure_loaded(name)
        dim = self.dimension(name)
        wanted = list(dict.fromkeys(int(i) for i in ids))
        found: dict[int, list[float]] = {}
        batch = max(1, batch)
        for start in range(0, len(wanted), batch):
            chunk = wanted[start:start + batch]
            rows = self.client.query(
                name, filter=f"id in [{', '.join(str(i) for i in chunk)}]",
                output_fields=["id", "vector"],
            )
            found.update((int(r["id"]), r["vector"]) for r in rows)
        order = [i for i in wanted if i in found]
        matrix = np.asarray([found[i] for i in order], dtype=np.float32).reshape(-1, dim)
        return np.asarray(order, dtype=np.int64), matrix
