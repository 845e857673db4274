"""The Milvus adapter: the VectorStore and VectorAdmin of a Milvus Lite file or a server.

One collection per model version, inner product on L2-normalised vectors; each row
carries the filter fields (vectors.filters), whose values reach an expression only as
`build_filter_expression` quotes them. Failures come back as `VectorStoreError`.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from carsearch.platform.errors import QueryError
from carsearch.platform.vectors.filters import (
    SCALAR_FIELDS,
    SearchFilters,
    build_filter_expression,
)
from carsearch.platform.vectors.protocol import (
    SERVING_ALIAS,
    STRONG,
    Consistency,
    Hit,
    VectorRow,
    VectorStoreError,
    check_vectors,
    has_rows,
)

log = logging.getLogger(__name__)

IndexType = Literal["FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX"]

# HNSW's search ef (settings.milvus_search_ef's default too). On a Milvus server at
# 100,000 rows of two trained models, text queries' recall@10 against FAISS exact was
# 0.92-0.98 at ef 64, 0.97-0.996 at 128 and 0.995-0.999 at 256, image queries 1.000 from
# ef 64; one query's p50 was level from ef 32 to 256 (4.5-4.9 ms) and 5.5 ms at 512
# (docs/BENCHMARKS.md, "The search ef and the interim index's nprobe").
DEFAULT_SEARCH_EF = 256
# HNSW's efConstruction on Milvus Lite, which builds the index in its one process: 100
# cut the build of 100,000 trained-model rows from 78.9 to 54.4 CPU s and the 100k
# restore from 118 to 84 CPU s (122 -> 88 s wall, goal 120), for text recall@10 at ef 256
# of 0.992-0.996 against 0.995-0.998 (docs/BENCHMARKS.md, "Restore onto Milvus Lite:
# the efConstruction lever, pulled"). Searches on Lite are mostly served by the exact
# mirror; the HNSW answers the ANN audit and mirror-less stores. A server keeps 200.
LITE_EF_CONSTRUCTION = 100


@dataclass(frozen=True)
class IndexSpec:
    """How a collection's vector field is indexed and searched."""

    type: IndexType = "FLAT"
    params: dict[str, int] = field(default_factory=dict)
    search_params: dict[str, int] = field(default_factory=dict)

    @classmethod
    def default_for(cls, lite: bool) -> IndexSpec:
        """HNSW (M 16, ef `DEFAULT_SEARCH_EF`) on Lite and server alike; efConstruction
        200 on a server, `LITE_EF_CONSTRUCTION` on Lite.

        Measured on Milvus Lite 3.2.2 (docs/BENCHMARKS.md): recall@10 >= 0.996 at 10k and
        100k rows, with single-query latency no worse than IVF_FLAT; FLAT copies every
        vector per query and is the slowest beyond a few thousand rows. The ef: text
        queries need more candidates than image queries (see `DEFAULT_SEARCH_EF`).
        """
        return cls("HNSW", {"M": 16, "efConstruction": LITE_EF_CONSTRUCTION if lite else 200},
                   {"ef": DEFAULT_SEARCH_EF})


# Milvus's upper bound on HNSW's ef (and on a search's limit, 16384, well above MAX_K).
HNSW_MAX_EF = 32768


def search_params_for(index: IndexSpec, k: int) -> dict[str, int]:
    """The search parameters of one search asking for ``k`` hits.

    HNSW returns at most ``ef`` candidates: with ef 64 a search for 600 of 600 rows gave
    469-503 hits on Milvus Lite 3.2.2 (tests/test_vectorstore.py), so a served evaluation
    that asks for every image got a truncated ranking. ``ef`` is therefore raised to ``k``
    where ``k`` is larger (Milvus's rule ef >= k: the 2.3 server applies it itself, Lite
    silently does not).
    """
    params = dict(index.search_params)
    if index.type == "HNSW":
        params["ef"] = min(max(int(params.get("ef", 0)), int(k)), HNSW_MAX_EF)
    return params


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


