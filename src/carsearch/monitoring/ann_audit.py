"""ANN audit: Milvus top-k against FAISS exact top-k over the same vectors.

The exact index is built from the vectors Milvus holds for a model version (read back with a
query iterator, so both sides search exactly the same rows under the same ids) and saved
beside the version under ``data_dir/exact/<version>/``. Before an audit the saved index is
checked against the collection's ids and rebuilt when the collection has changed (ingest keeps
adding rows), so the ground truth never lags the data.

An audit runs every query one at a time through both systems (the search page sends one query
per request), measures recall@1/10/100, the mean score difference at equal rank and the latency
of each side, and is recorded as an ``AnnReport`` row; ``latest_ann_report`` reads the newest
for the status page. Query sets: the evaluation queries (the class-name captions of the indexed
images' classes) or a sample of logged text queries, encoded with the serving version.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sqlalchemy import select
from tqdm.auto import tqdm

from carsearch.platform.artifacts import EXACT_INDEX, ArtifactLedger
from carsearch.platform.db import AnnReport, Database, ModelVersion, QueryLog, images
from carsearch.platform.errors import (
    ArtifactTamperedError,
    CarsearchError,
    ModelNotFoundError,
    QueryError,
)
from carsearch.platform.metrics import recall_at_k_vs_exact, score_agreement
from carsearch.platform.vectors.exact import ExactIndex, GpuMode, exact_dir
from carsearch.platform.vectors.milvus import IndexSpec, MilvusStore
from carsearch.platform.vectors.protocol import VectorAdmin, VectorStore

__all__ = [
    "AnnAuditReport",
    "QuerySource",
    "audit",
    "class_queries",
    "exact_dir",
    "exact_from_arrays",
    "exact_from_milvus",
    "logged_queries",
    "ordered_ids",
    "record_report",
    "run_ann_audit",
    "sync_exact_index",
]

log = logging.getLogger(__name__)

QuerySource = Literal["classes", "logged"]
_ITER_BATCH = 5_000
_LOGGED_WINDOW = 5_000  # sample logged queries from this many most recent distinct texts


# --- the exact index ----------------------------------------------------------------------


def exact_from_arrays(
    ids: np.ndarray, vectors: np.ndarray, *, model_version: str | None = None
) -> ExactIndex:
    """An exact index over ingest output (ids = image ids, unit vectors)."""
    return ExactIndex.from_arrays(ids, vectors, model_version=model_version)


def exact_from_milvus(
    store: VectorStore,
    collection: str,
    *,
    model_version: str | None = None,
    batch: int = _ITER_BATCH,
    progress: bool = False,
    gpu: GpuMode = "auto",
) -> ExactIndex:
    """Read every (id, vector) of a collection into a new exact index."""
    if not store.has_collection(collection):
        raise CarsearchError(f"no collection {collection} in Milvus at {store.uri}")
    dim = store.dimension(collection)
    id_parts: list[np.ndarray] = []
    vec_parts: list[np.ndarray] = []
    bar = tqdm(desc=f"read {collection}", unit="vec", disable=not progress, leave=False)
    try:
        for page in store.scan(collection, ["id", "vector"], batch=batch):
            id_parts.append(np.fromiter((int(r["id"]) for r in page), np.int64, len(page)))
            vec_parts.append(np.asarray([r["vector"] for r in page], dtype=np.float32))
            bar.update(len(page))
    finally:
        bar.close()
    ids = np.concatenate(id_parts) if id_parts else np.empty(0, np.int64)
    vectors = np.concatenate(vec_parts) if vec_parts else np.empty((0, dim), np.float32)
    log.info("read %d vectors from %s for the exact index", len(ids), collection)
    return ExactIndex.from_arrays(ids, vectors.reshape(-1, dim), model_version=model_version,
                                  gpu=gpu)


def sync_exact_index(
    store: VectorStore, version: ModelVersion, data_dir: Path, *, ledger: ArtifactLedger,
    progress: bool = False, gpu: GpuMode = "auto",
) -> ExactIndex:
    """The version's saved exact index, rebuilt from Milvus (and saved) when it is missing,
    unreadable or holds a different id set from the collection.

    The files are checked against the sha256 the ``ledger`` recorded when they were saved
    before FAISS reads them. One that differs is refused: the error is logged with the file
    named, the directory is kept aside as ``<version>.tampered-<time>`` for whoever looks
    into it, and the index is rebuilt from Milvus. An index with no record (saved before
    the ledger existed) is rebuilt too."""
    directory = exact_dir(data_dir, version.name)
    try:
        if ledger.recorded(EXACT_INDEX, version.name) is None and directory.exists():
            raise ModelNotFoundError(f"{directory}: no recorded sha256")
        exact = ExactIndex.load(directory, gpu=gpu, ledger=ledger, key=version.name)
    except ArtifactTamperedError as exc:
        aside = directory.with_name(f"{directory.name}.tampered-"
                                    f"{datetime.now(UTC):%Y%m%dT%H%M%S}")
        directory.rename(aside)
        log.error("exact index for %s refused: %s; kept aside as %s, rebuilding from Milvus",
                  version.name, exc, aside)
    except CarsearchError as exc:  # missing or unrecorded: rebuild
        log.info("exact index for %s: %s; building from Milvus", version.name, exc)
    else:
        if np.array_equal(np.sort(exact.ids()),
                          np.fromiter(sorted(store.ids(version.collection)), np.int64)):
            return exact
        log.info("exact index for %s is stale; rebuilding from Milvus", version.name)
    exact = exact_from_milvus(store, version.collection, model_version=version.name,
                              progress=progress, gpu=gpu)
    exact.save(directory, ledger=ledger, key=version.name)
    return exact


# --- the audit ------------------------------------------------------------------------------


@dataclass
class AnnAuditReport:
    """Milvus against exact search for one query set."""

    collection: str
    index_type: str
    params: dict[str, Any]
    n_queries: int
    n_vectors: int
    k: int
    recall: dict[int, float]
    score_agreement: float
    milvus_p50_ms: float
    milvus_p95_ms: float
    exact_p50_ms: float
    exact_p95_ms: float
    model_version: str | None = None
    query_source: str = "given"
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    report_id: int | None = None

    @property
    def recall_at_10(self) -> float | None:
        return self.recall.get(10)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recall"] = {f"recall@{k}": v for k, v in sorted(self.recall.items())}
        return d

    def summary(self) -> str:
        rec = ", ".join(f"recall@{k} {v:.4f}" for k, v in sorted(self.recall.items()))
        return (f"{self.index_type} {self.params} on {self.collection} "
                f"({self.n_vectors} vectors, {self.n_queries} queries): {rec}; "
                f"score diff {self.score_agreement:.2e}; latency p50/p95 Milvus "
                f"{self.milvus_p50_ms:.2f}/{self.milvus_p95_ms:.2f} ms, exact "
                f"{self.exact_p50_ms:.2f}/{self.exact_p95_ms:.2f} ms")


def ordered_ids(hits_per_query: Sequence[Sequence[Any]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, scores)`` arrays ``(nq, k)`` from per-query hit lists, padded with -1 / -inf."""
    ids = np.full((len(hits_per_query), k), -1, dtype=np.int64)
    scores = np.full((len(hits_per_query), k), -np.inf, dtype=np.float64)
    for row, hits in enumerate(hits_per_query):
        for col, hit in enumerate(list(hits)[:k]):
            ids[row, col] = int(hit.id)
            scores[row, col] = float(hit.score)
    return ids, scores


