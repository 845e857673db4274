"""An in-memory exact mirror of Milvus Lite collections, for serving searches fast.

Why: Milvus Lite 3.2.2 spends ~0.3-0.45 µs per stored row on Python bookkeeping in every
search call, whatever the index (docs/BENCHMARKS.md, "Vector search"), so one query over
100k rows costs ~30 ms before any vector math. A FAISS ``IndexFlatIP`` over the same
vectors answers the same query exactly in a few milliseconds.

How it stays equal to Milvus: Milvus Lite lets one process open a file at a time, so
while a process holds the file every write to it passes through this process. The
:class:`MirroredStore` writes through: each upsert/delete goes to Milvus first and then to
the mirror. A collection's mirror is built from a full scan of Milvus (in a background
thread, or synchronously with :meth:`MirroredStore.warm`); writes that arrive while the
scan runs are queued and replayed on top of it, so none is lost. Until a mirror is ready,
searches go to Milvus. Milvus stays the store of record; the mirror is a cache that a
restart rebuilds.

Filters are evaluated with the same semantics as the Milvus expression that
``build_filter_expression`` writes (exact string match on the stored, truncated scalar
fields; inclusive year bounds) and applied as a FAISS ``IDSelectorBitmap``.

Not for a Milvus server: other processes write to a server without passing through here,
so ``Settings.search_mirror = "auto"`` turns the mirror on for Milvus Lite only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from carsearch.platform.errors import QueryError
from carsearch.platform.vectors.filters import SCALAR_FIELDS, SearchFilters
from carsearch.platform.vectors.milvus import IndexSpec, MilvusStore
from carsearch.platform.vectors.protocol import Consistency, Hit, VectorRow, check_vectors

log = logging.getLogger(__name__)

_COLUMNS = tuple(SCALAR_FIELDS)  # make, body, colour, source
RETRY_AFTER_S = 30.0  # a failed build is retried by a search this long after


class _Column:
    """A string column stored as int32 codes into a growing vocabulary."""

    def __init__(self) -> None:
        self.codes = np.empty(0, dtype=np.int32)
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, values: Sequence[str]) -> np.ndarray:
        out = np.empty(len(values), dtype=np.int32)
        for i, v in enumerate(values):
            code = self.vocab.get(v)
            if code is None:
                code = self.vocab[v] = len(self.words)
                self.words.append(v)
            out[i] = code
        return out

    def mask(self, values: Sequence[str]) -> np.ndarray:
        """True where the row's value is one of ``values`` (the Milvus ``in`` operator)."""
        codes = [self.vocab[v] for v in values if v in self.vocab]
        m = np.zeros(len(self.codes), dtype=bool)
        for c in codes:  # a handful of values: equality beats np.isin by 30x
            m |= self.codes == c
        return m


