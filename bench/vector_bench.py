"""Vector search benchmark: Milvus Lite index configurations against FAISS exact search.

One run compares the systems side by side on the same synthetic data and the same queries:

- data: ``n`` clustered, L2-normalised float32 vectors (gaussian clusters around random unit
  centres, like embeddings of a photo collection: many near-duplicates per class);
- queries: fresh draws from the same clusters (not stored vectors);
- FAISS ``IndexFlatIP`` (the project's ``ExactIndex``) is the ground truth;
- Milvus Lite, through the project's ``MilvusStore``: insert time, flush time, the latency of
  a few searches *before* the flush (growing data), then for each index configuration the
  index build + load time, single-query latency p50/p95 (one query per call, as the search
  page sends them), batched latency per query, recall@10 against FAISS, and process memory.

Milvus Lite 3.2 runs inside the calling process (a gRPC server on threads, FAISS/NumPy
for the indexes), so its memory is this process's RSS and its threads are this process's
OpenMP/BLAS pools. The library returns plain dataclasses; ``to_markdown`` renders the tables.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from carsearch.platform.metrics import recall_at_k_vs_exact
from carsearch.platform.vectors.exact import ExactIndex
from carsearch.platform.vectors.milvus import IndexSpec, MilvusStore, lite_index_params
from carsearch.platform.vectors.protocol import VectorRow
from machine import cpu_name

__all__ = [
    "BenchReport",
    "ConfigResult",
    "MilvusConfig",
    "ThreadResult",
    "clustered_vectors",
    "default_configs",
    "lite_index_params",
    "machine_info",
    "percentiles_ms",
    "rss_mb",
    "run_vector_bench",
    "thread_bench",
    "thread_markdown",
    "to_markdown",
]

log = logging.getLogger(__name__)

COLLECTION = "bench_vectors"
_INSERT_BATCH = 5_000


# --- data ------------------------------------------------------------------------------


def clustered_vectors(
    n: int,
    dim: int,
    *,
    n_clusters: int = 1000,
    spread: float = 0.6,
    seed: int = 0,
    centres: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors (n, dim) unit float32, centres (n_clusters, dim))``.

    Each vector is a random centre plus gaussian noise of expected norm ``spread``,
    normalised. Pass ``centres`` to draw more points (e.g. queries) from the same clusters.
    """
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = _unit(rng.standard_normal((n_clusters, dim), dtype=np.float32))
    labels = rng.integers(0, centres.shape[0], size=n)
    noise = rng.standard_normal((n, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim))
    return _unit(centres[labels] + noise), centres


def _unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