def _collection_index(store: VectorAdmin, collection: str) -> tuple[str, dict[str, Any]]:
    """The vector index type and build parameters the collection really has."""
    try:
        info = store.index_info(collection)
    except Exception as exc:  # report what the adapter believes instead
        log.debug("index_info failed: %s", exc)
        info = {}
    if not info:
        return "unknown", {}
    return str(info.pop("index_type", "unknown")), info


def _percentiles(times: list[float]) -> tuple[float, float]:
    arr = np.asarray(times, dtype=np.float64) * 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 95))


def audit(
    store: MilvusStore,
    collection: str,
    queries: np.ndarray,
    exact: ExactIndex,
    ks: Sequence[int] = (1, 10, 100),
    index: IndexSpec | None = None,
    *,
    progress: bool = False,
) -> AnnAuditReport:
    """Search every query (one per call) in Milvus and in ``exact``; compare the top-k.

    ``index`` gives the search parameters to audit (e.g. another ``nprobe``); by default the
    store's own. The index type and build parameters are read from the collection.
    """
    ks_sorted = sorted({int(k) for k in ks})
    if not ks_sorted or ks_sorted[0] < 1:
        raise QueryError(f"ks must be positive, got {list(ks)}")
    mat = np.asarray(queries, dtype=np.float32)
    if mat.ndim != 2 or not len(mat):
        raise QueryError(f"audit needs a non-empty (n, dim) query matrix, got {mat.shape}")
    k = ks_sorted[-1]
    saved = store.index
    if index is not None:
        store.index = replace(saved, search_params=dict(index.search_params))
    milvus_hits: list[Any] = []
    milvus_t: list[float] = []
    exact_ids = np.full((len(mat), k), -1, dtype=np.int64)
    exact_scores = np.full((len(mat), k), -np.inf, dtype=np.float64)
    exact_t: list[float] = []
    try:
        store.search_ann(collection, mat[:1], k)  # load and warm before timing
        for i in tqdm(range(len(mat)), desc="ann audit", unit="query", disable=not progress,
                      leave=False):
            q = mat[i:i + 1]
            t0 = time.perf_counter()
            milvus_hits.append(store.search_ann(collection, q, k)[0])
            t1 = time.perf_counter()
            s, ids = exact.search(q, k)
            t2 = time.perf_counter()
            milvus_t.append(t1 - t0)
            exact_t.append(t2 - t1)
            exact_ids[i], exact_scores[i] = ids[0], s[0]
        search_params = dict(store.index.search_params)
    finally:
        store.index = saved
    ann_ids, ann_scores = ordered_ids(milvus_hits, k)
    recall = {kk: recall_at_k_vs_exact(ann_ids, exact_ids, kk) for kk in ks_sorted}
    agreement = score_agreement(ann_scores, exact_scores, ann_ids, exact_ids)
    index_type, build = _collection_index(store, collection)
    return AnnAuditReport(
        collection=collection,
        index_type=index_type,
        params={**build, **({"search": search_params} if search_params else {})},
        n_queries=len(mat),
        n_vectors=len(exact),
        k=k,
        recall=recall,
        score_agreement=agreement,
        milvus_p50_ms=_percentiles(milvus_t)[0],
        milvus_p95_ms=_percentiles(milvus_t)[1],
        exact_p50_ms=_percentiles(exact_t)[0],
        exact_p95_ms=_percentiles(exact_t)[1],
        model_version=exact.model_version,
    )


