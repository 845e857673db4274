"""Training throughput (samples/s) and peak memory (max RSS) on this machine.

    python bench/bench_train.py --data DATA_DIR/catalogue --out bench_train.json

Two configurations, each in its own process (so max RSS is its own): the compact base
(4.3M parameters, 64 px) and a SigLIP-base-sized random configuration (ViT-B/16 at
224 px and a 12-layer 768-wide text tower, ~200M parameters), a few optimizer steps of
the real training loop (`carsearch.training.trainer.train`) each. Throughput is samples over the
whole loop, first step (warm-up allocations) included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # name: (spec overrides, batch size, steps, full)
    "compact": ({}, 64, 12, True),
    "siglip-base-size": (
        {"image_size": 224, "patch_size": 16, "text_max_length": 64, "vocab_size": 32000,
         "width": 768, "layers": 12, "heads": 12},
        16, 4, True,
    ),
}


def _build(name: str, out: Path) -> Path:
    from carsearch.training.base_model import CompactSpec, TowerSize, build_compact_base

    spec_args, *_ = SIZES[name]
    if not spec_args:
        return build_compact_base(out, seed=0)
    tower = TowerSize(hidden=spec_args["width"], layers=spec_args["layers"],
                      heads=spec_args["heads"])
    spec = CompactSpec(image_size=spec_args["image_size"], patch_size=spec_args["patch_size"],
                       text_max_length=spec_args["text_max_length"],
                       vocab_size=spec_args["vocab_size"], vision=tower, text=tower)
    return build_compact_base(out, seed=0, spec=spec)


def run_one(name: str, data: Path, threads: int) -> dict:
    import torch

    from carsearch.training.trainer import TrainConfig, train

    torch.set_num_threads(threads)
    _, batch, steps, full = SIZES[name]
    with tempfile.TemporaryDirectory() as tmp:
        base = _build(name, Path(tmp) / "base")
        config = TrainConfig(data=data, out=Path(tmp) / "run", base=str(base), steps=steps,
                             batch_size=batch, full=full, limit=max(batch * 2, 64),
                             progress=False)
        start = time.perf_counter()
        result = train(config)
        wall = time.perf_counter() - start
    return {
        "config": name,
        "parameters": result.parameters,
        "trainable_parameters": result.trainable_parameters,
        "batch_size": batch,
        "steps": steps,
        "samples_per_s": result.samples_per_s,
        "loop_seconds": result.seconds,
        "wall_seconds": wall,
        "peak_rss_mb": result.peak_rss_mb,
        "mixed_precision": result.mixed_precision,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench_train.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.data, args.threads)))
        return
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for name in args.sizes.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, "--data", str(args.data),
             "--threads", str(args.threads)],
            env=env, capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.processor() or ''}",
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
