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

The client runs in two places, alternating query by query: in a separate process (as
every API client does: `--client process`, a child Python that imports only
carsearch.client and times each call itself) and in this process's main thread (where
it competes for the GIL with the server it calls, which inflates each hand-off). Next to
wall time, CPU time per request: the service call's own thread (`thread_time`); for the
API, the server process's CPU during the call (all its threads) less its idle rate
(measured over 3 s with no request: Gradio's queue polls every millisecond) times the
call's wall time, plus the client's.

Side by side in one run (issue 26's goal, the API within 2 ms of the service):
``--servers`` starts one page per uvicorn setup named (h11 or httptools for HTTP, asyncio
or uvloop for the event loop: "h11", "httptools", "httptools+uvloop"; the default
"auto" is what `carsearch serve` gets, uvicorn's own choice from what is installed), and
``--transports`` runs one client process per carsearch.client transport ("stdlib",
"httpx"); every pair is timed on every query, alternating. The in-process client rows
use the first server and the first transport.

The per-client search limit is raised for the run (the bench is one client sending
hundreds of queries). Prints a markdown table.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_api.py --size 100000 \
        --servers h11,httptools+uvloop --transports httpx,stdlib
"""

from __future__ import annotations

import argparse
import datetime as dt
import faulthandler
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from PIL import Image as PILImage

from bench_search import QUERIES, published_and_filled
from carsearch.client import Client
from carsearch.platform.db import migrate
from carsearch.platform.runtime import Platform
from carsearch.platform.search.nlfilters import VocabularyCache
from carsearch.platform.search.service import SearchRequest
from carsearch.platform.settings import Settings
from carsearch.training.base_model import build_compact_base
from carsearch.ui.app import LaunchOptions, launch, log_http_stack
from machine import machine_line

# The client in its own process: reads "search K QUERY" or "health" lines, answers
# "WALL_MS CPU_MS" (wall and its own CPU time for the call, through carsearch.client).
CHILD = r"""
import sys, time
from carsearch.client import Client
with Client(sys.argv[1], transport=sys.argv[2]) as api:
    for line in sys.stdin:
        op, _, rest = line.rstrip("\n").partition(" ")
        t0, c0 = time.perf_counter(), time.process_time()
        if op == "health":
            api.health()
        else:
            k, _, q = rest.partition(" ")
            assert len(api.search(q, k=int(k)).hits) == int(k)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"{wall * 1000.0:.4f} {cpu * 1000.0:.4f}", flush=True)
"""


class ChildClient:
    """carsearch.client in a child process, one call at a time over its stdin/stdout."""

    def __init__(self, url: str, transport: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, url, transport], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(self, line: str) -> tuple[float, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        wall, cpu = self.proc.stdout.readline().split()
        return float(wall), float(cpu)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def uvicorn_setup(name: str) -> Iterator[None]:
    """Make uvicorn's "auto" (what Gradio asks for) mean ``name``'s HTTP implementation
    and event loop while a page starts ("auto": leave it). Gradio's launch returns once
    the server has started, by when uvicorn has read both."""
    import uvicorn.config as uc

    if name == "auto":
        yield
        return
    http, _, loop = name.partition("+")
    saved = uc.HTTP_PROTOCOLS["auto"], uc.LOOP_FACTORIES["auto"]
    uc.HTTP_PROTOCOLS["auto"] = uc.HTTP_PROTOCOLS[http]
    uc.LOOP_FACTORIES["auto"] = uc.LOOP_FACTORIES[loop or "asyncio"]
    try:
        yield
    finally:
        uc.HTTP_PROTOCOLS["auto"], uc.LOOP_FACTORIES["auto"] = saved


def served_by(demo: object) -> str:
    """The HTTP implementation and event loop a started page runs on."""
    line = log_http_stack(demo)  # type: ignore[arg-type]
    return line.removeprefix("HTTP: uvicorn ").replace(" on ", " + ")


def p50_p95(ms: list[float]) -> tuple[float, float]:
    return statistics.median(ms), statistics.quantiles(ms, n=20)[18]


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: where it is stuck, if it is
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=160, help="timed queries per path")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--servers", default="auto",
                    help="comma-separated uvicorn setups, one page each: auto, h11, "
                    "httptools, h11+uvloop, httptools+uvloop")
    ap.add_argument("--transports", default="stdlib",
                    help="comma-separated carsearch.client transports, one client process "
                    "each: stdlib, httpx")
    args = ap.parse_args()
    servers = [x.strip() for x in args.servers.split(",") if x.strip()]
    transports = [x.strip() for x in args.transports.split(",") if x.strip()]
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
        demos: list[object] = []
        children: dict[str, ChildClient] = {}
        try:
            published_and_filled(plat, model, args.size, photo)
            urls: dict[str, str] = {}
            labels: dict[str, str] = {}
            for name in servers:
                port = free_port()
                with uvicorn_setup(name):
                    demo = launch(plat, LaunchOptions(port=port), block=False)
                    labels[name] = served_by(demo)  # while uvicorn's "auto" means it
                demos.append(demo)
                urls[name] = f"http://127.0.0.1:{port}"
            vocab = VocabularyCache(plat.db).get()  # cached, as the page's is
            queries = [QUERIES[i % len(QUERIES)] for i in range(args.queries)]
            pairs = [(s_, t_) for s_ in servers for t_ in transports]
            for s_, t_ in pairs:
                children[f"{s_}|{t_}"] = ChildClient(urls[s_], t_)
            t: dict[str, list[float]] = {"svc": [], "svc_cpu": [], "local": [],
                                         "local_trip": []}
            for key in children:
                for part in ("api", "api_cpu", "api_client_cpu", "trip", "trip_cpu",
                             "trip_client_cpu"):
                    t[f"{part}|{key}"] = []
            with Client(urls[servers[0]], transport=transports[0]) as api:  # type: ignore[arg-type]
                for q in QUERIES:  # warm every path: caches, thumbnails, vocabulary
                    api.search(q, k=args.k)
                    for child in children.values():
                        child.call(f"search {args.k} {q}")
                    plat.search.search(SearchRequest(q, args.k, vocabulary=vocab))
                # The server process's CPU while nothing is asked of it (Gradio's queue
                # polls every millisecond, Milvus Lite's client pings): taken off each
                # call's CPU in proportion to its wall time.
                c0, t0 = time.process_time(), time.perf_counter()
                time.sleep(3.0)
                idle = (time.process_time() - c0) / (time.perf_counter() - t0)
                t["idle"] = [idle]
                for q in queries:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    plat.search.search(SearchRequest(q, args.k, vocabulary=vocab))
                    t["svc"].append((time.perf_counter() - t0) * 1000.0)
                    t["svc_cpu"].append((time.thread_time() - c0) * 1000.0)
                    for key, child in children.items():
                        for part, line in (("trip", "health"), ("api", f"search {args.k} {q}")):
                            c0 = time.process_time()
                            wall, client_cpu = child.call(line)
                            t[f"{part}|{key}"].append(wall)
                            t[f"{part}_cpu|{key}"].append(
                                (time.process_time() - c0) * 1000.0 + client_cpu - idle * wall)
                            t[f"{part}_client_cpu|{key}"].append(client_cpu)
                    t0 = time.perf_counter()
                    api.health()
                    t["local_trip"].append((time.perf_counter() - t0) * 1000.0)
                    t0 = time.perf_counter()
                    res = api.search(q, k=args.k)
                    t["local"].append((time.perf_counter() - t0) * 1000.0)
                    assert len(res.hits) == args.k
            report(args, load_before, t, labels, list(children))
        finally:
            for child in children.values():
                child.close()
            for demo in demos:
                demo.close()  # type: ignore[attr-defined]
            plat.close()


def report(args: argparse.Namespace, load_before: str, t: dict[str, list[float]],
           labels: dict[str, str], keys: list[str]) -> None:
    med = statistics.median
    print(f"machine: {load_before} before, {machine_line().split(', ')[-1]} after · "
          f"torch threads 1 · OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} "
          f"· {args.size:,} images · k {args.k} · {args.queries} queries a path, "
          f"alternating · {dt.date.today().isoformat()}\n")
    print("| path | server (uvicorn) | client | p50 ms | p95 ms | API - service p50 ms "
          "| p50 of the per-query API - service ms | CPU ms p50 | client CPU ms p50 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    s50 = med(t["svc"])
    p50, p95 = p50_p95(t["svc"])
    print(f"| service: SearchService.search | - | - | {p50:.2f} | {p95:.2f} | - | - "
          f"| {med(t['svc_cpu']):.2f} | - |")

    def paired(key: str) -> str:  # each query's API time less the same query's service time
        return f"{med([a - b for a, b in zip(t[key], t['svc'], strict=True)]):+.2f}"

    for key in keys:
        server, _, transport = key.partition("|")
        for part, label in (("api", "POST /api/v1/search, client in its own process"),
                            ("trip", "GET /api/v1/health, the same (round trip alone)")):
            p50, p95 = p50_p95(t[f"{part}|{key}"])
            gap = f"{p50 - s50:+.2f} | {paired(f'api|{key}')}" if part == "api" else "- | -"
            print(f"| {label} | {labels[server]} | {transport} | {p50:.2f} | {p95:.2f} "
                  f"| {gap} | {med(t[f'{part}_cpu|{key}']):.2f} "
                  f"| {med(t[f'{part}_client_cpu|{key}']):.2f} |")
    first = keys[0].partition("|")
    for key, label in (("local", "POST /api/v1/search, client in the server's process"),
                       ("local_trip", "GET /api/v1/health, client in the server's process")):
        p50, p95 = p50_p95(t[key])
        gap = f"{p50 - s50:+.2f} | {paired(key)}" if key == "local" else "- | -"
        print(f"| {label} | {labels[first[0]]} | {first[2]} | {p50:.2f} | {p95:.2f} | {gap} "
              "| - | - |")
    print(f"\nGoal: API p50 within 2 ms of the service's. CPU per request is the server "
          f"process's CPU during the call (all its threads) less its idle rate "
          f"({t['idle'][0] * 1000.0:.0f} ms a second with {len(labels)} page(s) up, taken "
          f"off in proportion to the call's wall time), plus the client's.", flush=True)


if __name__ == "__main__":
    main()
