"""Peak memory of ingest and of a promotion over large photos (issue 22, items 3 and 16).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_decode_memory.py [--n 500] [--mp 12]

Writes ``n`` JPEGs of ``mp`` megapixels (seeded numpy noise, upscaled so the files have
a photo's size, saved by Pillow; 16 distinct pictures, every file unique by its bytes) in
a temporary folder, then runs each phase in a fresh process and reads that process's
peak RSS (``ru_maxrss``):

- ingest: the worker claims the queued jobs in batches of 32 (SQLite, Milvus Lite, the
  compact model serving as v1);
- promotion: v2 is published and `promote_with_backfill` re-indexes every image into its
  collection (pages of 512) and switches serving to it;
- png16: one 16-bit greyscale PNG of 39.7 MP through ingest's `prepare` (decode).

Prints a markdown row per phase with the machine, threads and date. It uses only APIs
that exist before the fix too, so the same script measures an older checkout
(``PYTHONPATH=/old/src``; there, use a small ``--n``: each 12 MP image held costs ~36 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def make_photos(out: Path, n: int, megapixels: float, distinct: int = 16) -> list[Path]:
    """``n`` JPEG files of ``megapixels``: ``distinct`` different pictures (seeded noise
    upscaled, so a file has a photo's size; Pillow encodes at quality 90), each file
    made unique by a few bytes after the JPEG's end marker (a different content hash,
    so a different image id; decoders stop at the marker). Encoding every file anew
    would cost ~0.5 s each for the same decoding work."""
    from PIL import Image

    width = round((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = round(width * 3 / 4)
    bases = []
    for i in range(min(distinct, n)):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        base = out / f"base{i:02d}.jpeg"
        img.save(base, quality=90)
        bases.append(base.read_bytes())
        base.unlink()
    paths = []
    for i in range(n):
        path = out / f"p{i:04d}.jpg"
        path.write_bytes(bases[i % len(bases)] + f"photo {i}".encode())
        paths.append(path)
    return paths


def _settings(work: Path) -> object:
    from carsearch.platform.settings import Settings

    return Settings(data_dir=work / "data", database_url=f"sqlite:///{work / 'meta.db'}",
                    milvus_uri=str(work / "milvus.db"))


def phase_ingest(work: Path, photos: Path) -> dict[str, object]:
    from carsearch.ingest.worker import IngestWorker
    from carsearch.platform.db import migrate, queue
    from carsearch.platform.runtime import Platform
    from carsearch.training.base_model import build_compact_base

    model = work / "compact"
    build_compact_base(model, seed=0)
    s = _settings(work)
    migrate.upgrade(s.database_url)  # type: ignore[attr-defined]
    s.ensure_dirs()  # type: ignore[attr-defined]
    p = Platform(s)  # type: ignore[arg-type]
    p.registry.publish(model, name="v1")
    p.registry.promote("v1")
    paths = sorted(photos.glob("*.jpg"))
    queue.enqueue(p.db, [{"path": str(f), "source": "bench"} for f in paths])
    t0 = time.perf_counter()
    stats = IngestWorker(p, batch_size=32).run_once()
    took = time.perf_counter() - t0
    n = p.store.count(p.registry.require_serving().collection)
    p.close()
    return {"images": n, "seconds": round(took, 1), "batches": stats.batches}


def phase_promote(work: Path) -> dict[str, object]:
    from carsearch.lifecycle.reindex import promote_with_backfill
    from carsearch.platform.runtime import Platform

    p = Platform(_settings(work))  # type: ignore[arg-type]
    p.registry.publish(work / "compact", name="v2")
    t0 = time.perf_counter()
    version, report = promote_with_backfill(p, "v2", progress=False)
    took = time.perf_counter() - t0
    n = p.store.count(version.collection)
    p.close()
    return {"images": n, "seconds": round(took, 1), "embedded": report.embedded}


def phase_png16(work: Path) -> dict[str, object]:
    """One 16-bit greyscale PNG of 39.7 MP (7,700 x 5,160, as in issue 22) through
    ingest's `prepare`; reports the RSS before it too (the imports' share)."""
    from PIL import Image

    from carsearch.ingest.pipeline import IngestItem, prepare

    path = work / "grey16.png"
    ramp = np.linspace(0, 65535, 7700, dtype=np.uint16)
    Image.fromarray(np.broadcast_to(ramp, (5160, 7700)).copy()).save(path, compress_level=1)
    before = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    t0 = time.perf_counter()
    got = prepare(IngestItem(path), 40_000_000)
    return {"images": 1, "seconds": round(time.perf_counter() - t0, 1),
            "rss_before_mib": before, "decoded": list(got.image.size)}


def child(phase: str, work: Path, photos: Path) -> None:
    phases = {"ingest": lambda: phase_ingest(work, photos),
              "promote": lambda: phase_promote(work), "png16": lambda: phase_png16(work)}
    got = phases[phase]()
    got["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(got))


def run_phase(phase: str, work: Path, photos: Path) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--child", phase, "--work", str(work),
                          "--photos", str(photos)], env=env, check=True,
                         capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--mp", type=float, default=12.0, help="megapixels per photo")
    ap.add_argument("--child", choices=["ingest", "promote", "png16"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--photos", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.work, args.photos)
        return
    sys.path.insert(0, str(HERE))
    import carsearch
    from machine import machine_line

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        photos, work = Path(tmp) / "photos", Path(tmp) / "work"
        photos.mkdir()
        work.mkdir()
        t0 = time.perf_counter()
        paths = make_photos(photos, args.n, args.mp)
        size = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        print(f"wrote {len(paths)} photos of {args.mp} MP ({size:.1f} MB each) in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows = {phase: run_phase(phase, work, photos)
                for phase in ("ingest", "promote", "png16")}
    print(f"\ncarsearch at {Path(carsearch.__file__).parent}")
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine_line()}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print("| phase | photos | MP each | peak RSS (MiB) | seconds |")
    print("|---|---|---|---|---|")
    for phase, got in rows.items():
        mp = 39.7 if phase == "png16" else args.mp
        extra = (f" (RSS {got['rss_before_mib']} MiB before the decode)"
                 if phase == "png16" else "")
        print(f"| {phase} | {got['images']} | {mp:g} | {got['peak_rss_mib']}{extra} | "
              f"{got['seconds']} |")


if __name__ == "__main__":
    main()
