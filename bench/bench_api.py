"""The JSON API's search latency next to the search service's own, at 100k images.

The world is bench_search's: the compact base published and promoted, N synthetic
vehicles (clustered unit vectors into Milvus Lite, rows into SQLite, one real photo for
the thumbnails), served from the search mirror. The page is started in this process the
way `carsearch serve` starts it (`ui.app.launch`: Gradio, the request gate, the API
mounted at /api/v1) on a free loopback port, and two paths are timed on the same
queries, alternating one query each, one at a time:

  service  SearchService.search(SearchRequest): what the API's handler calls
  api      carsearch.client.Client.search over HTTP: the gate, JSON in and out (pydantic
           on both sides), the response shaped with thumbnail URLs
  health   GET /api/v1/health through the client: the HTTP round trip with no search

The per-client search limit is raised for the run (the bench is one client sending
hundreds of queries). Prints a markdown table.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_api.py --size 100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import faulthandler
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from PIL import Image as PILImage

from bench_search import QUERIES, fill
from carsearch.client import Client
from carsearch.platform.db import migrate
from carsearch.platform.runtime import Platform
from carsearch.platform.search.nlfilters import VocabularyCache
from carsearch.platform.search.service import SearchRequest
from carsearch.platform.settings import Settings
from carsearch.training.base_model import build_compact_base
from carsearch.ui.app import LaunchOptions, launch
from machine import machine_line


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def p50_p95(ms: list[float]) -> tuple[float, float]:
    return statistics.median(ms), statistics.quantiles(ms, n=20)[18]


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: where it is stuck, if it is
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=160, help="timed queries per path")
    ap.add_argument("--k", type=int, default=12)
    args = ap.parse_args()
    load_before = machine_line()
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        root = Path(tmp)
        model = root / "compact"
        build_compact_base(model, seed=0)
        settings = Settings(data_dir=root / "data", threads={"torch": 1},  # type: ignore[arg-type]
                            ui_searches_per_s=10_000.0, ui_search_burst=100_000)
        settings.ensure_dirs()
        migrate.upgrade(settings.database_url)
        photo = root / "car.png"
        PILImage.new("RGB", (128, 96), (180, 30, 30)).save(photo)
        plat = Platform(settings)
        demo = None
        try:
            version = plat.registry.publish(model, name="bench")
            plat.registry.promote("bench")
            fill(plat, version.collection, version.dim, args.size, photo)
            port = free_port()
            demo = launch(plat, LaunchOptions(port=port), block=False)
            plat.search.warm(wait=True)  # the mirror built before timing
            vocab = VocabularyCache(plat.db).get()  # cached, as the page's is
            queries = [QUERIES[i % len(QUERIES)] for i in range(args.queries)]
            with Client(f"http://127.0.0.1:{port}") as api:
                for q in QUERIES:  # warm both paths: caches, thumbnails, vocabulary
                    api.search(q, k=args.k)
                    plat.search.search(SearchRequest(q, args.k, vocabulary=vocab))
                svc: list[float] = []
                http: list[float] = []
                trip: list[float] = []  # GET /api/v1/health: the round trip alone
                for q in queries:
                    t0 = time.perf_counter()
                    api.health()
                    trip.append((time.perf_counter() - t0) * 1000.0)
                    t0 = time.perf_counter()
                    plat.search.search(SearchRequest(q, args.k, vocabulary=vocab))
                    svc.append((time.perf_counter() - t0) * 1000.0)
                    t0 = time.perf_counter()
                    res = api.search(q, k=args.k)
                    http.append((time.perf_counter() - t0) * 1000.0)
                    assert len(res.hits) == args.k
            report(args, load_before, svc, http, trip)  # before the shutdown, which may be slow
        finally:
            if demo is not None:
                demo.close()
            plat.close()


def report(args: argparse.Namespace, load_before: str, svc: list[float],
           http: list[float], trip: list[float]) -> None:
    s50, s95 = p50_p95(svc)
    a50, a95 = p50_p95(http)
    t50, t95 = p50_p95(trip)
    print(f"machine: {load_before} before, {machine_line().split(', ')[-1]} after · "
          f"torch threads 1 · OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} "
          f"· {args.size:,} images · k {args.k} · {args.queries} queries a path, "
          f"alternating · {dt.date.today().isoformat()}\n")
    print("| path | p50 ms | p95 ms |")
    print("|---|---:|---:|")
    print(f"| service: SearchService.search | {s50:.2f} | {s95:.2f} |")
    print(f"| API: POST /api/v1/search through carsearch.client | {a50:.2f} | {a95:.2f} |")
    print(f"| API: GET /api/v1/health (the HTTP round trip, no search) | {t50:.2f} | "
          f"{t95:.2f} |")
    print(f"\nAPI p50 - service p50: {a50 - s50:+.2f} ms (goal: within 2 ms)", flush=True)


if __name__ == "__main__":
    main()
