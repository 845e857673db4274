"""PyTorch against ONNX Runtime for the same model, side by side in one run: images/s
(batches of 32 through the real preprocessor) and single text-query latency, at 1 and 2
threads. Prints a markdown table.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_onnx.py [--model DIR] [--images 256]
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
import torch

from carsearch.platform.models.encoder import Encoder
from carsearch.platform.models.onnx import OnnxEncoder, export_onnx, sample_inputs
from carsearch.training.base_model import build_compact_base
from machine import cpu_name

QUERIES = ["red 2012 chevy pickup", "older model mercedes coupe", "white suv", "jeep",
           "a blue hatchback from the late 2000s", "ford truck"]


def measure(enc: Encoder | OnnxEncoder, n_images: int, n_queries: int) -> tuple[float, float]:
    images, _ = sample_inputs(32, seed=1)
    batch = (images * (n_images // 32 + 1))[:n_images]
    enc.encode_images(images[:4])
    enc.encode_text(QUERIES)  # warm
    t0 = time.perf_counter()
    enc.encode_images(batch)
    ips = n_images / (time.perf_counter() - t0)
    ms = []
    for i in range(n_queries):
        t = time.perf_counter()
        enc.encode_text([QUERIES[i % len(QUERIES)]])
        ms.append((time.perf_counter() - t) * 1000)
    return ips, statistics.median(ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a model dir (default: compact)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--queries", type=int, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        model = args.model or Path(tmp) / "compact"
        if args.model is None:
            build_compact_base(model, seed=0)
        out = Path(tmp) / "onnx"
        export_onnx(model, out)
        rows = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            pt = Encoder(model, batch_size=32, torch_threads=threads)
            ox = OnnxEncoder(out, batch_size=32, threads=threads)
            # interleaved: PyTorch, ONNX, PyTorch, ONNX; the medians of the two runs
            runs: dict[str, list[tuple[float, float]]] = {"PyTorch": [], "ONNX Runtime": []}
            for _ in range(2):
                runs["PyTorch"].append(measure(pt, args.images, args.queries))
                runs["ONNX Runtime"].append(measure(ox, args.images, args.queries))
            for name, r in runs.items():
                rows.append((threads, name, float(np.median([x[0] for x in r])),
                             float(np.median([x[1] for x in r]))))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores · model {args.model or 'compact'} · "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} · "
          f"{dt.date.today().isoformat()}\n")
    print("| threads | runtime | images/s (batch 32) | text query p50 ms |")
    print("|---:|---|---:|---:|")
    for threads, name, ips, ms in rows:
        print(f"| {threads} | {name} | {ips:.1f} | {ms:.2f} |")


if __name__ == "__main__":
    main()