# --- machine -----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, cores, thread settings, library versions and the date (for every table)."""
    import faiss

    cpu = cpu_name()
    versions: dict[str, str] = {"faiss": getattr(faiss, "__version__", "?")}
    for mod in ("pymilvus", "milvus_lite", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = "?"
    threads: dict[str, Any] = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
        "faiss_omp": int(faiss.omp_get_max_threads()),
    }
    try:
        import torch

        threads["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "python": platform.python_version(),
        "versions": versions,
        "threads": threads,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process in MiB (psutil if installed, else /proc)."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024
    return float("nan")


def percentiles_ms(seconds: Sequence[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds of a list of durations in seconds."""
    arr = np.asarray(seconds, dtype=np.float64) * 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 95))


# --- configurations -------------------------------------------------------------------------


@dataclass(frozen=True)
class MilvusConfig:
    """One Milvus index type with build parameters and one or more search settings."""

    index_type: str
    params: dict[str, int] = field(default_factory=dict)
    search: tuple[dict[str, int], ...] = ({},)

    def specs(self) -> list[IndexSpec]:
        return [IndexSpec(self.index_type, dict(self.params), dict(s))  # type: ignore[arg-type]
                for s in self.search]


def label_of(spec: IndexSpec) -> str:
    parts = [f"{k}={v}" for k, v in {**spec.params, **spec.search_params}.items()]
    return spec.type + (f" ({', '.join(parts)})" if parts else "")


def default_configs(n: int) -> list[MilvusConfig]:
    """FLAT, IVF_FLAT at two nlist values with several nprobe, and HNSW with several ef."""
    small = max(16, int(2 * np.sqrt(n)) // 16 * 16)  # ~2·√n lists: 10k → 192, 100k → 624
    large = 1024 if n >= 50_000 else max(32, small // 2)
    return [
        MilvusConfig("FLAT"),
        MilvusConfig("IVF_FLAT", {"nlist": large}, ({"nprobe": 16}, {"nprobe": 32})),
        MilvusConfig("IVF_FLAT", {"nlist": small}, ({"nprobe": 8}, {"nprobe": 16},
                                                    {"nprobe": 32})),
        MilvusConfig("HNSW", {"M": 16, "efConstruction": 200},
                     ({"ef": 32}, {"ef": 64}, {"ef": 128})),
    ]


# --- results -------------------------------------------------------------------------------


@dataclass
class ConfigResult:
    """One system/configuration measured in a run."""

    system: str
    config: str
    build_s: float
    p50_ms: float
    p95_ms: float
    batch_ms_per_query: float
    recall_at_10: float
    memory_mb: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchReport:
    n: int
    dim: int
    n_clusters: int
    n_queries: int
    batch_size: int
    machine: dict[str, Any]
    insert_s: float = 0.0
    flush_s: float = 0.0
    unflushed_p50_ms: float = float("nan")
    rss_start_mb: float = 0.0
    rss_loaded_mb: float = 0.0
    results: list[ConfigResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["results"] = [r.to_dict() for r in self.results]
        return d

    def best(self, min_recall: float = 0.99) -> ConfigResult | None:
        """The fastest Milvus configuration (single-query p50) with recall ≥ min_recall."""
        ok = [r for r in self.results if r.system == "Milvus Lite"
              and r.recall_at_10 >= min_recall]
        return min(ok, key=lambda r: r.p50_ms) if ok else None


# --- the run ---------------------------------------------------------------------------------


def _time_each(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> list[float]:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q[None, :])
        times.append(time.perf_counter() - t0)
    return times


def _time_batched(fn: Callable[[np.ndarray], Any], queries: np.ndarray, batch: int) -> float:
    """Milliseconds per query when searching ``batch`` queries per call."""
    t0 = time.perf_counter()
    for start in range(0, len(queries), batch):
        fn(queries[start:start + batch])
    return (time.perf_counter() - t0) * 1000.0 / max(len(queries), 1)


def _milvus_ids(store: MilvusStore, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries), 64):
        for row, hits in enumerate(store.search(COLLECTION, queries[start:start + 64], k),
                                   start=start):
            out[row, :len(hits)] = [h.id for h in hits]
    return out


def _load_vectors(store: MilvusStore, ids: np.ndarray, vectors: np.ndarray,
                  progress: bool) -> float:
    rows = [VectorRow(source="bench")] * _INSERT_BATCH
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(ids), _INSERT_BATCH), desc="insert", unit="batch",
                      disable=not progress, leave=False):
        chunk = ids[start:start + _INSERT_BATCH]
        store.upsert(COLLECTION, chunk.tolist(), vectors[start:start + len(chunk)],
                     rows[:len(chunk)])
    return time.perf_counter() - t0


def _reindex(store: MilvusStore, spec: IndexSpec) -> float:
    """Replace the collection's vector index with ``spec`` and load it; seconds taken."""
    client = store.client
    t0 = time.perf_counter()
    client.release_collection(COLLECTION)
    store._loaded.discard(COLLECTION)
    for name in client.list_indexes(COLLECTION):
        client.drop_index(COLLECTION, name)
    params = client.prepare_index_params()
    params.add_index(field_name="vector", index_type=spec.type, metric_type="IP",
                     params=lite_index_params(spec.params))
    client.create_index(COLLECTION, params)
    client.load_collection(COLLECTION)
    store._loaded.add(COLLECTION)
    store.index = spec
    return time.perf_counter() - t0


def run_vector_bench(
    n: int = 10_000,
    dim: int = 192,
    *,
    configs: Sequence[MilvusConfig] | None = None,
    n_queries: int = 200,
    batch_size: int = 32,
    n_clusters: int = 1000,
    k: int = 10,
    seed: int = 0,
    unflushed_queries: int = 3,
    workdir: str | Path | None = None,
    progress: bool = True,
) -> BenchReport:
    """Run the whole comparison at one size and dimension (see the module docstring)."""
    vectors, centres = clustered_vectors(n, dim, n_clusters=n_clusters, seed=seed)
    queries, _ = clustered_vectors(n_queries, dim, centres=centres, seed=seed + 1)
    ids = np.arange(n, dtype=np.int64) * 7 + 1_000_003  # not 0..n-1: catch id mix-ups
    report = BenchReport(n, dim, n_clusters, n_queries, batch_size, machine_info(),
                         rss_start_mb=rss_mb())

    t0 = time.perf_counter()
    exact = ExactIndex.from_arrays(ids, vectors)
    faiss_build = time.perf_counter() - t0
    _, exact_ids = exact.search(queries, k)
    single = _time_each(lambda q: exact.search(q, k), queries)
    report.results.append(ConfigResult(
        "FAISS", "IndexFlatIP (exact)", faiss_build, *percentiles_ms(single),
        _time_batched(lambda q: exact.search(q, k), queries, batch_size), 1.0,
        n * (dim * 4 + 8) / 2**20,
    ))

    with tempfile.TemporaryDirectory(dir=workdir, prefix="vbench-") as tmp:
        store = MilvusStore(str(Path(tmp) / "bench.db"), index=IndexSpec("FLAT"))
        try:
            store.ensure_collection(COLLECTION, dim)
            report.insert_s = _load_vectors(store, ids, vectors, progress)
            if unflushed_queries:
                pre = _time_each(lambda q: store.search(COLLECTION, q, k),
                                 queries[:unflushed_queries])
                report.unflushed_p50_ms = percentiles_ms(pre)[0]
            t0 = time.perf_counter()
            store.flush(COLLECTION)
            report.flush_s = time.perf_counter() - t0
            specs = [s for c in (configs or default_configs(n)) for s in c.specs()]
            built: tuple[str, dict[str, int]] | None = None
            build_s = 0.0
            for spec in tqdm(specs, desc=f"milvus {n}x{dim}", disable=not progress, leave=False):
                if built != (spec.type, spec.params):
                    gc.collect()
                    build_s = _reindex(store, spec)
                    built = (spec.type, dict(spec.params))
                store.index = replace(spec)
                report.results.append(_measure(store, spec, queries, exact_ids, k, batch_size,
                                               build_s, report))
        finally:
            store.drop(COLLECTION)
            store.close()
    return report


def _measure(store: MilvusStore, spec: IndexSpec, queries: np.ndarray, exact_ids: np.ndarray,
             k: int, batch_size: int, build_s: float, report: BenchReport) -> ConfigResult:
    store.search(COLLECTION, queries[:2], k)  # warm caches after a (re)load
    ann_ids = _milvus_ids(store, queries, k)
    recall = recall_at_k_vs_exact(ann_ids, exact_ids, k)
    single = _time_each(lambda q: store.search(COLLECTION, q, k), queries)
    batched = _time_batched(lambda q: store.search(COLLECTION, q, k), queries, batch_size)
    mem = rss_mb()
    report.rss_loaded_mb = max(report.rss_loaded_mb, mem)
    log.info("%s: p50 %.2f ms, recall@10 %.4f", label_of(spec), percentiles_ms(single)[0],
             recall)
    return ConfigResult("Milvus Lite", label_of(spec), build_s, *percentiles_ms(single),
                        batched, recall, mem)


# --- threads ---------------------------------------------------------------------------------


@dataclass
class ThreadResult:
    library: str
    workload: str
    threads: int
    p50_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def thread_bench(
    n: int = 100_000, dim: int = 192, thread_counts: Sequence[int] = (1, 2), repeats: int = 30,
    seed: int = 0,
) -> list[ThreadResult]:
    """p50 time of FAISS flat search (1 query, 32 queries) and a torch encoder-sized matmul
    stack (batch 32) at each thread count. OpenMP pools are resized in place."""
    import faiss
    import torch

    vectors, centres = clustered_vectors(n, dim, seed=seed)
    queries, _ = clustered_vectors(32, dim, centres=centres, seed=seed + 1)
    exact = ExactIndex.from_arrays(np.arange(n, dtype=np.int64), vectors)
    x = torch.randn(32 * 16, 384)
    w1, w2 = torch.randn(384, 1536), torch.randn(1536, 384)
    workloads: list[tuple[str, str, Callable[[], Any]]] = [
        ("FAISS", f"flat search, 1 query, {n}x{dim}", lambda: exact.search(queries[:1], 10)),
        ("FAISS", f"flat search, 32 queries, {n}x{dim}", lambda: exact.search(queries, 10)),
        ("torch", "MLP 512x384→1536→384 (encoder block)", lambda: (x @ w1).relu() @ w2),
    ]
    old_faiss, old_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    out: list[ThreadResult] = []
    try:
        for t in thread_counts:
            faiss.omp_set_num_threads(t)
            torch.set_num_threads(t)
            for lib, name, fn in workloads:
                fn()
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                out.append(ThreadResult(lib, name, t, percentiles_ms(times)[0]))
    finally:
        faiss.omp_set_num_threads(old_faiss)
        torch.set_num_threads(old_torch)
    return out


# --- markdown --------------------------------------------------------------------------------


def _machine_line(m: dict[str, Any]) -> str:
    th = m["threads"]
    v = m["versions"]
    return (f"Machine: {m['cpu']}, {m['cores']} cores; threads: OMP_NUM_THREADS="
            f"{th['OMP_NUM_THREADS']}, FAISS {th['faiss_omp']}, torch {th.get('torch', '?')}; "
            f"Milvus Lite {v['milvus_lite']}, pymilvus {v['pymilvus']}, FAISS {v['faiss']}; "
            f"load average at start {m['load_avg']}; {m['date']}.")


def to_markdown(report: BenchReport) -> str:
    """One markdown section: the run's setup line and the side-by-side table."""
    exact = next(r for r in report.results if r.system == "FAISS")
    lines = [
        f"### {report.n:,} vectors × {report.dim} dims "
        f"({report.n_clusters} clusters, {report.n_queries} queries, k=10)",
        "",
        _machine_line(report.machine),
        "",
        f"Milvus Lite insert {report.insert_s:.1f} s ({report.n / max(report.insert_s, 1e-9):,.0f}"
        f" rows/s), flush {report.flush_s:.2f} s; single query before the flush: "
        f"{report.unflushed_p50_ms:.1f} ms (p50). Process RSS {report.rss_start_mb:.0f} MiB at "
        f"start, {report.rss_loaded_mb:.0f} MiB with the collection loaded; FAISS flat index "
        f"{exact.memory_mb:.0f} MiB.",
        "",
        "| system | configuration | build+load s | single p50 ms | single p95 ms "
        "| × FAISS p50 | batched ms/query (batch "
        f"{report.batch_size}) | recall@10 | RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.results:
        ratio = r.p50_ms / exact.p50_ms if exact.p50_ms > 0 else float("nan")
        lines.append(
            f"| {r.system} | {r.config} | {r.build_s:.2f} | {r.p50_ms:.2f} | {r.p95_ms:.2f} | "
            f"{ratio:.1f} | {r.batch_ms_per_query:.2f} | {r.recall_at_10:.4f} | "
            f"{r.memory_mb:.0f} |"
        )
    best = report.best()
    if best is not None:
        lines += ["", f"Fastest Milvus Lite configuration with recall@10 ≥ 0.99: **{best.config}**"
                      f", p50 {best.p50_ms:.2f} ms, recall@10 {best.recall_at_10:.4f}."]
    return "\n".join(lines) + "\n"


def thread_markdown(results: Sequence[ThreadResult], machine: dict[str, Any]) -> str:
    """A table of p50 per workload and thread count, with the 2-vs-1 ratio."""
    counts = sorted({r.threads for r in results})
    workloads = list(dict.fromkeys((r.library, r.workload) for r in results))
    head = " | ".join(f"{t} thread{'s' if t > 1 else ''} p50 ms" for t in counts)
    lines = ["### Thread counts", "", _machine_line(machine), "",
             f"| library | workload | {head} | speed-up {counts[-1]} vs {counts[0]} |",
             "|---|---|" + "---:|" * (len(counts) + 1)]
    for lib, wl in workloads:
        by_t = {r.threads: r.p50_ms for r in results if (r.library, r.workload) == (lib, wl)}
        cells = " | ".join(f"{by_t[t]:.2f}" for t in counts)
        lines.append(f"| {lib} | {wl} | {cells} | {by_t[counts[0]] / by_t[counts[-1]]:.2f}× |")
    return "\n".join(lines) + "\n"
