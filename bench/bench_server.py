"""Vector search on a Milvus standalone server, the search mirror, FAISS exact and Milvus Lite.

One run measures the four side by side, on the same synthetic data and the same queries:

- data: ``n`` clustered unit vectors (``vector_bench.clustered_vectors``); queries are fresh
  draws from the same clusters, 10 more of them warm every system up first;
- FAISS exact (``ExactIndex``, IndexFlatIP, 1 FAISS thread): the ground truth;
- the search mirror (``VectorMirror``: the exact in-memory FAISS copy the search service
  answers from on Milvus Lite);
- a Milvus standalone server (the ``milvus`` package's ``milvus-server``, started here on free
  ports unless ``--server-uri`` names one, and always stopped): HNSW M 16 / efConstruction 200,
  searched at several ``ef``, Session consistency (Strong waits 200-400 ms a call for a time
  tick); insert throughput in batches, then flush + index build + release/load;
- Milvus Lite (a file in a temp dir) with the store's default HNSW index.

Every search is one query per call, as the search page sends them; latency is p50/p95 and
recall@10 is against FAISS exact. ``--service`` adds the search service end to end
(``bench_search.run_size``: the compact model, metadata in SQLite) on the server, with the
mirror and Milvus Lite beside it. Prints markdown; ``--json``/``--out`` also write the figures.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_server.py --service
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_server.py --sizes 20000 --queries 50
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy and faiss are imported

import argparse
import contextlib
import gc
import importlib.metadata
import json
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from carsearch.monitoring.ann_audit import ordered_ids
from carsearch.platform.metrics import recall_at_k_vs_exact
from carsearch.platform.vectors.exact import ExactIndex, set_threads
from carsearch.platform.vectors.milvus import IndexSpec, MilvusStore
from carsearch.platform.vectors.mirror import VectorMirror
from carsearch.platform.vectors.protocol import VectorRow, VectorStoreError
from carsearch.platform.vectors.server import LocalMilvusServer
from vector_bench import (
    clustered_vectors,
    label_of,
    machine_info,
    percentiles_ms,
)

log = logging.getLogger("bench_server")

COLLECTION = "bench_server"
DEFAULT_EF = (32, 64, 128, 256)
HNSW_BUILD = {"M": 16, "efConstruction": 200}
WARMUP = 10
LARGE = 1_000_000  # from here on: fewer queries (Milvus Lite takes ~310 ms a query at 1M)
FAISS_THREADS = 1


# --- results -------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """One system (and configuration): single-query latency and recall@10 vs FAISS exact."""

    system: str
    config: str
    queries: int
    p50_ms: float
    p95_ms: float
    recall_at_10: float


@dataclass
class Settle:
    """Seconds to flush, to finish building the vector index after it, and to reload."""

    flush_s: float
    index_s: float
    load_s: float

    @property
    def total_s(self) -> float:
        return self.flush_s + self.index_s + self.load_s


@dataclass
class LoadResult:
    """Loading one system: insert (or add) time in batches, then (Milvus) the flush, the
    wait until the index covers every row, and a release + load."""

    system: str
    vectors: int
    batch: int
    insert_s: float
    settle: Settle | None = None  # nothing to flush or build: FAISS exact, the mirror

    @property
    def per_s(self) -> float:
        return self.vectors / max(self.insert_s, 1e-9)


@dataclass
class ServerReport:
    n: int
    dim: int
    n_clusters: int
    k: int
    machine: dict[str, Any]
    server_version: str = "?"
    lite_skipped: bool = False
    load_avg_end: list[float] = field(default_factory=list)
    searches: list[SearchResult] = field(default_factory=list)
    loads: list[LoadResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for row, load in zip(d["loads"], self.loads, strict=True):
            row["vectors_per_s"] = load.per_s
            if load.settle is not None:
                row["settle"]["total_s"] = load.settle.total_s
        return d

    def result(self, system: str) -> list[SearchResult]:
        return [r for r in self.searches if r.system == system]


@dataclass
class Workload:
    ids: np.ndarray
    vectors: np.ndarray
    queries: np.ndarray
    warm: np.ndarray
    exact_ids: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.int64))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def make_workload(n: int, dim: int, n_queries: int, *, n_clusters: int, seed: int) -> Workload:
    vectors, centres = clustered_vectors(n, dim, n_clusters=n_clusters, seed=seed)
    queries, _ = clustered_vectors(n_queries + WARMUP, dim, centres=centres, seed=seed + 1)
    ids = np.arange(n, dtype=np.int64) * 7 + 1_000_003  # not 0..n-1: catch id mix-ups
    return Workload(ids, vectors, queries[WARMUP:], queries[:WARMUP])


def default_queries(n: int) -> int:
    return 200 if n < LARGE else 100


def default_lite_queries(n: int, n_queries: int) -> int:
    return n_queries if n < LARGE else min(n_queries, 30)


# --- timing --------------------------------------------------------------------------------


def time_each(fn: Callable[[np.ndarray], Any], queries: np.ndarray,
              warm: np.ndarray) -> tuple[list[float], list[Any]]:
    """One query per call (after the warm-up queries): (seconds, outputs)."""
    for q in warm:
        fn(q[None, :])
    times, outs = [], []
    for q in queries:
        t0 = time.perf_counter()
        out = fn(q[None, :])
        times.append(time.perf_counter() - t0)
        outs.append(out)
    return times, outs


def hit_ids(k: int) -> Callable[[Sequence[Sequence[Any]]], np.ndarray]:
    return lambda hits: ordered_ids(hits, k)[0]


def measure(system: str, config: str, fn: Callable[[np.ndarray], Any],
            to_ids: Callable[[Any], np.ndarray], work: Workload, k: int,
            n_queries: int | None = None) -> SearchResult:
    queries = work.queries[:n_queries]
    times, outs = time_each(fn, queries, work.warm)
    ann = np.vstack([to_ids(o) for o in outs])
    recall = recall_at_k_vs_exact(ann, work.exact_ids[:len(queries)], k)
    p50, p95 = percentiles_ms(times)
    log.info("%s %s: p50 %.2f ms, recall@%d %.4f", system, config, p50, k, recall)
    return SearchResult(system, config, len(queries), p50, p95, recall)


# --- FAISS exact and the mirror ------------------------------------------------------------


def faiss_results(work: Workload, k: int) -> tuple[LoadResult, SearchResult]:
    """FAISS exact; its single-query answers become ``work.exact_ids`` (the ground truth)."""
    t0 = time.perf_counter()
    exact = ExactIndex.from_arrays(work.ids, work.vectors)
    load = LoadResult("FAISS exact", len(work.ids), len(work.ids), time.perf_counter() - t0)
    times, outs = time_each(lambda q: exact.search(q, k), work.queries, work.warm)
    work.exact_ids = np.vstack([ids for _, ids in outs])
    p50, p95 = percentiles_ms(times)
    config = f"IndexFlatIP, {FAISS_THREADS} thread"
    return load, SearchResult("FAISS exact", config, len(times), p50, p95, 1.0)


def mirror_results(work: Workload, k: int) -> tuple[LoadResult, SearchResult]:
    t0 = time.perf_counter()
    mirror = VectorMirror(work.dim)
    mirror.upsert(work.ids.tolist(), work.vectors, [VectorRow(source="bench")] * len(work.ids))
    load = LoadResult("search mirror", len(work.ids), len(work.ids), time.perf_counter() - t0)
    result = measure("search mirror", "exact, in-memory FAISS copy",
                     lambda q: mirror.search(q, k), hit_ids(k), work, k)
    return load, result


# --- Milvus (server and Lite) --------------------------------------------------------------


def hnsw(ef: int) -> IndexSpec:
    return IndexSpec("HNSW", dict(HNSW_BUILD), {"ef": ef})


def upsert_all(store: MilvusStore, work: Workload, batch: int, progress: bool) -> float:
    """Seconds to upsert every vector, ``batch`` per call."""
    rows = [VectorRow(source="bench")] * batch
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(work.ids), batch), desc=f"upsert {store.uri}",
                      unit="batch", disable=not progress, leave=False):
        ids = work.ids[start:start + batch]
        store.upsert(COLLECTION, ids.tolist(), work.vectors[start:start + len(ids)],
                     rows[:len(ids)])
    return time.perf_counter() - t0


def wait_for_index(store: MilvusStore, name: str, n: int, *, timeout_s: float = 7200.0,
                   progress: bool = False) -> None:
    """The store's wait for the index over ``n`` rows, with a progress bar."""
    with tqdm(total=n, desc=f"index {name}", unit="row", disable=not progress,
              leave=False) as bar:
        store.wait_for_index(name, n, timeout_s=timeout_s,
                             on_progress=lambda done: bar.update(done - bar.n))


