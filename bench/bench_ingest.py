"""Ingest throughput on this machine: end to end and stage by stage.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ingest.py [--n 1000] [--base-n 64]
    ... bench/bench_ingest.py --skip-compact --skip-base --pretrained 160 224 --encoder both

Measures, side by side in one run, for the compact model (and a SigLIP-base-sized random
model on fewer images): images/s end to end through `ingest_items` (hash + decode +
preprocess + encode + Milvus Lite upsert + database rows), the time per stage, and
vectors/s for a pure re-index upsert. Prints a markdown table with the machine, threads
and date. Real Stanford Cars photos are used where present (JPEG decode is part of the
cost), generated PNGs otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor

from carsearch.ingest.pipeline import (
    BatchWriter,
    IngestItem,
    embed,
    ingest_items,
    prepare,
    vector_rows,
    write_pending,
    write_rows,
)
from carsearch.platform.db import Database, migrate
from carsearch.platform.models.encoder import Encoder
from carsearch.platform.models.onnx import OnnxEncoder, export_onnx
from carsearch.platform.models.registry import Registry
from carsearch.platform.vectors.milvus import MilvusStore
from carsearch.platform.vectors.protocol import VectorRow
from carsearch.training.base_model import CompactSpec, TowerSize, build_compact_base
from carsearch.training.pretrained_base import PretrainedSpec, build_pretrained_base
from machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
STANFORD = Path(os.environ.get("CARSEARCH_STANFORD_ROOT", REPO.parent / "shared" / "stanford_cars"))


def images(n: int, out: Path) -> list[Path]:
    photos = sorted((STANFORD / "cars_train").glob("*.jpg"))[:n]
    if len(photos) == n:
        return photos
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = out / f"g{i:05d}.png"
        Image.fromarray(rng.integers(0, 255, (180, 320, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def run_model(model: Path, paths: list[Path], work: Path, batch: int,
              encoder: str = "torch") -> dict[str, float]:
    url = f"sqlite:///{work / 'bench.db'}"
    migrate.upgrade(url)
    db = Database(url)
    store = MilvusStore(str(work / "milvus.db"))
    reg = Registry(db, work / "models")
    v = reg.publish(model, name="bench")
    reg.promote("bench")
    enc: Encoder | OnnxEncoder
    if encoder == "onnx":  # the worker's `--encoder onnx`: an export of the version
        export_onnx(Path(v.artifact_path), work / "onnx")
        enc = OnnxEncoder(work / "onnx", batch_size=batch, threads=torch.get_num_threads())
    else:
        enc = Encoder(Path(v.artifact_path), batch_size=batch,
                      torch_threads=torch.get_num_threads())
    enc.load()
    processor = AutoProcessor.from_pretrained(v.artifact_path)
    store.ensure_collection(v.collection, v.dim)

    # Stage by stage, on the same images, in batches as the worker runs them.
    items = [IngestItem(p, "bench", {"class_name": "Ford F-150 Regular Cab 2012"}) for p in paths]
    t = {"decode": 0.0, "preprocess": 0.0, "encode+preprocess": 0.0, "upsert": 0.0, "db": 0.0}
    for i in range(0, len(items), batch):
        t0 = time.perf_counter()
        prepared = [prepare(x, 10**8) for x in items[i : i + batch]]
        t1 = time.perf_counter()
        processor(images=[p.image for p in prepared], return_tensors="pt")
        t2 = time.perf_counter()
        vecs = embed(enc, prepared)  # preprocess + encode, as the worker runs it
        t3 = time.perf_counter()
        store.upsert(v.collection, [p.id for p in prepared], vecs, vector_rows(prepared))
        t4 = time.perf_counter()
        write_pending(db, prepared)  # the rows: pending before the vectors, then indexed
        write_rows(db, prepared)
        t5 = time.perf_counter()
        for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            t[key] += dt
    t["encode"] = t.pop("encode+preprocess") - t["preprocess"]
    store.drop(v.collection)

    # End to end through the pipeline (fresh collection and database rows).
    db.dispose()
    (work / "bench.db").unlink()
    migrate.upgrade(url)
    db = Database(url)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = ingest_items(items, db=db, writer=BatchWriter.fixed(db, store, enc, v),
                           max_pixels=10**8, batch_size=batch, progress=False)
    t["end_to_end"] = time.perf_counter() - t0
    # CPU seconds of this process's threads: on a shared machine, images per CPU-second
    # says what the cores would do if they were the bench's alone
    t["end_to_end_cpu"] = time.process_time() - c0
    assert summary.indexed == len(items)
    store.close()
    db.dispose()
    return t


def reindex_upsert(work: Path, n: int, dim: int, batch: int = 1000) -> float:
    store = MilvusStore(str(work / "reindex.db"))
    store.ensure_collection("r", dim)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    rows = [VectorRow(make="Ford", body="pickup", year=2012)] * batch
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        store.upsert("r", list(range(i, min(n, i + batch))), vecs[i : i + batch],
                     rows[: min(batch, n - i)])
    store.flush("r")
    dt = time.perf_counter() - t0
    store.close()
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1000, help="images for the compact model")
    ap.add_argument("--base-n", type=int, default=64, help="images for the base-sized model")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--skip-base", action="store_true")
    ap.add_argument("--skip-compact", action="store_true")
    ap.add_argument("--pretrained", type=int, nargs="*", default=[],
                    help="also the compact pretrained base at these image sizes")
    ap.add_argument("--encoder", choices=["torch", "onnx", "both"], default="torch",
                    help="embed with PyTorch (Encoder), ONNX Runtime (OnnxEncoder), or both")
    a = ap.parse_args()
    load0 = os.getloadavg()
    torch.set_num_threads(int(os.environ.get("CARSEARCH_THREADS__TORCH", "2")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = images(max(a.n, a.base_n), root)
        models = []
        if not a.skip_compact:
            compact = build_compact_base(root / "compact", seed=0)
            models.append(("compact (4.4 M, 64 px)", compact, a.n))
        for size in a.pretrained:
            pre = build_pretrained_base(root / f"pretrained-{size}",
                                        spec=PretrainedSpec(image_size=size, text_layers=0))
            models.append((f"pretrained EfficientNet-Lite0 ({size} px)", pre, a.n))
        if not a.skip_base:
            spec = CompactSpec(image_size=224, patch_size=16, text_max_length=64,
                               vision=TowerSize(hidden=768, layers=12, heads=12),
                               text=TowerSize(hidden=768, layers=12, heads=12))
            base = build_compact_base(root / "base", seed=0, spec=spec)
            models.append(("SigLIP-base-sized (random, 224 px)", base, a.base_n))
        encoders = ["torch", "onnx"] if a.encoder == "both" else [a.encoder]
        for label, model, n in models:
            for encoder in encoders:
                work = root / f"work-{len(rows)}"
                work.mkdir()
                t = run_model(model, paths[:n], work, a.batch, encoder)
                rows.append((f"{label}, {encoder}", n, t))
        vps = statistics.median(reindex_upsert(root / f"r{i}", 20_000, 192) for i in range(3))
    load = os.getloadavg()
    print(f"load average before {load0[0]:.1f}")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs; torch threads "
          f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"batch {a.batch}; {datetime.now(UTC):%Y-%m-%d}; load average at end {load[0]:.1f}")
    print()
    print("| model | images | end to end img/s | img per CPU-second | decode+hash | preprocess "
          "| encode | Milvus upsert | DB rows | slowest stage |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, n, t in rows:
        stages = {k: t[k] for k in ("decode", "preprocess", "encode", "upsert", "db")}
        slowest = max(stages, key=lambda k: stages[k])
        cells = " | ".join(f"{1000 * stages[k] / n:.2f} ms" for k in stages)
        print(f"| {label} | {n} | {n / t['end_to_end']:.0f} | "
              f"{n / t['end_to_end_cpu']:.1f} | {cells} | {slowest} |")
    print()
    print(f"Pure re-index upsert (20,000 x 192-d vectors, batches of 1,000, then flush; "
          f"median of 3): {vps:,.0f} vectors/s")


if __name__ == "__main__":
    main()
