"""Encode throughput of the compact SigLIP base against a SigLIP-base-sized model.

Both models are built here with random weights (throughput does not depend on the
weights) and encoded through the project's Encoder, as ingest and search use it.
Images are decoded before timing starts, so the figures are preprocessing + model.
Prints a markdown table for docs/BENCHMARKS.md.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_encoder.py --threads 2 --batch-size 64
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from carsearch.platform.models.encoder import Encoder
from carsearch.training.base_model import BUILD_INFO, CompactSpec, TowerSize, build_compact_base
from machine import cpu_name, sample_photos

BASE_SIZED = CompactSpec(
    image_size=224,
    patch_size=16,
    text_max_length=64,
    vision=TowerSize(hidden=768, layers=12, heads=12),
    text=TowerSize(hidden=768, layers=12, heads=12),
)


def _texts(n: int) -> list[str]:
    colours = ["red", "dark blue", "white", "silver", "black"]
    things = ["chevy silverado pickup", "older model mercedes coupe", "bmw m3", "ford f-150 truck"]
    return [f"{colours[i % 5]} {1990 + i % 35} {things[i % 4]}" for i in range(n)]


def _rate(fn: Callable[[Sequence], np.ndarray], items: Sequence, batch: int) -> float:
    fn(items[:batch])  # warm-up: first-call allocations, kernel selection
    start = time.perf_counter()
    fn(items)
    return len(items) / (time.perf_counter() - start)


def _measure(name: str, model_dir: Path, args: argparse.Namespace, n_img: int, n_txt: int,
             images: list[Image.Image]) -> dict[str, str]:
    info = json.loads((model_dir / BUILD_INFO).read_text())
    enc = Encoder(model_dir, batch_size=args.batch_size, torch_threads=args.threads)
    enc.load()
    spec = info["spec"]
    return {
        "model": name,
        "parameters": f"{info['parameters'] / 1e6:.1f} M",
        "image / patch": f"{spec['image_size']} / {spec['patch_size']}",
        "width × layers": f"{spec['vision']['hidden']} × {spec['vision']['layers']}",
        "text length": str(spec["text_max_length"]),
        "dim": str(enc.dim),
        "images/s": f"{_rate(enc.encode_images, images[:n_img], args.batch_size):.1f}",
        "texts/s": f"{_rate(enc.encode_text, _texts(n_txt), args.batch_size):.1f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512, help="images for the compact model")
    parser.add_argument("--texts", type=int, default=2048, help="texts for the compact model")
    parser.add_argument("--base-batches", type=int, default=2, help="timed batches, base size")
    parser.add_argument("--skip-base", action="store_true", help="only the compact model")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    images, source = sample_photos(max(args.images, args.batch_size * (args.base_batches + 1)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        compact = build_compact_base(Path(tmp) / "compact", seed=0)
        rows.append(_measure("compact SigLIP (default)", compact, args, args.images,
                             args.texts, images))
        if not args.skip_base:
            n = args.batch_size * args.base_batches
            base = build_compact_base(Path(tmp) / "base", seed=0, spec=BASE_SIZED)
            rows.append(_measure("SigLIP-base-sized (random)", base, args, n, n, images))

    print(f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs; torch threads "
          f"{args.threads}, batch {args.batch_size}; {dt.date.today().isoformat()}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"inputs: {source}; 1-min load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after (other processes skew the figures).\n")
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row[h] for h in header) + " |")


if __name__ == "__main__":
    main()
