"""What MMR diversity costs a search in time, at k 12 and k 100, at 100k images.

The world is bench_search's (and bench_api's): the compact base published and promoted,
N synthetic vehicles (clustered unit vectors into Milvus Lite, rows into SQLite) served
from the search mirror, as `carsearch serve` serves them. Each of bench_search's queries
runs through `SearchService.search` with diversity 0 (off, the default) and with the
diversities named, alternating query by query, at each k; wall and the calling thread's
CPU time per search. With diversity the service gathers a pool of
max(4k, k + 20) best hits (their metadata too), reads their stored vectors and re-ranks
them by maximal marginal relevance (`querymix.mmr_order`); the last two are also timed
alone on each query's pool, to say where the difference goes. The time does not depend on
what the model learned, so the untrained base serves (MMR's effect on the page is
measured on the demo data: bench_search_features.py, part 6).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_diversity.py --size 100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from bench_search import QUERIES, published_and_filled
from carsearch.platform.db import migrate
from carsearch.platform.runtime import Platform
from carsearch.platform.search import service as service_mod
from carsearch.platform.search.nlfilters import VocabularyCache
from carsearch.platform.search.querymix import mmr_order
from carsearch.platform.search.service import SearchRequest
from carsearch.platform.settings import Settings
from carsearch.training.base_model import build_compact_base
from machine import machine_line


def pool_size(k: int) -> int:
    return max(k * service_mod.MMR_POOL_FACTOR, k + service_mod.MMR_POOL_MIN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=10,
                    help="passes over bench_search's 16 queries, per k")
    ap.add_argument("--ks", default="12,100")
    ap.add_argument("--diversities", default="0.5")
    args = ap.parse_args()
    ks = [int(x) for x in args.ks.split(",")]
    levels = [0.0, *(float(x) for x in args.diversities.split(","))]
    load_before = machine_line()
    with tempfile.TemporaryDirectory(prefix="bench-mmr-") as tmp:
        root = Path(tmp)
        model = root / "compact"
        build_compact_base(model, seed=0)
        settings = Settings(data_dir=root / "data", threads={"torch": 1})  # type: ignore[arg-type]
        settings.ensure_dirs()
        migrate.upgrade(settings.database_url)
        photo = root / "car.png"
        PILImage.new("RGB", (128, 96), (180, 30, 30)).save(photo)
        plat = Platform(settings)
        try:
            version = published_and_filled(plat, model, args.size, photo)
            svc = plat.search
            svc.warm(wait=True)
            vocab = VocabularyCache(plat.db).get()
            rows = run(svc, version.collection, ks, levels, args.rounds, vocab)
            print(f"machine: {load_before} before, {machine_line().split(', ')[-1]} after "
                  f"· torch threads 1 · OMP_NUM_THREADS="
                  f"{os.environ.get('OMP_NUM_THREADS', 'unset')} · {args.size:,} images "
                  f"· search path {svc.store.search_path(version.collection)} · "
                  f"{len(QUERIES)} queries x {args.rounds} rounds per k, diversities "
                  f"alternating · {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n")
            print("\n".join(rows))
        finally:
            plat.close()


def run(svc: service_mod.SearchService, collection: str, ks: list[int],
        levels: list[float], rounds: int, vocab: object) -> list[str]:
    out = ["| k | pool | diversity | search p50 ms | p95 ms | CPU ms p50 | CPU over off, p50 "
           "of the per-query difference | stored vectors of the pool, ms p50 "
           "| mmr_order, ms p50 | distinct classes in the page |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in ks:
        pool = pool_size(k)
        wall: dict[float, list[float]] = {lv: [] for lv in levels}
        cpu: dict[float, list[float]] = {lv: [] for lv in levels}
        classes: dict[float, list[int]] = {lv: [] for lv in levels}
        vec_ms: list[float] = []
        mmr_ms: dict[float, list[float]] = {lv: [] for lv in levels}
        for q in QUERIES:  # warm: encoder, caches
            for lv in levels:
                svc.search(SearchRequest(q, k, vocabulary=vocab, diversity=lv))  # type: ignore[arg-type]
        for _ in range(rounds):
            for q in QUERIES:
                for lv in levels:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    res = svc.search(SearchRequest(q, k, vocabulary=vocab,  # type: ignore[arg-type]
                                                   diversity=lv))
                    wall[lv].append((time.perf_counter() - t0) * 1000.0)
                    cpu[lv].append((time.thread_time() - c0) * 1000.0)
                    classes[lv].append(len({h.class_name for h in res.hits}))
        # The parts alone, on each query's pool (the best `pool` hits, as MMR gets them).
        for q in QUERIES:
            res = svc.search(SearchRequest(q, pool, vocabulary=vocab))  # type: ignore[arg-type]
            ids = [h.image_id for h in res.hits]
            scores = np.array([h.score for h in res.hits])
            for _ in range(rounds):
                c0 = time.thread_time()
                _, vecs = svc.store.vectors(collection, ids)
                vec_ms.append((time.thread_time() - c0) * 1000.0)
                for lv in levels[1:]:
                    c0 = time.thread_time()
                    mmr_order(scores, vecs, k, lv)
                    mmr_ms[lv].append((time.thread_time() - c0) * 1000.0)
        med = statistics.median
        for lv in levels:
            p95 = statistics.quantiles(wall[lv], n=20)[18]
            extra = ("-" if lv == 0.0 else
                     f"{med([a - b for a, b in zip(cpu[lv], cpu[0.0], strict=True)]):+.2f}")
            parts = ("- | -" if lv == 0.0 else f"{med(vec_ms):.3f} | {med(mmr_ms[lv]):.3f}")
            out.append(f"| {k} | {pool if lv else k} | {lv:g} | {med(wall[lv]):.2f} | "
                       f"{p95:.2f} | {med(cpu[lv]):.2f} | {extra} | {parts} | "
                       f"{statistics.mean(classes[lv]):.1f} |")
    return out


if __name__ == "__main__":
    main()