# --- recording ------------------------------------------------------------------------------


def record_report(db: Database, report: AnnAuditReport, model_version_id: int | None) -> int:
    """Write the report as an ``AnnReport`` row; returns (and stores on the report) its id."""
    with db.session() as s:
        row = AnnReport(
            model_version_id=model_version_id,
            index_type=report.index_type,
            params=report.params,
            n_queries=report.n_queries,
            n_vectors=report.n_vectors,
            recall_at_10=report.recall_at_10,
            report=report.to_dict(),
        )
        s.add(row)
        s.flush()
        report.report_id = int(row.id)
    return report.report_id


# --- query sets -----------------------------------------------------------------------------


def class_queries(db: Database, n: int | None = None, *, seed: int = 0) -> list[str]:
    """The evaluation queries: the class names (= class captions) of indexed images.

    All of them, sorted, or a seeded sample of ``n``.
    """
    return _sample(images.class_names(db), n, seed)


def logged_queries(db: Database, n: int | None = None, *, seed: int = 0) -> list[str]:
    """A seeded sample of distinct text queries from the most recent query log entries."""
    stmt = (select(QueryLog.query)
            .where(QueryLog.kind == "text", QueryLog.query.is_not(None))
            .order_by(QueryLog.created_at.desc(), QueryLog.id.desc())
            .limit(_LOGGED_WINDOW * 4))
    with db.session() as s:
        texts = list(dict.fromkeys(q.strip() for q in s.scalars(stmt) if q and q.strip()))
    return _sample(texts[:_LOGGED_WINDOW], n, seed)


def _sample(items: list[str], n: int | None, seed: int) -> list[str]:
    if n is None or n >= len(items):
        return items
    return sorted(random.Random(seed).sample(items, n))


# --- the whole job ------------------------------------------------------------------------


def run_ann_audit(
    platform: Any,
    *,
    queries: QuerySource = "classes",
    n: int = 200,
    k: int = 100,
    seed: int = 0,
    record: bool = True,
    progress: bool = False,
) -> AnnAuditReport:
    """Audit the serving version with a query set; record the report (``platform`` is a
    ``carsearch.platform.runtime.Platform``)."""
    if k < 1 or n < 1:
        raise QueryError("n and k must be at least 1")
    version = platform.registry.require_serving()
    texts = (class_queries(platform.db, n, seed=seed) if queries == "classes"
             else logged_queries(platform.db, n, seed=seed))
    if not texts:
        where = ("indexed images with class names" if queries == "classes"
                 else "logged text queries")
        raise QueryError(f"no {where} to audit with; try --queries "
                         f"{'logged' if queries == 'classes' else 'classes'}")
    vectors = platform.search.encoder_for(version).encode_text(texts)
    exact = sync_exact_index(platform.store, version, platform.settings.data_dir,
                             ledger=ArtifactLedger(platform.db), progress=progress,
                             gpu=platform.settings.exact_gpu)
    if not len(exact):
        raise QueryError(f"collection {version.collection} is empty: ingest images first")
    ks = [x for x in (1, 10, 100) if x < k] + [k]
    report = audit(platform.store, version.collection, vectors, exact, ks, progress=progress)
    report.model_version = version.name
    report.query_source = queries
    if record:
        record_report(platform.db, report, version.id)
    log.info("ANN audit: %s", report.summary())
    return report
