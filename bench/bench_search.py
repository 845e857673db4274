"""Query latency of the search page's search function at 10k and 100k indexed images.

The world: the compact SigLIP base, published and promoted through the Registry, and
N synthetic vehicles: clustered unit vectors written straight into Milvus Lite (with
their make / body / colour / year / source scalar fields) and matching rows in SQLite.
Their thumbnails all come from one real generated image, so the page path has files
to show. Two paths are timed, one query at a time:

  service  SearchService.search_text: text encode + vector search + metadata + query log
  page     SearchPage.search_text: the same plus natural-language filters (parsed,
           validated against the DB vocabulary, applied as scalar filters),
           captions and thumbnails (warm cache)

and then queries/s with 8 concurrent clients through the page path. Each size is timed
twice on the same data, side by side: with the search mirror (platform/mirror.py, the
default on Milvus Lite) and with Milvus Lite's own search. Prints a markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_search.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import insert
from tqdm import tqdm

from carsearch.platform.db import Image, ImageStatus, migrate
from carsearch.platform.ids import collection_name
from carsearch.platform.runtime import Platform
from carsearch.platform.search.nlfilters import parse_query
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.milvus import IndexSpec, MilvusStore
from carsearch.platform.vectors.mirror import MirroredStore
from carsearch.platform.vectors.protocol import VectorRow, VectorStoreError
from carsearch.platform.vehicles import COLOURS, MAKE_ALIASES
from carsearch.training.base_model import build_compact_base
from carsearch.ui.page import PickedFilters, SearchPage
from machine import cpu_name, wait_until_idle

BODIES = {"Sedan": "sedan", "Coupe": "coupe", "SUV": "suv", "Crew Cab": "pickup",
          "Hatchback": "hatchback", "Convertible": "convertible", "Minivan": "minivan"}
QUERIES = [
    "red 2012 chevy pickup", "older model mercedes coupe", "black bmw sedan", "white suv",
    "a blue hatchback from the late 2000s", "ford truck", "silver audi convertible 2011",
    "family minivan", "green jeep", "yellow sports car", "porsche 911", "grey volvo wagon",
    "something fast and shiny", "toyota 2008", "dodge ram crew cab", "orange lamborghini",
]


def synthetic_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.normal(size=(max(8, n // 200), dim)).astype(np.float32)
    labels = rng.integers(0, len(centres), n)
    vecs = centres[labels] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def published_and_filled(platform_: Platform, model: Path, n: int, photo: Path) -> Any:
    """`model` published and promoted as "bench", its collection filled with n synthetic
    vehicles, the search mirror built and Milvus Lite's index build after the flush
    waited out: a serving collection ready to time."""
    version = platform_.registry.publish(model, name="bench")
    platform_.registry.promote("bench")
    fill(platform_, version.collection, version.dim, n, photo)
    platform_.search.warm(wait=True)  # the mirror built before timing
    waited = wait_until_idle()  # Milvus Lite's index build after the flush
    print(f"waited {waited:.0f} s for the process to be idle", flush=True)
    return version


def fill(platform_: Platform, collection: str, dim: int, n: int, photo: Path) -> None:
    """N synthetic vehicles: vectors into Milvus, rows into the database."""
    rng = np.random.default_rng(0)
    makes = list(MAKE_ALIASES)
    bodies = list(BODIES)
    store = platform_.store
    store.ensure_collection(collection, dim)
    batch = 5000
    for start in tqdm(range(0, n, batch), desc=f"fill {n}", unit="batch"):
        ids = list(range(start + 1, min(n, start + batch) + 1))
        vecs = synthetic_vectors(len(ids), dim, rng)
        meta = [
            (makes[int(rng.integers(len(makes)))], bodies[int(rng.integers(len(bodies)))],
             COLOURS[int(rng.integers(len(COLOURS)))], int(rng.integers(1995, 2013)),
             "stanford" if rng.random() < 0.5 else "synthetic")
            for _ in ids
        ]
        rows = [VectorRow(make=m, body=BODIES[b], colour=c, year=y, source=s)
                for m, b, c, y, s in meta]
        store.upsert(collection, ids, vecs, rows)
        values = [
            {"id": i, "sha256": f"{i:064x}", "path": str(photo), "source": s, "make": m,
             "model": "Model", "year": y, "body_type": b, "colour": c,
             "class_name": f"{m} Model {b} {y}", "status": ImageStatus.indexed.value}
            for i, (m, b, c, y, s) in zip(ids, meta, strict=True)
        ]
        with platform_.db.session() as s:
            s.execute(insert(Image), values)
    store.flush(collection)  # growing segments search far slower than sealed ones


def percentiles(ms: Sequence[float]) -> tuple[float, float]:
    q = statistics.quantiles(ms, n=20)
    return statistics.median(ms), q[18]


def timed(fn: Callable[[str], object], queries: Sequence[str]) -> list[float]:
    out = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def concurrent_qps(fn: Callable[[str], object], queries: Sequence[str], clients: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(fn, queries))
    return len(queries) / (time.perf_counter() - t0)


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def time_paths(page: SearchPage, collection: str, args: argparse.Namespace,
               vecs: dict[str, np.ndarray]) -> dict[str, object]:
    """Encode, vector search, service and page latencies, then concurrent queries/s."""
    store = page.platform.store
    queries = [QUERIES[i % len(QUERIES)] for i in range(args.queries)]

    def page_fn(q: str) -> object:
        return page.search_text(q, args.k, PickedFilters())

    timed(page_fn, QUERIES)  # warm: caches, thumbnails, vocabulary
    encoder = page.service.encoder_for(page.service.serving())
    parsed = {q: parse_query(page.service.clean_query(q), page.vocabulary()) for q in QUERIES}
    relaxed = [page.service.search_text(q, args.k, preferred=parsed[q].chips) for q in QUERIES]
    return {
        # The filters read from the text as hard filters (before issue 14) and as
        # preferences relaxed until k hits (now), side by side on the same queries.
        "hard": percentiles(timed(
            lambda q: page.service.search_text(q, args.k, parsed[q].filters), queries)),
        "relax": percentiles(timed(
            lambda q: page.service.search_text(q, args.k, preferred=parsed[q].chips),
            queries)),
        "n_relaxed": sum(1 for r in relaxed if r.relaxed),
        "tiers": statistics.mean(len(r.tiers) or 1 for r in relaxed),
        "enc": percentiles(timed(lambda q: encoder.encode_text([q]), queries)),
        "ann": percentiles(timed(lambda q: store.search(collection, vecs[q], args.k),
                                 queries)),
        "svc": percentiles(timed(lambda q: page.service.search_text(q, args.k), queries)),
        "page": percentiles(timed(page_fn, queries)),
        "qps": concurrent_qps(page_fn, queries * 2, args.clients),
    }


def run_size(n: int, args: argparse.Namespace, model: Path, root: Path, *,
             milvus_uri: str = "",
             after_fill: Callable[[MilvusStore, str, int], object] | None = None,
             ) -> list[dict[str, object]]:
    """Both backends at one size. ``milvus_uri``: a Milvus server instead of a Lite file
    under ``root`` (its collection is dropped before and after); ``after_fill(store,
    collection, n)`` runs once the vectors are in (a server: wait for its index, reload)."""
    data = root / f"n{n}"
    settings = Settings(data_dir=data, milvus_uri=milvus_uri,
                        threads={"torch": args.threads})  # type: ignore[arg-type]
    settings.ensure_dirs()
    migrate.upgrade(settings.database_url)
    photo = root / "car.png"
    if not photo.is_file():
        PILImage.new("RGB", (128, 96), (180, 30, 30)).save(photo)
    plat = Platform(settings)
    if args.index == "HNSW":
        spec = IndexSpec.default_for(lite=True)
    else:
        spec = IndexSpec(args.index, {"nlist": args.nlist} if args.index == "IVF_FLAT" else {},
                         {"nprobe": args.nprobe} if args.index == "IVF_FLAT" else {})
    store = MirroredStore(settings.milvus_uri, index=spec)
    plat.__dict__["store"] = store
    if not store.is_lite:  # a server outlives this run
        store.drop(collection_name("bench"))
    try:
        version = plat.registry.publish(model, name="bench")
        plat.registry.promote("bench")
        fill(plat, version.collection, version.dim, n, photo)
        if after_fill is not None:
            after_fill(store, version.collection, n)
        page = SearchPage(plat)
        page.warm_up()  # starts the mirror build in the background, as `serve` does
        store.warm(version.collection)  # wait for it
        encoder = page.service.encoder_for(version)
        vecs = {q: encoder.encode_text([q]) for q in QUERIES}
        # Rebuild once more to time the build and its memory on its own.
        store.forget(version.collection)
        rss0, t0 = rss_mb(), time.perf_counter()
        store.warm(version.collection)
        build_s, build_mb = time.perf_counter() - t0, rss_mb() - rss0
        mirrored = time_paths(page, version.collection, args, vecs)
        store.auto_build = False
        store.forget(version.collection)  # from here on: Milvus Lite's own search
        milvus = time_paths(page, version.collection, args, vecs)
        return [{"n": n, "backend": "mirror", "build_s": build_s, "build_mb": build_mb,
                 **mirrored},
                {"n": n, "backend": "Milvus Lite" if store.is_lite else "Milvus server",
                 **milvus}]
    finally:
        if not store.is_lite:
            with contextlib.suppress(VectorStoreError):
                store.drop(collection_name("bench"))
        plat.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=64, help="timed queries per path")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--index", choices=["HNSW", "FLAT", "IVF_FLAT"], default="HNSW",
                    help="HNSW: the store's default (M 16, efConstruction 200, ef 64)")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--model", type=Path, default=None,
                    help="a model directory (default: a compact SigLIP built here)")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        root = Path(tmp)
        model = args.model or root / "compact"
        if args.model is None:
            build_compact_base(model, seed=0)
        for n in args.sizes:
            results.extend(run_size(n, args, model, root))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores · torch threads {args.threads} · "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} · index {args.index}"
          + (f" (nlist {args.nlist}, nprobe {args.nprobe})" if args.index == "IVF_FLAT" else "")
          + f" · k {args.k} · {dt.date.today().isoformat()} · model "
          + (args.model.name if args.model else "compact SigLIP")
          + f" · 1-min load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| images | vector search | encode p50 | search p50 | service p50 | service p95 "
          f"| page p50 | page p95 | page queries/s, {args.clients} clients |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        cells = [f"{r[key][i]:.1f}"  # type: ignore[index]
                 for key, i in (("enc", 0), ("ann", 0), ("svc", 0), ("svc", 1),
                                ("page", 0), ("page", 1))]
        print(f"| {r['n']:,} | {r['backend']} | " + " | ".join(cells)
              + f" | {r['qps']:.1f} |")
    print("\n(milliseconds; search = the vector search alone; service = encode + search + "
          "metadata + query log; page = service + NL filters + captions + thumbnails)\n")
    print("| images | vector search | filters from the text hard: p50 / p95 | relaxed to fill "
          f"k: p50 / p95 | queries relaxed (of {len(QUERIES)}) | searches per query |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in results:
        hard, relax = r["hard"], r["relax"]
        print(f"| {r['n']:,} | {r['backend']} | {hard[0]:.1f} / {hard[1]:.1f} "  # type: ignore[index]
              f"| {relax[0]:.1f} / {relax[1]:.1f} | {r['n_relaxed']} | {r['tiers']:.1f} |")  # type: ignore[index]
    print()
    for r in results:
        if "build_s" in r:
            print(f"- mirror build at {r['n']:,} vectors: {r['build_s']:.1f} s, "
                  f"RSS +{r['build_mb']:.0f} MB")


if __name__ == "__main__":
    main()