class VectorMirror:
    """Vectors, ids and filter fields of one collection, searched exactly with FAISS.

    Rows are dense: position i of the FAISS index is ``ids[i]``; a delete compacts the
    index and every column in the same order. Not thread-safe on its own: the owning
    :class:`MirroredStore` serialises access.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.index: Any = faiss.IndexFlatIP(dim)
        self.ids = np.empty(0, dtype=np.int64)
        self.year = np.empty(0, dtype=np.int64)
        self.columns = {name: _Column() for name in _COLUMNS}
        self._pos: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __contains__(self, image_id: int) -> bool:
        return int(image_id) in self._pos

    def position(self, image_id: int) -> int:
        """Where an id's row is (its place in the index and in every column)."""
        return self._pos[int(image_id)]

    def upsert(self, ids: Sequence[int], vectors: np.ndarray, rows: Sequence[VectorRow]) -> None:
        """Insert rows; an id already present is replaced (vector and fields)."""
        id_arr = np.asarray([int(i) for i in ids], dtype=np.int64)
        if not id_arr.size:
            return
        # The last write of an id within one call wins, as in Milvus.
        last = {int(i): j for j, i in enumerate(id_arr)}
        keep = np.fromiter(sorted(last.values()), dtype=np.int64)
        id_arr, vectors = id_arr[keep], np.asarray(vectors, dtype=np.float32)[keep]
        fields = [rows[j].as_fields() for j in keep]
        self.delete([i for i in id_arr.tolist() if i in self._pos])
        start = len(self)
        self.index.add(np.ascontiguousarray(vectors))
        self.ids = np.concatenate([self.ids, id_arr])
        self.year = np.concatenate([self.year, np.asarray([f["year"] for f in fields],
                                                          dtype=np.int64)])
        for name, col in self.columns.items():
            col.codes = np.concatenate([col.codes, col.encode([f[name] for f in fields])])
        self._pos.update({int(i): start + n for n, i in enumerate(id_arr.tolist())})

    def delete(self, ids: Sequence[int]) -> int:
        """Remove the given ids (unknown ones are ignored); returns how many were removed."""
        positions = sorted({self._pos[int(i)] for i in ids if int(i) in self._pos})
        if not positions:
            return 0
        pos = np.asarray(positions, dtype=np.int64)
        self.index.remove_ids(faiss.IDSelectorBatch(pos))  # compacts, keeping order
        keep = np.ones(len(self.ids), dtype=bool)
        keep[pos] = False
        self.ids, self.year = self.ids[keep], self.year[keep]
        for col in self.columns.values():
            col.codes = col.codes[keep]
        self._pos = {int(i): n for n, i in enumerate(self.ids.tolist())}
        return len(positions)

    def vectors(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Stored vectors of ``ids`` in the order asked (repeats once, unknown ids left
        out): ``(ids found, float32 (n, dim))``, as ``MilvusStore.vectors`` returns them."""
        found = [i for i in dict.fromkeys(int(i) for i in ids) if i in self._pos]
        if not found:
            return np.empty(0, dtype=np.int64), np.empty((0, self.dim), dtype=np.float32)
        pos = np.asarray([self._pos[i] for i in found], dtype=np.int64)
        return np.asarray(found, dtype=np.int64), self.index.reconstruct_batch(pos)

    def mask(self, filters: SearchFilters | None) -> np.ndarray | None:
        """Rows that pass ``filters`` (None: all rows)."""
        if filters is None or filters.is_empty():
            return None
        m = np.ones(len(self), dtype=bool)
        for name in _COLUMNS:
            values: tuple[str, ...] = getattr(filters, name)
            if values:
                max_len = SCALAR_FIELDS[name]  # Milvus stores the truncated value
                m &= self.columns[name].mask([v[:max_len] for v in values])
        if filters.year_min is not None:
            m &= self.year >= int(filters.year_min)
        if filters.year_max is not None:
            m &= self.year <= int(filters.year_max)
        ex = filters.exclude
        if ex is not None:
            for name in _COLUMNS:
                values = getattr(ex, name)
                if values:
                    m &= ~self.columns[name].mask([v[:SCALAR_FIELDS[name]] for v in values])
            if ex.year_min is not None or ex.year_max is not None:
                lo = int(ex.year_min) if ex.year_min is not None else -(2**62)
                hi = int(ex.year_max) if ex.year_max is not None else 2**62
                m &= (self.year < lo) | (self.year > hi)
        return m

    def search(
        self, queries: np.ndarray, k: int, filters: SearchFilters | None = None
    ) -> list[list[Hit]]:
        """Exact top-k by inner product, best first, with the stored filter fields."""
        nq = len(queries)
        if not len(self):
            return [[] for _ in range(nq)]
        mask = self.mask(filters)
        params = None
        if mask is not None:
            if not mask.any():
                return [[] for _ in range(nq)]
            bits = np.packbits(mask, bitorder="little")
            params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(len(mask),
                                                                       faiss.swig_ptr(bits)))
        kk = min(int(k), len(self))
        scores, pos = self.index.search(np.ascontiguousarray(queries), kk, params=params)
        return [[self.hit(int(p), float(s)) for s, p in zip(srow, prow, strict=True) if p >= 0]
                for srow, prow in zip(scores, pos, strict=True)]

    def hit(self, position: int, score: float) -> Hit:
        fields: dict[str, Any] = {name: col.words[int(col.codes[position])]
                                  for name, col in self.columns.items()}
        fields["year"] = int(self.year[position])
        return Hit(id=int(self.ids[position]), score=score, fields=fields)


class _Cancelled(Exception):
    """The store is closing: a build in progress stops."""


@dataclass
class _Build:
    """A mirror being built: writes that arrive meanwhile are queued here."""

    pending: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    thread: threading.Thread | None = None


class MirroredStore(MilvusStore):
    """A Milvus Lite store whose searches are served from an exact in-memory mirror.

    Writes go to Milvus, then to the mirror; ``search_ann`` still searches Milvus itself
    (the ANN audit and benchmarks use it).
    """

    def __init__(self, uri: str, *, token: str = "", index: IndexSpec | None = None,
                 consistency: Consistency = "Session", progress: bool = False,
                 auto_build: bool = False) -> None:
        super().__init__(uri, token=token, index=index, consistency=consistency)
        self.progress = progress
        # A long-running process (the search page) sets this: a search that finds no
        # mirror starts building one. One-shot commands search Milvus and build nothing.
        self.auto_build = auto_build
        self._closing = threading.Event()
        self._mirrors: dict[str, VectorMirror] = {}
        self._builds: dict[str, _Build] = {}
        self._failed_at: dict[str, float] = {}
        self._mlock = threading.RLock()

    # -- state -----------------------------------------------------------------------
    def mirror(self, name: str) -> VectorMirror | None:
        """The ready mirror of a collection, or None while it is absent or building."""
        with self._mlock:
            return self._mirrors.get(name)

    def warm(self, name: str, *, wait: bool = True) -> None:
        """Build the mirror of ``name`` now (in this thread when ``wait``, else in the
        background); a no-op when it is ready or already building."""
        with self._mlock:
            if name in self._mirrors or name in self._builds:
                build = self._builds.get(name)
                start = False
            else:
                build = self._builds[name] = _Build()
                start = True
        if start and build is not None:
            if wait:
                self._build(name, build)
                return
            build.thread = threading.Thread(target=self._build, args=(name, build),
                                            name=f"mirror-{name}", daemon=True)
            build.thread.start()
        elif wait and build is not None and build.thread is not None:
            build.thread.join()

    def search_backend(self, name: str) -> str:
        with self._mlock:
            mirror = self._mirrors.get(name)
            building = name in self._builds
        if mirror is not None:
            return f"in-memory mirror (exact, {len(mirror):,} vectors)"
        state = "mirror building" if building else "no mirror"
        return f"{super().search_backend(name)} ({state})"

    def forget(self, name: str) -> None:
        """Free a collection's mirror; searches go to Milvus until it is built again."""
        with self._mlock:
            self._mirrors.pop(name, None)

    def keep_only(self, names: str | Iterable[str]) -> None:
        """Free every mirror but those of ``names`` (after a promotion, the old version's
        copy; the serving versions of other image collections stay)."""
        keep = {names} if isinstance(names, str) else set(names)
        with self._mlock:
            for other in [n for n in self._mirrors if n not in keep]:
                log.info("freeing the search mirror of %s", other)
                del self._mirrors[other]

    # -- serving decisions (the VectorStore Protocol's) --------------------------------
    def prepare(self, names: Iterable[str], *, wait: bool = False) -> None:
        """Serve ``names`` from mirrors: build each existing collection's now (in the
        background unless ``wait``), and build any other on its first search."""
        self.auto_build = True
        for name in names:
            if self.has_collection(name):
                self.warm(name, wait=wait)

    def retain(self, names: Iterable[str]) -> None:
        self.keep_only(names)

    def search_path(self, name: str) -> str:
        return "mirror" if self.mirror(name) is not None else super().search_path(name)

    def _build(self, name: str, build: _Build) -> None:
        t0 = time.perf_counter()
        try:
            mirror = self._scan(name)
        except _Cancelled:
            return
        except Exception:
            log.exception("building the search mirror of %s failed; searching Milvus", name)
            with self._mlock:
                if self._builds.get(name) is build:
                    del self._builds[name]
                self._failed_at[name] = time.monotonic()
            return
        with self._mlock:
            if self._builds.get(name) is not build:  # dropped while we scanned
                return
            for op, args in build.pending:
                if op == "upsert":
                    mirror.upsert(*args)
                else:
                    mirror.delete(*args)
            self._mirrors[name] = mirror
            del self._builds[name]
            self._failed_at.pop(name, None)
        log.info("search mirror of %s ready: %d vectors in %.1f s", name, len(mirror),
                 time.perf_counter() - t0)

    def _scan(self, name: str, batch: int = 10_000) -> VectorMirror:
        """Every row of a collection, read from Milvus into a new mirror."""
        mirror = VectorMirror(self.dimension(name))
        bar = tqdm(desc=f"mirror {name}", unit="vec", disable=not self.progress, leave=False)
        try:
            for page in self.scan(name, ["id", "vector", *_COLUMNS, "year"], batch=batch,
                                  stop=self._closing):
                vecs = np.asarray([r["vector"] for r in page], dtype=np.float32)
                rows = [VectorRow(**{f: r[f] for f in (*_COLUMNS, "year")}) for r in page]
                mirror.upsert([int(r["id"]) for r in page], vecs, rows)
                bar.update(len(page))
        finally:
            bar.close()
        if self._closing.is_set():
            raise _Cancelled
        return mirror

    def _tracks(self, name: str) -> bool:
        with self._mlock:
            return name in self._mirrors or name in self._builds

    def _record(self, name: str, op: str, args: tuple[Any, ...]) -> None:
        """Apply a write that already reached Milvus to the mirror (or queue it)."""
        with self._mlock:
            ready = self._mirrors.get(name)
            if ready is not None:
                if op == "upsert":
                    ready.upsert(*args)
                else:
                    ready.delete(*args)
            elif name in self._builds:
                self._builds[name].pending.append((op, args))

    # -- VectorStore -----------------------------------------------------------------
    def upsert(
        self, name: str, ids: Sequence[int], vectors: np.ndarray, rows: Sequence[VectorRow]
    ) -> int:
        n = super().upsert(name, ids, vectors, rows)
        if n and self._tracks(name):
            arr = np.array(vectors, dtype=np.float32)  # a copy: the caller may reuse its array
            self._record(name, "upsert", (list(ids), arr, list(rows)))
        return n

    def delete(self, name: str, ids: Sequence[int]) -> None:
        super().delete(name, ids)
        if self._tracks(name):
            self._record(name, "delete", ([int(i) for i in ids],))

    def drop(self, name: str) -> None:
        super().drop(name)
        with self._mlock:
            self._mirrors.pop(name, None)
            self._builds.pop(name, None)

    def count(self, name: str, *, consistency: Consistency = "Strong") -> int:
        mirror = self.mirror(name)
        if mirror is not None:
            return len(mirror)
        return super().count(name, consistency=consistency)

    def vectors(
        self, name: str, ids: Sequence[int], *, batch: int = 1000,
        consistency: Consistency | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stored vectors by id: from the mirror when it is ready (the drift job reads
        thousands at a time), from Milvus otherwise."""
        with self._mlock:
            mirror = self._mirrors.get(name)
            if mirror is not None:
                return mirror.vectors(ids)
        return super().vectors(name, ids, batch=batch, consistency=consistency)

    def search(
        self, name: str, vectors: np.ndarray, k: int, filters: SearchFilters | None = None
    ) -> list[list[Hit]]:
        """Exact search in the mirror when it is ready; Milvus (and a build) otherwise."""
        if k < 1:
            raise QueryError("k must be at least 1")
        with self._mlock:
            mirror = self._mirrors.get(name)
            if mirror is not None:
                arr = check_vectors(vectors, mirror.dim)
                return mirror.search(arr, k, filters)
        failed = self._failed_at.get(name)
        retry = failed is None or time.monotonic() - failed > RETRY_AFTER_S
        with self._mlock:
            building = name in self._builds
        if self.auto_build and retry and not building and self.has_collection(name):
            self.warm(name, wait=False)
        return super().search(name, vectors, k, filters)

    def close(self) -> None:
        """Stop any build in progress, drop the mirrors, close Milvus."""
        self._closing.set()
        with self._mlock:
            threads = [b.thread for b in self._builds.values() if b.thread is not None]
        for t in threads:
            t.join(timeout=30)
        with self._mlock:
            self._mirrors.clear()
            self._builds.clear()
        super().close()