def settle_index(store: MilvusStore, name: str, n: int, progress: bool = False) -> Settle:
    """Flush, wait for the index over ``n`` rows, then release and load (so that searches
    use the sealed, indexed segments)."""
    t0 = time.perf_counter()
    store.flush(name)
    t1 = time.perf_counter()
    wait_for_index(store, name, n, progress=progress)
    t2 = time.perf_counter()
    store.client.release_collection(name)
    store.client.load_collection(name)
    return Settle(t1 - t0, t2 - t1, time.perf_counter() - t2)


def load_store(system: str, store: MilvusStore, work: Workload, batch: int,
               progress: bool) -> LoadResult:
    store.ensure_collection(COLLECTION, work.dim)
    insert_s = upsert_all(store, work, batch, progress)
    settle = settle_index(store, COLLECTION, len(work.ids), progress)
    log.info("%s: upsert %.1f s, flush+index+load %.1f s", system, insert_s, settle.total_s)
    return LoadResult(system, len(work.ids), batch, insert_s, settle)


def search_fn(store: MilvusStore, k: int) -> Callable[[np.ndarray], Any]:
    return lambda q: store.search_ann(COLLECTION, q, k, consistency="Session")


def server_results(uri: str, work: Workload, ef_values: Sequence[int], k: int, batch: int,
                   progress: bool) -> tuple[LoadResult, list[SearchResult], str]:
    """Load the server's collection, search it at each ``ef``, drop it."""
    store = MilvusStore(uri, index=hnsw(ef_values[0]), consistency="Session")
    try:
        store.drop(COLLECTION)
        load = load_store("Milvus server", store, work, batch, progress)
        results = []
        for ef in ef_values:
            store.index = hnsw(ef)
            results.append(measure("Milvus server", label_of(store.index), search_fn(store, k),
                                   hit_ids(k), work, k))
        return load, results, str(store.client.get_server_version())
    finally:
        with contextlib.suppress(VectorStoreError):
            store.drop(COLLECTION)
        store.close()


