"""Catalogue rendering speed, and how fast the loader reads and scans it.

    python bench/bench_synth.py [--n 2000] [--seed 0] [--stanford ../shared/stanford_cars]

Prints a markdown table (machine, date) for docs/BENCHMARKS.md. Set OMP_NUM_THREADS=1
for figures that compare.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

import PIL

from carsearch.data.catalogue import DEFAULT_SIZE, write_catalogue
from carsearch.data.stanford import load_stanford
from machine import machine_line


def _machine() -> str:
    return f"{machine_line()}, Python {platform.python_version()}"


def _row(what: str, n: int, seconds: float) -> str:
    return f"| {what} | {n} | {seconds:.2f} | {n / seconds:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stanford",
        type=Path,
        default=None,
        help="also time a full scan of a Stanford Cars layout",
    )
    args = parser.parse_args()

    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "catalogue"
        report = write_catalogue(out, args.n, seed=args.seed, progress=False)
        size = f"{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}"
        rows.append(_row(f"render catalogue ({size} JPEG, write .mat)", args.n, report.seconds))
        started = time.perf_counter()
        ds = load_stanford(out)
        ds.scan(progress=False)
        rows.append(
            _row(
                "load + scan catalogue (full decode)", len(ds.images), time.perf_counter() - started
            )
        )
    if args.stanford is not None:
        started = time.perf_counter()
        real = load_stanford(args.stanford)
        real.scan(progress=False)
        rows.append(
            _row(
                f"load + scan Stanford Cars ({len(real.quarantined)} quarantined)",
                len(real.images),
                time.perf_counter() - started,
            )
        )

    print(
        f"Machine: {_machine()}; Pillow {PIL.__version__}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(f"Date: {dt.date.today().isoformat()}")
    print()
    print("| step | images | seconds | images/s |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
