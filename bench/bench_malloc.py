"""The PyTorch encoder with and without the malloc tuning (platform/memory.py).

    python bench/bench_malloc.py --model RUN/model [--n 256] [--batch 64] [--rounds 2]

Each round runs two fresh processes one after the other: the same `Encoder` embedding
the same Stanford Cars test photos (whole photo and box, as ingest does), once with
`keep_freed_memory()` and once with `CARSEARCH_MALLOC_TUNING=0`. After one warm-up batch
each reports photos/s, user and system CPU, minor page faults and peak RSS. Prints JSON
lines and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time
from carsearch.platform.memory import keep_freed_memory
tuned = keep_freed_memory()
from pathlib import Path
import torch
from carsearch.data.stanford import load_stanford
from carsearch.platform.models.encoder import Encoder
root, model, n, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ds = load_stanford(Path(root))
items = ds.split("test")[:n + batch]
images = [ds.open_image(x, crop=False) for x in items]
boxes = [x.bbox for x in items]
enc = Encoder(Path(model), batch_size=batch)
enc.encode_images(images[:batch], boxes[:batch])  # warm-up batch
r0 = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
enc.encode_images(images[batch:], boxes[batch:])
wall = time.perf_counter() - t
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"tuned": tuned, "threads": torch.get_num_threads(), "photos": n,
                  "photos_per_s": round(n / wall, 1),
                  "user_s": round(r1.ru_utime - r0.ru_utime, 1),
                  "system_s": round(r1.ru_stime - r0.ru_stime, 1),
                  "minor_faults": r1.ru_minflt - r0.ru_minflt,
                  "peak_rss_mb": round(r1.ru_maxrss / 1024)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2]
                   / "shared" / "stanford_cars")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    rows = []
    for _ in range(args.rounds):
        for setting in ("1", "0"):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(args.root), str(args.model), str(args.n),
                 str(args.batch)], capture_output=True, text=True, check=True,
                env={**os.environ, "CARSEARCH_MALLOC_TUNING": setting})
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| malloc | photos/s | user s | system s | minor faults | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {'tuned' if r['tuned'] else 'glibc default'} | {r['photos_per_s']} | "
              f"{r['user_s']} | {r['system_s']} | {r['minor_faults']:,} | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