def lite_results(work: Workload, k: int, batch: int, n_queries: int, workdir: Path | None,
                 progress: bool) -> tuple[LoadResult, SearchResult]:
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-lite-") as tmp:
        store = MilvusStore(str(Path(tmp) / "bench.db"))  # the default index (HNSW, ef 64)
        try:
            load = load_store("Milvus Lite", store, work, batch, progress)
            result = measure("Milvus Lite", label_of(store.index), search_fn(store, k),
                             hit_ids(k), work, k, n_queries)
            return load, result
        finally:
            store.close()


@contextlib.contextmanager
def milvus_server(uri: str | None, workdir: Path | None = None) -> Iterator[str]:
    """``uri`` as it is, or a server of our own for the duration (always stopped)."""
    if uri:
        yield uri
        return
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-milvus-") as tmp:
        server = LocalMilvusServer(Path(tmp) / "milvus")
        try:
            yield server.start()
        finally:
            server.stop()


# --- the run -------------------------------------------------------------------------------


def run_server_bench(
    n: int,
    dim: int = 192,
    *,
    server_uri: str | None = None,
    ef_values: Sequence[int] = DEFAULT_EF,
    n_queries: int | None = None,
    lite_queries: int | None = None,
    lite: bool = True,
    n_clusters: int = 1000,
    k: int = 10,
    batch: int = 10_000,
    seed: int = 0,
    workdir: Path | None = None,
    progress: bool = True,
) -> ServerReport:
    """All four systems at one size (see the module docstring). Starts a Milvus server of its
    own (and stops it) unless ``server_uri`` names one."""
    set_threads(FAISS_THREADS)
    nq = n_queries or default_queries(n)
    work = make_workload(n, dim, nq, n_clusters=n_clusters, seed=seed)
    report = ServerReport(n, dim, n_clusters, k, machine_info(), lite_skipped=not lite)
    for load, result in (faiss_results(work, k), mirror_results(work, k)):
        report.loads.append(load)
        report.searches.append(result)
    gc.collect()  # the mirror's copy of the vectors
    with milvus_server(server_uri, workdir) as uri:
        load, results, report.server_version = server_results(uri, work, ef_values, k, batch,
                                                               progress)
    report.loads.append(load)
    report.searches += results
    if lite:
        lq = lite_queries or default_lite_queries(n, nq)
        load, result = lite_results(work, k, batch, lq, workdir, progress)
        report.loads.append(load)
        report.searches.append(result)
    report.load_avg_end = [round(x, 2) for x in os.getloadavg()]
    return report


