"""Milvus Lite index configurations next to FAISS exact search, at several sizes and dims.

Prints markdown (the tables for docs/BENCHMARKS.md); ``--json FILE`` also writes the raw
figures. Default: 10k and 100k vectors at 192 (the compact model) and 768 dims, plus the
thread-count table; ``--million`` adds 1M × 192 (long: tens of minutes on 2 cores).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_vectors.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_vectors.py --sizes 10000 --dims 192
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import vector_bench as vb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--dims", type=int, nargs="*", default=[192, 768])
    ap.add_argument("--million", action="store_true", help="add 1,000,000 × 192 (IVF_FLAT)")
    ap.add_argument("--million-hnsw", action="store_true",
                    help="at 1M also build HNSW (about 15 min more on 2 cores)")
    ap.add_argument("--queries", type=int, default=200, help="queries per run (≤ 100 at 100k+)")
    ap.add_argument("--no-threads", action="store_true", help="skip the thread-count table")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)

    runs = [(n, d) for d in args.dims for n in args.sizes]
    if args.million:
        runs.append((1_000_000, 192))
    t0 = time.perf_counter()
    sections: list[str] = []
    raw: dict[str, object] = {"runs": []}
    for n, dim in runs:
        nq = args.queries if n < 100_000 else min(args.queries, 100)
        configs = vb.default_configs(n)
        if n >= 1_000_000:  # FLAT and the small-nlist sweep would take hours here
            configs = [c for c in configs if c.index_type != "FLAT"][:1]
            if args.million_hnsw:
                configs += [c for c in vb.default_configs(n) if c.index_type == "HNSW"]
        report = vb.run_vector_bench(n, dim, configs=configs, n_queries=nq)
        sections.append(vb.to_markdown(report))
        raw["runs"].append(report.to_dict())  # type: ignore[union-attr]
        print(sections[-1], flush=True)
    if not args.no_threads:
        results = vb.thread_bench(100_000, 192)
        sections.append(vb.thread_markdown(results, vb.machine_info()))
        raw["threads"] = [r.to_dict() for r in results]
        print(sections[-1], flush=True)
    total = time.perf_counter() - t0
    footer = f"Whole suite: {total / 60:.1f} min.\n"
    print(footer)
    if args.out:
        args.out.write_text("\n".join(sections) + "\n" + footer, encoding="utf-8")
    if args.json:
        raw["total_s"] = total
        args.json.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
