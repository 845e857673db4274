"""Offline query augmentation speed on the real Stanford Cars labels.

Times the offline generator alone, the rule judge alone, and the whole `augment` run
(generate, judge, write JSONL) over every labelled image of the chosen split, one core.
Prints a markdown table for docs/BENCHMARKS.md.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_augment.py --n 5 --split train
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

from carsearch.data.augment import OfflineGenerator, RuleJudge, augment
from carsearch.data.stanford import load_stanford
from carsearch.platform.vehicles import VehicleLabel
from machine import cpu_name


def _root() -> Path:
    env = os.environ.get("CARSEARCH_STANFORD_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "stanford_cars"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5, help="candidates per image")
    parser.add_argument("--split", default="train", choices=("train", "test", "all"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    root = _root()
    if not (root / "cars_meta.mat").exists():
        raise SystemExit(f"Stanford Cars not found at {root} (set CARSEARCH_STANFORD_ROOT)")
    ds = load_stanford(root, split=None if args.split == "all" else args.split)
    items: list[tuple[str, VehicleLabel]] = [(im.image_id, im.label) for im in ds.images]
    gen, judge = OfflineGenerator(seed=args.seed), RuleJudge()

    start = time.perf_counter()
    generated = [(label, gen.generate(label, args.n, key=i)) for i, label in items]
    gen_s = time.perf_counter() - start
    n_queries = sum(len(q) for _, q in generated)

    start = time.perf_counter()
    verdicts = [v for label, qs in generated for v in judge.judge(label, qs)]
    judge_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        summary = augment(items, gen, judge, Path(tmp) / "q.jsonl", args.n, progress=False)

    accepted = sum(v.accepted for v in verdicts)
    print(f"Offline query augmentation — {cpu_name()}, 1 process, "
          f"Python {platform.python_version()}, {dt.date.today().isoformat()}\n")
    print(f"{len(items):,} Stanford Cars images ({args.split} split), {args.n} candidates each, "
          f"{accepted / max(1, len(verdicts)):.1%} accepted by the rule judge\n")
    print("| stage | queries | seconds | queries/s |")
    print("|---|---:|---:|---:|")
    print(f"| offline generator | {n_queries:,} | {gen_s:.2f} | {n_queries / gen_s:,.0f} |")
    print(f"| rule judge (Pydantic) | {len(verdicts):,} | {judge_s:.2f} | "
          f"{len(verdicts) / judge_s:,.0f} |")
    print(f"| augment() end to end (generate + judge + JSONL) | {summary.candidates:,} | "
          f"{summary.seconds:.2f} | {summary.queries_per_s:,.0f} |")
    if summary.rejected:
        print("\nrejections by reason: " + ", ".join(
            f"{k} {v}" for k, v in sorted(summary.rejected.items())))


if __name__ == "__main__":
    main()