# The most rows a filtered search on Milvus Lite ranks exactly; a broader filter goes to
# the index (most of its candidates pass such a filter).
EXACT_FILTER_LIMIT = 4096
# ... and only in collections this small, where evaluating the filter is cheap.
EXACT_FALLBACK_MAX_ROWS = 20_000


_MVCC_FALLBACK = "failed to get mvccTs"


class _IteratorTimestampNote(logging.Filter):
    """pymilvus 3 asks the server for an MVCC timestamp to pin an iterator's snapshot;
    Milvus 2.3 and Milvus Lite return none, and pymilvus warns and falls back to the
    client's clock, which a Bounded read then ignores. Our scans ask for Strong
    consistency on every page instead, so the fallback changes nothing: the warning is
    replaced by one INFO line per process saying so."""

    noted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if _MVCC_FALLBACK not in record.getMessage():
            return True
        if not _IteratorTimestampNote.noted:
            _IteratorTimestampNote.noted = True
            log.info("this Milvus gives iterators no MVCC timestamp; full scans read each "
                     "page at Strong consistency instead of one snapshot")
        return False


_iterator_note = _IteratorTimestampNote()


def _milvus_errors(fn: Any) -> Any:
    """Turn pymilvus and gRPC failures into VectorStoreError (a one-line message)."""
    import functools

    @functools.wraps(fn)
    def wrapper(self: MilvusStore, *args: Any, **kwargs: Any) -> Any:
        import grpc
        from pymilvus.exceptions import MilvusException

        try:
            return fn(self, *args, **kwargs)
        except MilvusException as exc:
            raise VectorStoreError(
                f"Milvus at {self.uri}: {fn.__name__} failed: {exc.message}"
            ) from exc
        except grpc.RpcError as exc:  # pymilvus lets some through (a refused token)
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else type(exc).__name__
            hint = ("; check CARSEARCH_MILVUS_TOKEN(_FILE)"
                    if code == grpc.StatusCode.UNAUTHENTICATED else "")
            raise VectorStoreError(
                f"Milvus at {self.uri}: {fn.__name__} failed: "
                f"{code.name if code else 'gRPC error'}: {details}{hint}"
            ) from exc
    return wrapper


def _not_loaded(exc: Exception) -> bool:
    return "not loaded" in str(exc).lower()


