"""Backup and restore of N images' rows (default 100,000): `carsearch backup create` and
`backup restore` timed, through the same functions the CLI calls.

The source is Milvus Lite + SQLite holding N indexed image rows and their N vectors (random
unit vectors of --dim; the rows are made directly, not through the encoder: this measures
the backup, not the ingest) and one published, serving version (a stand-in model folder,
never loaded). The restore goes into empty targets: Lite + SQLite, and with --server also a
Milvus server (the `milvus` package's standalone binary on free ports) + PostgreSQL (the
server at 127.0.0.1:5432, a fresh database dropped afterwards).

    PYTHONPATH=src:bench python bench/bench_backup.py --rows 100000 [--server] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from carsearch.backup.create import create_backup
from carsearch.backup.restore import restore_backup
from carsearch.platform.db import Image, ImageStatus, migrate
from carsearch.platform.runtime import Platform
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.protocol import VectorRow
from machine import machine_line

PG = os.environ.get("CARSEARCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _model(folder: Path, dim: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"vision_config": {"hidden_size": dim}, "text_config": {"projection_size": dim}}))
    (folder / "model.safetensors").write_bytes(os.urandom(1 << 20))
    return folder


def build_source(root: Path, rows: int, dim: int) -> Settings:
    s = Settings(data_dir=root / "src")
    s.ensure_dirs()
    migrate.upgrade(s.database_url)
    p = Platform(s)
    try:
        p.registry.publish(_model(root / "stand-in", dim), name="v1")
        p.registry.promote("v1")
        v = p.registry.require_serving()
        p.store.ensure_collection(v.collection, v.dim)
        rng = np.random.default_rng(0)
        now = datetime.now(UTC)
        for start in range(0, rows, 10_000):
            ids = list(range(start + 1, min(rows, start + 10_000) + 1))
            vecs = rng.standard_normal((len(ids), dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            with p.db.session() as sess:
                sess.execute(sa.insert(Image), [
                    {"id": i, "collection": "vehicles", "sha256": f"{i:064x}",
                     "path": f"/nowhere/{i}.jpg", "source": "bench", "make": "Ford",
                     "year": 2012, "class_name": "Ford F-150 Regular Cab 2012",
                     "status": ImageStatus.indexed.value, "ingested_at": now} for i in ids])
            p.store.upsert(v.collection, ids, vecs,
                           [VectorRow(make="Ford", year=2012, source="bench")] * len(ids))
        p.store.flush(v.collection)
    finally:
        p.close()
    return s


def _pg_database() -> tuple[str, sa.Engine]:
    name = f"carsearch_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return PG.rsplit("/", 1)[0] + "/" + name, admin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--server", action="store_true",
                    help="also restore onto a Milvus server + PostgreSQL")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    out: dict[str, list[float]] = {"backup": [], "restore lite+sqlite": [],
                                   "restore server+postgresql": []}
    server = None
    try:
        t0 = time.perf_counter()
        src = build_source(root, args.rows, args.dim)
        print(f"source built in {time.perf_counter() - t0:.1f} s ({args.rows} rows)")
        if args.server:
            from carsearch.platform.vectors.server import LocalMilvusServer

            server = LocalMilvusServer(root / "milvus-server")
            server.start()
        for r in range(args.repeat):
            dest = root / f"backup{r}"
            t0 = time.perf_counter()
            create_backup(src, dest, progress=False)
            out["backup"].append(time.perf_counter() - t0)
            lite = Settings(data_dir=root / f"lite{r}")
            t0 = time.perf_counter()
            restore_backup(lite, dest, progress=False)
            out["restore lite+sqlite"].append(time.perf_counter() - t0)
            if server is not None:
                url, admin = _pg_database()
                target = Settings(data_dir=root / f"srv{r}", database_url=url,
                                  milvus_uri=server.uri)
                t0 = time.perf_counter()
                restore_backup(target, dest, progress=False, force=True)
                out["restore server+postgresql"].append(time.perf_counter() - t0)
                with admin.connect() as conn:
                    conn.execute(sa.text(
                        f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
                admin.dispose()
            size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
            print(f"round {r}: backup {out['backup'][-1]:.1f} s ({size / 1e6:.0f} MB)")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{machine_line()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {args.rows} rows x {args.dim}-d")
    print("| step | median s | runs |\n|---|---|---|")
    for step, times in out.items():
        if times:
            print(f"| {step} | {statistics.median(times):.1f} | {len(times)} |")


if __name__ == "__main__":
    main()
