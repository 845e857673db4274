"""How long the drift job's two costs take: detection, and reading the vectors.

Detection (`detect_drift`) on synthetic clustered unit vectors (100 known classes) with
a planted unknown vehicle (a tight cluster of 30 far from every class) among the new
ones, at the job's default sample caps and below; it must find exactly that cluster.
Then reading the sampled vectors by id out of a 100k-row Milvus Lite collection, as the
job does: through Milvus Lite's query, and from the search mirror, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_drift.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from carsearch.monitoring.drift import detect_drift
from carsearch.platform.vectors.milvus import MilvusStore
from carsearch.platform.vectors.mirror import MirroredStore
from carsearch.platform.vectors.protocol import VectorRow
from machine import cpu_name

DIM = 192


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def world(n_ref: int, n_new: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """References from 100 classes; new images from the same classes plus 30 unknown."""
    centres = unit(rng.normal(size=(100, DIM)))
    ref = unit(centres[rng.integers(0, 100, n_ref)] + 0.08 * rng.normal(size=(n_ref, DIM)))
    known = n_new - 30
    new_known = centres[rng.integers(0, 100, known)] + 0.08 * rng.normal(size=(known, DIM))
    stranger = unit(rng.normal(size=(1, DIM)))
    new_unknown = stranger + 0.03 * rng.normal(size=(30, DIM))
    return ref, unit(np.vstack([new_known, new_unknown]))


def median_s(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def detection_rows(sizes: list[tuple[int, int]], repeat: int) -> list[str]:
    rows = []
    for n_ref, n_new in sizes:
        ref, new = world(n_ref, n_new, np.random.default_rng(n_ref + n_new))
        found = detect_drift(ref, new)
        planted = set(range(n_new - 30, n_new))
        hit = [c for c in found.clusters if set(c.member_ids) <= planted]
        secs = median_s(lambda r=ref, n=new: detect_drift(r, n), repeat)
        rows.append(f"| {n_ref:,} | {n_new:,} | {secs:.2f} | {found.n_novel} | "
                    f"{found.n_isolated} | {'yes' if len(hit) == found.n_isolated == 1 else 'no'}"
                    f" |")
    return rows


def read_rows(n: int, n_read: int, root: Path, repeat: int) -> list[str]:
    rng = np.random.default_rng(0)
    store = MirroredStore(str(root / "milvus.db"))
    try:
        store.ensure_collection("drift", DIM)
        for start in range(0, n, 5000):
            ids = list(range(start + 1, min(n, start + 5000) + 1))
            store.upsert("drift", ids, unit(rng.normal(size=(len(ids), DIM))),
                         [VectorRow(source="bench")] * len(ids))
        store.flush("drift")
        want = rng.choice(np.arange(1, n + 1), size=n_read, replace=False).tolist()
        milvus = median_s(lambda: MilvusStore.vectors(store, "drift", want), repeat)
        store.warm("drift")
        mirror = median_s(lambda: store.vectors("drift", want), repeat)
        same = np.allclose(MilvusStore.vectors(store, "drift", want)[1],
                           store.vectors("drift", want)[1], atol=1e-6)
    finally:
        store.close()
    return [f"| Milvus Lite query (`id in [...]`, batches of 1,000) | {n:,} | {n_read:,} | "
            f"{milvus:.2f} | |",
            f"| search mirror (`reconstruct_batch`) | {n:,} | {n_read:,} | {mirror:.4f} | "
            f"{'identical' if same else 'DIFFERENT'} |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--collection", type=int, default=100_000)
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    load0 = os.getloadavg()[0]
    det = detection_rows([(5_000, 500), (20_000, 2_000), (20_000, 20_000)], args.repeat)
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        reads = read_rows(args.collection, 20_000, Path(tmp), args.repeat)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores · FAISS threads 1 · "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} · dim {DIM} · "
          f"{dt.date.today().isoformat()} · 1-min load average {load0:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after\n")
    print("| references | new | detection s (median) | novel | isolated clusters "
          "| found exactly the planted one |")
    print("|---:|---:|---:|---:|---:|---|")
    print("\n".join(det))
    print("\n| reading vectors by id | collection | ids | seconds (median) | values |")
    print("|---|---:|---:|---:|---|")
    print("\n".join(reads))


if __name__ == "__main__":
    main()