# --- markdown ------------------------------------------------------------------------------


def server_label(version: str) -> str:
    """The server's own version string (the PyPI build says "v2.3.5-lite") and the package."""
    try:
        package = importlib.metadata.version("milvus")
    except importlib.metadata.PackageNotFoundError:
        package = "?"
    return f"Milvus server {version} (standalone binary of PyPI milvus {package})"


def server_version(uri: str) -> str:
    store = MilvusStore(uri)
    try:
        return str(store.client.get_server_version())
    finally:
        store.close()


def machine_line(m: dict[str, Any], server_version: str = "") -> str:
    th, v = m["threads"], m["versions"]
    server = f"{server_label(server_version)}, " if server_version else ""
    return (f"Machine: {m['cpu']}, {m['cores']} cores; threads: OMP_NUM_THREADS="
            f"{th['OMP_NUM_THREADS']}, FAISS {th['faiss_omp']} (set_threads({FAISS_THREADS})), "
            f"torch {th.get('torch', '?')}; {server}Milvus Lite {v['milvus_lite']}, pymilvus "
            f"{v['pymilvus']}, FAISS {v['faiss']}; load average at start {m['load_avg']}; "
            f"{m['date']}.")


def search_table(report: ServerReport) -> list[str]:
    exact = report.result("FAISS exact")[0]
    lines = ["| system | configuration | queries | single p50 ms | single p95 ms | × FAISS p50 "
             f"| recall@{report.k} vs FAISS exact |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report.searches:
        ratio = r.p50_ms / exact.p50_ms if exact.p50_ms > 0 else float("nan")
        lines.append(f"| {r.system} | {r.config} | {r.queries} | {r.p50_ms:.2f} | "
                     f"{r.p95_ms:.2f} | {ratio:.2f} | {r.recall_at_10:.4f} |")
    return lines


def load_table(report: ServerReport) -> list[str]:
    lines = ["| system | vectors | per call | insert / add s | vectors/s | flush s "
             "| index build after it s | release + load s | flush + index + load s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.loads:
        st = r.settle
        tail = ("— | — | — | —" if st is None else
                f"{st.flush_s:.1f} | {st.index_s:.1f} | {st.load_s:.1f} | {st.total_s:.1f}")
        lines.append(f"| {r.system} | {r.vectors:,} | {r.batch:,} | {r.insert_s:.2f} | "
                     f"{r.per_s:,.0f} | {tail} |")
    return lines


def to_markdown(report: ServerReport) -> str:
    lite = report.result("Milvus Lite")
    notes = []
    if lite and lite[0].queries < report.result("FAISS exact")[0].queries:
        notes.append(f"Milvus Lite searched the first {lite[0].queries} queries only "
                     "(its recall is over those).")
    if lite:
        notes.append("Milvus Lite reports its index complete as soon as the rows are in, so "
                     "its build time falls in its flush or its release + load.")
    if report.lite_skipped:
        notes.append("Milvus Lite skipped at this size (--skip-lite-above).")
    lines = [
        f"### {report.n:,} vectors × {report.dim} dims ({report.n_clusters} clusters, k="
        f"{report.k}): Milvus server, search mirror, FAISS exact, Milvus Lite",
        "", machine_line(report.machine, report.server_version), "",
        f"Single-query search: one query per call after {WARMUP} warm-up queries; Milvus "
        "searches at Session consistency; server HNSW M 16 / efConstruction 200; load "
        f"average at end {report.load_avg_end}.",
        "", *search_table(report), "", *load_table(report), "",
    ]
    return "\n".join(lines + [f"- {n}" for n in notes]) + "\n"


# --- the search service end to end (bench_search) ------------------------------------------


def service_args(queries: int) -> argparse.Namespace:
    """bench_search's defaults: k 12, 8 clients, torch 1 thread, HNSW (ef 64)."""
    return argparse.Namespace(queries=queries, k=12, clients=8, threads=1, index="HNSW",
                              nlist=1024, nprobe=16)


def run_service(n: int, server_uri: str, *, queries: int = 64, lite: bool = True,
                workdir: Path | None = None) -> list[dict[str, Any]]:
    """The search service and page at ``n`` images on the server (mirror and the server's
    own search), then on Milvus Lite: ``bench_search.run_size`` rows with a ``store`` key."""
    import bench_search  # heavy (torch, the page): only when asked for
    from carsearch.training.base_model import build_compact_base

    args = service_args(queries)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-service-") as tmp:
        model = Path(tmp) / "compact"
        build_compact_base(model, seed=0)
        for store, uri in [("server", server_uri)] + ([("Lite", "")] if lite else []):
            root = Path(tmp) / store
            root.mkdir()
            got = bench_search.run_size(n, args, model, root, milvus_uri=uri,
                                        after_fill=settle_index if uri else None)
            rows += [{"store": store, **r} for r in got]
    return rows


def service_markdown(rows: Sequence[dict[str, Any]], machine: dict[str, Any],
                     version: str = "") -> str:
    lines = ["### Search service end to end: Milvus server, mirror and Milvus Lite", "",
             machine_line(machine, version), "",
             "bench_search's world (compact model, torch 1 thread, k 12, the text query "
             "encoded per call); vector index HNSW M 16 / efConstruction 200 / ef 64.", "",
             "| images | Milvus | vector search | encode p50 | search p50 | service p50 | "
             "service p95 | page p50 | page p95 | page queries/s, 8 clients |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r[key][i]:.1f}" for key, i in (("enc", 0), ("ann", 0), ("svc", 0),
                                                   ("svc", 1), ("page", 0), ("page", 1))]
        backend = "mirror (exact, in memory)" if r["backend"] == "mirror" else "its own HNSW"
        lines.append(f"| {r['n']:,} | {r['store']} | {backend} | " + " | ".join(cells)
                     + f" | {r['qps']:.1f} |")
    lines += ["", "(milliseconds; search = the vector search alone; service = encode + search "
              "+ metadata + query log; page = service + NL filters + captions + thumbnails)"]
    lines += [f"- mirror build at {r['n']:,} vectors from {r['store']}: {r['build_s']:.1f} s, "
              f"RSS {r['build_mb']:+.0f} MB" for r in rows if "build_s" in r]
    return "\n".join(lines) + "\n"


# --- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--queries", type=int, help="timed queries (default 200, 100 at 1M+)")
    ap.add_argument("--lite-queries", type=int,
                    help="Milvus Lite queries (default: as --queries, 30 at 1M+)")
    ap.add_argument("--ef", type=int, nargs="+", default=list(DEFAULT_EF))
    ap.add_argument("--batch", type=int, default=10_000, help="vectors per upsert call")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--skip-lite-above", type=int, help="no Milvus Lite above N vectors")
    ap.add_argument("--server-uri", help="an existing Milvus server (default: start one here)")
    ap.add_argument("--service", action="store_true",
                    help="also the search service end to end (bench_search) on the server")
    ap.add_argument("--service-size", type=int, default=100_000)
    ap.add_argument("--service-queries", type=int, default=64)
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def lite_allowed(n: int, args: argparse.Namespace) -> bool:
    return args.skip_lite_above is None or n <= args.skip_lite_above


def run_all(args: argparse.Namespace, uri: str) -> tuple[list[str], dict[str, Any]]:
    sections: list[str] = []
    raw: dict[str, Any] = {"runs": []}
    for n in args.sizes:
        report = run_server_bench(
            n, args.dim, server_uri=uri, ef_values=args.ef, n_queries=args.queries,
            lite_queries=args.lite_queries, lite=lite_allowed(n, args),
            n_clusters=args.clusters, batch=args.batch, progress=not args.no_progress)
        sections.append(to_markdown(report))
        raw["runs"].append(report.to_dict())
        print(sections[-1], flush=True)
    if args.service:
        rows = run_service(args.service_size, uri, queries=args.service_queries,
                           lite=lite_allowed(args.service_size, args))
        sections.append(service_markdown(rows, machine_info(), server_version(uri)))
        raw["service"] = rows
        print(sections[-1], flush=True)
    return sections, raw


def _terminate(signum: int, frame: object) -> None:
    del frame
    sys.exit(128 + signum)  # SystemExit: the finally blocks stop the server


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, _terminate)
    t0 = time.perf_counter()
    with milvus_server(args.server_uri) as uri:
        sections, raw = run_all(args, uri)
    total = time.perf_counter() - t0
    footer = f"Whole run: {total / 60:.1f} min.\n"
    print(footer)
    if args.out:
        args.out.write_text("\n".join(sections) + "\n" + footer, encoding="utf-8")
    if args.json:
        raw["total_s"] = total
        args.json.write_text(json.dumps(raw, indent=2, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
