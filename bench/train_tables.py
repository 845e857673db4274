"""Markdown tables of the training measurements, for docs/BENCHMARKS.md.

    python bench/train_tables.py --eval catalogue=RUN/evaluation_results.json \
        --eval stanford=RUN2/evaluation_results.json --throughput bench_train.json

Each --eval is NAME=PATH of an `evaluation_results.json` a `carsearch train` run wrote
(zero-shot and fine-tuned columns); --throughput is the JSON bench_train.py wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

KEYS = ("recall@1", "recall@5", "recall@10", "mAP", "MRR")


def eval_table(name: str, results: dict) -> list[str]:
    t = results.get("training", {})
    lines = [
        f"### {name}: test split, {results['n_images']} images, {results['n_classes']} "
        f"classes, {results['n_queries']} queries ({results['query_source']})",
        "",
        f"Training: {t.get('steps')} steps, {t.get('n_train_images')} train images, "
        f"{'full' if t.get('full') else 'LoRA'}, {t.get('seconds')} s, "
        f"{t.get('samples_per_s')} samples/s. Chance mAP ≈ {results['chance_mAP']:.4f}.",
        "",
        "| model | " + " | ".join(KEYS) + " |",
        "|---|" + "---:|" * len(KEYS),
    ]
    for model, m in results["models"].items():
        lines.append(f"| {model} | " + " | ".join(f"{float(m[k]):.4f}" for k in KEYS) + " |")
    return [*lines, ""]


def throughput_table(report: dict) -> list[str]:
    lines = [
        f"### Training throughput ({report['machine']}, torch threads {report['threads']}, "
        f"{report['date']})",
        "",
        "| configuration | parameters | batch | steps | samples/s | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['config']} | {r['parameters'] / 1e6:.1f}M | {r['batch_size']} | "
            f"{r['steps']} | {r['samples_per_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--eval", action="append", default=[], help="NAME=evaluation.json")
    parser.add_argument("--throughput", type=Path)
    args = parser.parse_args()
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"{time.strftime('%Y-%m-%d')}\n")
    for item in args.eval:
        name, _, path = item.partition("=")
        print("\n".join(eval_table(name, json.loads(Path(path).read_text()))))
    if args.throughput:
        print("\n".join(throughput_table(json.loads(args.throughput.read_text()))))


if __name__ == "__main__":
    main()