class MilvusStore:
    """The Milvus adapter: a Milvus Lite file path or an http(s):// server URI."""

    def __init__(self, uri: str, *, token: str = "", index: IndexSpec | None = None,
                 consistency: Consistency = "Session") -> None:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException

        self.uri = uri
        self.is_lite = not uri.startswith(("http://", "https://", "tcp://", "unix://"))
        self.index = index or IndexSpec.default_for(self.is_lite)
        self.consistency: Consistency = consistency
        self._loaded: set[str] = set()
        self._deleted_from: set[str] = set()
        self._row_counts: dict[str, tuple[float, int]] = {}
        self._dims: dict[str, int] = {}
        self._lock = threading.Lock()
        self._create_lock = threading.Lock()
        if self.is_lite:
            from pathlib import Path

            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        for name in ("pymilvus.client.iterator.query_iterator", "pymilvus.client.iterator"):
            lg = logging.getLogger(name)
            if _iterator_note not in lg.filters:
                lg.addFilter(_iterator_note)
        # pymilvus 3 pings every 10 s, idle or not; a Milvus 2.3 server allows a ping per
        # 5 minutes (gRPC's default policy) and answers more with GOAWAY "too_many_pings",
        # which tore the connection down during long index builds here. Ping no more often
        # than the server allows.
        options = {} if self.is_lite else {"grpc_options": {
            "grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": 0}}
        try:
            self.client = MilvusClient(uri=uri, token=token, **options)
        except MilvusException as exc:
            if self.is_lite and lite_file_in_use(uri):
                raise VectorStoreError(
                    f"cannot open the Milvus Lite file {uri}: another process has it open "
                    "(one process may open a Lite file at a time; stop that process, or run "
                    "the ingest worker inside the page with `carsearch serve --ingest`)"
                ) from None
            hint = "" if self.is_lite else (
                "; a server with authentication on refuses a wrong or missing token this way: "
                "check CARSEARCH_MILVUS_TOKEN(_FILE)")
            raise VectorStoreError(f"cannot open Milvus at {uri}: {exc.message}{hint}") from None

    # -- collections -------------------------------------------------------------
    @_milvus_errors
    def has_collection(self, name: str) -> bool:
        return bool(self.client.has_collection(name))

    @_milvus_errors
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

    def scalar_index_types(self) -> dict[str, str]:
        """Scalar indexes on the filter fields, by what this Milvus supports.

        A 2.3 server has Trie (strings) and STL_SORT (numbers), 2.4 and later INVERTED.
        Milvus Lite, which filters in its own process, gets none (as before).
        """
        if self.is_lite:
            return {}
        version = str(self.client.get_server_version()).lstrip("v")
        major_minor = tuple(int(x) for x in re.findall(r"\d+", version)[:2]) or (2, 3)
        if major_minor >= (2, 4):
            return {**{f: "INVERTED" for f in SCALAR_FIELDS}, "year": "INVERTED"}
        return {**{f: "Trie" for f in SCALAR_FIELDS}, "year": "STL_SORT"}

    @_milvus_errors
    def _create_collection(self, name: str, dim: int) -> None:
        """Create, index, then load, each step idempotent: on a server two processes may
        create the same collection at once. (Handing the indexes to create_collection
        lets the first finisher load the collection while the other still adds scalar
        indexes, which Milvus then refuses: "can't change the index for loaded
        collection".) Every creator adds every index before it loads."""
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        for fname, max_len in SCALAR_FIELDS.items():
            schema.add_field(fname, DataType.VARCHAR, max_length=max_len)
        schema.add_field("year", DataType.INT64)
        self.client.create_collection(name, schema=schema)  # same schema again: no-op
        params = self.client.prepare_index_params()
        params.add_index(
            field_name="vector",
            index_type=self.index.type,
            metric_type="IP",
            params=lite_index_params(self.index.params),
        )
        scalars = self.scalar_index_types()
        for fname, kind in scalars.items():
            params.add_index(field_name=fname, index_type=kind)
        # sync=False: pymilvus would sleep 0.5 s per index before asking about it (3 s a
        # collection on a server). But a server registers the indexes one by one, and a
        # collection loaded before all are registered refuses every later upsert ("can't
        # change the index for loaded collection", seen under load): wait for all first.
        self.client.create_index(name, params, sync=False)
        self._await_indexes(name, 1 + len(scalars))
        self._load(name)
        self._loaded.add(name)
        log.info("created collection %s (dim %d, IP, %s)", name, dim, self.index.type)
        self._dims[name] = dim

    def _await_indexes(self, name: str, n: int, timeout_s: float = 60.0) -> None:
        """Until the server lists ``n`` indexes on ``name`` (Lite lists them at once)."""
        deadline = time.monotonic() + timeout_s
        while len(self.client.list_indexes(name)) < n:
            if time.monotonic() > deadline:
                raise VectorStoreError(f"Milvus at {self.uri}: the indexes of {name} were "
                                       f"not all registered within {timeout_s:g} s")
            time.sleep(0.05)

    def _await_creator(self, name: str, timeout_s: float = 15.0) -> None:
        """Before loading a collection this process did not create: wait until its
        creator (another process, or another client in this one) has registered every
        index. Loading it earlier pins the indexes it had then, and the creator's own
        load then fails ("can't change the index for loaded collection", seen in CI with
        two workers starting together). A collection made before the scalar indexes
        existed never reaches the count: after ``timeout_s`` it is loaded as it is."""
        if self.is_lite:
            return
        want = 1 + len(self.scalar_index_types())
        try:
            self._await_indexes(name, want, timeout_s)
        except VectorStoreError:
            have = len(self.client.list_indexes(name))
            log.warning("collection %s has %d of the %d indexes this version makes; "
                        "loading it as it is", name, have, want)

    @_milvus_errors
    def dimension(self, name: str) -> int:
        if name not in self._dims:
            desc = self.client.describe_collection(name)
            for f in desc["fields"]:
                if f["name"] == "vector":
                    self._dims[name] = int(f["params"]["dim"])
        return self._dims[name]

    def _ensure_loaded(self, name: str, *, again: bool = False) -> None:
        if name in self._loaded and not again:
            return
        with self._lock:
            if again or name not in self._loaded:
                if not self.has_collection(name):
                    raise VectorStoreError(f"no collection {name} in Milvus at {self.uri}")
                self._await_creator(name)
                self._load(name)
                self._loaded.add(name)

    def _load(self, name: str) -> None:
        """Load ``name``. "Can't change the index" means another process loaded it
        before its last index was registered (a creator older than this wait): it is
        loaded, with fewer indexes, and searches and upserts work on it."""
        from pymilvus.exceptions import MilvusException

        try:
            self.client.load_collection(name)
        except MilvusException as exc:
            if "can't change the index for loaded collection" not in str(exc):
                raise
            log.warning("collection %s was loaded elsewhere before all its indexes were "
                        "registered; using it as loaded", name)

    def _loaded_call(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` on a loaded collection; a server that restarted may have released
        it (our cache says loaded), so "not loaded" loads it again and retries once."""
        from pymilvus.exceptions import MilvusException

        self._ensure_loaded(name)
        try:
            return fn(*args, **kwargs)
        except MilvusException as exc:
            if not _not_loaded(exc):
                raise
            log.info("collection %s was released (a server restart?); loading it again", name)
            self._ensure_loaded(name, again=True)
            return fn(*args, **kwargs)

    @_milvus_errors
    def drop(self, name: str) -> None:
        """Drop a collection, its aliases first: Milvus 2.3 keeps a dropped collection's
        alias half alive (not listed, not describable, but "already exists" to create)."""
        if self.has_collection(name):
            for alias in self.client.list_aliases(name).get("aliases") or []:
                self.client.drop_alias(alias)
            self.client.drop_collection(name)
        self._loaded.discard(name)
        self._dims.pop(name, None)

    # -- the serving alias ---------------------------------------------------------
    @_milvus_errors
    def alias_target(self, alias: str = SERVING_ALIAS) -> str | None:
        """The collection an alias points to, or None when there is no such alias."""
        from pymilvus.exceptions import MilvusException

        try:
            aliases = self.client.list_aliases()
        except MilvusException:
            return None
        if alias not in (aliases.get("aliases") or []):
            return None
        return str(self.client.describe_alias(alias)["collection_name"])

    @_milvus_errors
    def point_alias(self, collection: str, alias: str = SERVING_ALIAS) -> None:
        """Make ``alias`` name ``collection``: one atomic switch on the server."""
        from pymilvus.exceptions import MilvusException

        current = self.alias_target(alias)
        if current == collection:
            return
        if current is not None:
            self.client.alter_alias(collection, alias)
        else:
            try:
                self.client.create_alias(collection, alias)
            except MilvusException as exc:
                if "exist" not in exc.message:
                    raise
                # The remains of an alias whose collection was dropped: clear, then create.
                self.client.drop_alias(alias)
                self.client.create_alias(collection, alias)
        log.info("alias %s -> %s (was %s)", alias, collection, current or "unset")

    # -- rows ----------------------------------------------------------------------
    @_milvus_errors
    def upsert(
        self, name: str, ids: Sequence[int], vectors: np.ndarray, rows: Sequence[VectorRow]
    ) -> int:
        if not has_rows(ids, vectors, rows):
            return 0
        arr = check_vectors(vectors, self.dimension(name))
        data = [
            {"id": int(i), "vector": arr[j].tolist(), **rows[j].as_fields()}
            for j, i in enumerate(ids)
        ]
        res = self._loaded_call(name, self.client.upsert, name, data)
        return int(res.get("upsert_count", len(data)))

    @_milvus_errors
    def flush(self, name: str) -> None:
        """Seal growing segments after a bulk load, so that their index is built. Milvus
        Lite brute-forces unflushed rows (far slower searches); a server seals segments
        itself as they fill and rate-limits flushes (0.5-3 s a call here), so the ingest
        worker flushes only Lite (``needs_flush``)."""
        self.client.flush(name)

    @property
    def needs_flush(self) -> bool:
        """Whether small writes should be sealed at once (Milvus Lite) or left to Milvus."""
        return self.is_lite

    def settle(self, name: str) -> None:
        """After small writes: Milvus Lite flushes (it brute-forces unsealed rows); a
        server seals segments itself and is left alone (``needs_flush``)."""
        if self.needs_flush:
            self.flush(name)

    # -- serving (no search cache here: vectors.mirror adds one) ---------------------
    def prepare(self, names: Iterable[str], *, wait: bool = False) -> None:
        del names, wait

    def retain(self, names: Iterable[str]) -> None:
        del names

    def search_path(self, name: str) -> str:
        del name
        return "milvus_lite" if self.is_lite else "milvus_server"

    @_milvus_errors
    def delete(self, name: str, ids: Sequence[int]) -> None:
        if not len(ids):
            return
        self._loaded_call(name, self.client.delete, name, ids=[int(i) for i in ids])
        self._deleted_from.add(name)

    def _read_consistency(self, name: str, asked: Consistency | None) -> Consistency:
        """The level of a read: the one asked for, else ``self.consistency``; but the
        first read after this process deleted from ``name`` is Strong. pymilvus's Session
        level follows the timestamps of inserts and upserts only (a 2.3 server returns
        none for a delete), so it would still show what we just deleted."""
        if name in self._deleted_from:
            self._deleted_from.discard(name)
            return STRONG
        return asked or self.consistency

    @_milvus_errors
    def count(self, name: str, *, consistency: Consistency = STRONG) -> int:
        if not self.has_collection(name):
            return 0
        res = self._loaded_call(name, self.client.query, name, filter="",
                                output_fields=["count(*)"], consistency_level=consistency)
        return int(res[0]["count(*)"])

    def scan(
        self, name: str, fields: Sequence[str], *, batch: int = 10_000,
        stop: threading.Event | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Every row of a collection, a page at a time: the one whole-collection read
        (reconcile's id set, re-index skip sets, the exact index, the search mirror).

        On a server, pages are read by primary key (``id > last``, at most ``batch``,
        ascending) at Strong consistency, so a scan sees every write finished before it
        started. pymilvus's query iterator cannot promise that against Milvus 2.3: it
        asks for an MVCC timestamp the server does not give, falls back to the client's
        clock, and its pages are then read at the collection's default (Bounded)
        consistency, which missed rows written a moment before in a test here. Milvus
        Lite (one process, every write visible at once) keeps the iterator, since its
        limited queries do not come back in key order.
        """
        self._ensure_loaded(name)
        pages = (self._lite_pages(name, fields, batch) if self.is_lite
                 else self._key_pages(name, fields, batch))
        for page in pages:
            if stop is not None and stop.is_set():
                return
            yield page

    @_milvus_errors
    def _key_pages(
        self, name: str, fields: Sequence[str], batch: int
    ) -> Iterator[list[dict[str, Any]]]:
        wanted = list(dict.fromkeys(["id", *fields]))
        expr = f"id >= {-(1 << 63) + 1}"  # Milvus cannot parse -2**63 itself
        while True:
            page = self._loaded_call(name, self.client.query, name, filter=expr,
                                     output_fields=wanted, limit=int(batch),
                                     consistency_level=STRONG)
            if not page:
                return
            keys = [int(r["id"]) for r in page]
            if any(b <= a for a, b in itertools.pairwise(keys)):
                raise VectorStoreError(f"Milvus at {self.uri} returned a page of {name} "
                                       "out of key order: cannot scan it by primary key")
            yield list(page)
            if len(page) < batch:
                return
            expr = f"id > {keys[-1]}"

    @_milvus_errors
    def _lite_pages(
        self, name: str, fields: Sequence[str], batch: int
    ) -> Iterator[list[dict[str, Any]]]:
        it = self.client.query_iterator(name, batch_size=batch, filter="",
                                        output_fields=list(fields))
        try:
            while True:
                page = it.next()
                if not page:
                    return
                yield list(page)
        finally:
            it.close()

    def ids(self, name: str, batch: int = 10_000) -> set[int]:
        """Every primary key in a collection (reconcile, re-index, the exact index)."""
        out: set[int] = set()
        for page in self.scan(name, ["id"], batch=batch):
            out.update(int(r["id"]) for r in page)
        return out

    def search(
        self, name: str, vectors: np.ndarray, k: int, filters: SearchFilters | None = None
    ) -> list[list[Hit]]:
        """Top-k hits per query vector, best first (Milvus's ANN search here).

        Milvus Lite 3.2.2's HNSW search with a filter is unreliable: at 10k rows, after
        the search mirror had been rebuilt from the collection, a filter that about 200
        rows meet gave 7-9 of the 12 hits asked for (tests/test_vectorstore.py), and
        relaxation would then read a short answer as "too few match". So on Lite a
        filtered search that comes back short is answered again exactly, when its filter
        selects at most `EXACT_FILTER_LIMIT` rows: those rows are read and ranked by inner
        product here. Lite evaluates a filter at about 5 µs a row (0.5 s at 100k), so only
        short answers in collections of at most `EXACT_FALLBACK_MAX_ROWS` rows pay for it;
        a full answer is kept as Milvus gave it, although one was also seen holding only 7
        of the true top 12. The search mirror (the page's default on Lite) is exact. A
        server's HNSW filters inside its graph search."""
        hits = self.search_ann(name, vectors, k, filters)
        expr = build_filter_expression(filters)
        if (not expr or not self.is_lite or all(len(h) >= k for h in hits)
                or self._rows_about(name) > EXACT_FALLBACK_MAX_ROWS):
            return hits
        exact = self._exact_where(name, vectors, k, expr)
        return hits if exact is None else exact

    def _rows_about(self, name: str, ttl_s: float = 60.0) -> int:
        """A collection's row count from Milvus's statistics, re-read at most every
        ``ttl_s`` (Lite takes ~75 ms for it at 100k rows)."""
        now = time.monotonic()
        cached = self._row_counts.get(name)
        if cached is None or now - cached[0] > ttl_s:
            stats = self.client.get_collection_stats(name)
            cached = (now, int(stats.get("row_count", 0)))
            self._row_counts[name] = cached
        return cached[1]

    @_milvus_errors
    def _exact_where(
        self, name: str, vectors: np.ndarray, k: int, expr: str
    ) -> list[list[Hit]] | None:
        """Exact top-k among the rows ``expr`` selects; None when more than
        `EXACT_FILTER_LIMIT` rows match (then the ANN hits stand)."""
        arr = check_vectors(vectors, self.dimension(name))
        n = int(self._loaded_call(name, self.client.query, name, filter=expr,
                                  output_fields=["count(*)"])[0]["count(*)"])
        if n > EXACT_FILTER_LIMIT:
            log.debug("filtered search on %s: %d rows match, over the exact limit of %d; "
                     "the ANN hits stand", name, n, EXACT_FILTER_LIMIT)
            return None
        fields = (*SCALAR_FIELDS, "year")
        rows = self._loaded_call(name, self.client.query, name, filter=expr, limit=max(n, 1),
                                 output_fields=["id", "vector", *fields]) if n else []
        if not rows:
            return [[] for _ in range(len(arr))]
        matrix = np.asarray([r["vector"] for r in rows], dtype=np.float32)
        scores = arr @ matrix.T
        out: list[list[Hit]] = []
        for row_scores in scores:
            top = np.argsort(-row_scores, kind="stable")[:k]
            out.append([Hit(id=int(rows[j]["id"]), score=float(row_scores[j]),
                            fields={f: rows[j].get(f) for f in fields}) for j in top])
        return out

    def search_backend(self, name: str) -> str:
        """What answers searches on ``name``, for the status page."""
        del name
        return f"Milvus {'Lite' if self.is_lite else 'server'}, {self.index.type}"

    @_milvus_errors
    def indexed_rows(self, name: str) -> tuple[int | None, int]:
        """(rows the vector index covers, rows waiting for it); None where Milvus does not
        say (Milvus Lite builds the index in the flush)."""
        desc = self.client.describe_index(name, "vector")
        indexed = desc.get("indexed_rows")
        return (None if indexed is None else int(indexed)), int(desc.get("pending_index_rows", 0))

    def wait_for_index(self, name: str, n: int, *, timeout_s: float = 600.0,
                       on_progress: Callable[[int], None] | None = None) -> None:
        """Block until the vector index covers ``n`` rows. A server builds it in the
        background after a flush and, until then, answers from an interim IVF index
        (nlist 128, nprobe 16 in 2.3's defaults) whose recall is below the real index's;
        anything that measures the index (tests, benchmarks) waits here first."""
        deadline = time.monotonic() + timeout_s
        while True:
            indexed, pending = self.indexed_rows(name)
            if indexed is None or (indexed >= n and not pending):
                return
            if on_progress is not None:
                on_progress(indexed)
            if time.monotonic() > deadline:
                raise VectorStoreError(
                    f"index of {name}: {indexed} of {n} rows after {timeout_s:g} s")
            time.sleep(0.5)

    @_milvus_errors
    def index_info(self, name: str) -> dict[str, Any]:
        """The vector field's index as the collection really has it: ``index_type`` and its
        build parameters (a server's collections also carry scalar indexes)."""
        skip = {"metric_type", "field_name", "index_name", "total_rows", "indexed_rows",
                "pending_index_rows", "state", "params"}
        for index_name in self.client.list_indexes(name):
            desc = self.client.describe_index(name, index_name)
            if desc.get("field_name") == "vector":
                return {k: v for k, v in desc.items() if k not in skip}
        return {}

    @_milvus_errors
    def search_ann(
        self, name: str, vectors: np.ndarray, k: int, filters: SearchFilters | None = None,
        *, consistency: Consistency | None = None,
    ) -> list[list[Hit]]:
        """Milvus's own search, whatever serves `search` (the ANN audit measures this)."""
        if k < 1:
            raise QueryError("k must be at least 1")
        arr = check_vectors(vectors, self.dimension(name))
        res = self._loaded_call(
            name, self.client.search,
            name,
            data=[v.tolist() for v in arr],
            limit=int(k),
            filter=build_filter_expression(filters),
            output_fields=[*SCALAR_FIELDS, "year"],
            search_params={"metric_type": "IP",
                           "params": search_params_for(self.index, int(k))},
            consistency_level=self._read_consistency(name, consistency),
        )
        fields = (*SCALAR_FIELDS, "year")
        return [
            [Hit(id=int(h["id"]), score=float(h["distance"]),
                 fields={f: h["entity"].get(f) for f in fields}) for h in q]
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

    @_milvus_errors
    def vectors(
        self, name: str, ids: Sequence[int], *, batch: int = 1000,
        consistency: Consistency | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The stored vectors of ``ids``: ``(ids found (int64), float32 (n, dim))``, in the
        order asked (repeats once); ids the collection does not hold are left out. Ids are
        cast to int, so the ``id in [...]`` expression is built from numbers only."""
        dim = self.dimension(name)
        wanted = list(dict.fromkeys(int(i) for i in ids))
        found: dict[int, list[float]] = {}
        batch = max(1, batch)
        level = self._read_consistency(name, consistency)
        for start in range(0, len(wanted), batch):
            chunk = wanted[start:start + batch]
            rows = self._loaded_call(
                name, self.client.query,
                name, filter=f"id in [{', '.join(str(i) for i in chunk)}]",
                output_fields=["id", "vector"],
                consistency_level=level,
            )
            found.update((int(r["id"]), r["vector"]) for r in rows)
        order = [i for i in wanted if i in found]
        matrix = np.asarray([found[i] for i in order], dtype=np.float32).reshape(-1, dim)
        return np.asarray(order, dtype=np.int64), matrix
