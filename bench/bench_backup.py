"""Backup and restore of N images' rows (default 100,000): `carsearch backup create` and
`backup restore` timed, through the same functions the CLI calls.

The source is Milvus Lite + SQLite holding N indexed image rows and their N vectors (random
unit vectors of --dim; the rows are made directly, not through the encoder: this measures
the backup, not the ingest) and one published, serving version (a stand-in model folder,
never loaded). The restore goes into empty targets: Lite + SQLite, and with --server also a
Milvus server (the `milvus` package's standalone binary on free ports) + PostgreSQL (the
server at 127.0.0.1:5432, a fresh database dropped afterwards).

    PYTHONPATH=src:bench python bench/bench_backup.py --rows 100000 [--server] [--repeat 1]

`--lite-ef-construction 200,100` restores onto Lite once per value, with the Lite
collections' HNSW efConstruction at that value (a what-if: the product builds
`LITE_EF_CONSTRUCTION`, 100, on Lite, 200 until this was measured; the bench swaps
`IndexSpec.default_for` for its restores only).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from carsearch.backup.create import create_backup
from carsearch.backup.restore import restore_backup
from carsearch.platform.db import Image, ImageStatus, migrate
from carsearch.platform.runtime import Platform
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.milvus import IndexSpec
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


@contextmanager
def lite_ef_construction(efc: int | None) -> Iterator[None]:
    """Lite collections created meanwhile get HNSW efConstruction ``efc`` (None: as is)."""
    if efc is None:
        yield
        return
    original = IndexSpec.__dict__["default_for"]

    def patched(cls: type[IndexSpec], lite: bool) -> IndexSpec:
        spec: IndexSpec = original.__func__(cls, lite)
        return replace(spec, params={**spec.params, "efConstruction": efc}) if lite else spec

    IndexSpec.default_for = classmethod(patched)  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        IndexSpec.default_for = original  # type: ignore[method-assign]


def _cpu_s() -> float:
    """CPU seconds of this process (every thread: Milvus Lite runs in it) and its
    children so far: what the step would take on a quiet machine, near enough, where the
    wall time on a shared one is mostly waiting for a core."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


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
    ap.add_argument("--lite-ef-construction", type=str, default="",
                    help="restore onto Lite once per efConstruction listed (a what-if)")
    args = ap.parse_args()
    efcs: list[int | None] = ([int(x) for x in args.lite_ef_construction.split(",")]
                              if args.lite_ef_construction else [None])
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    lite_steps = {efc: "restore lite+sqlite" + ("" if efc is None else
                                                f" (efConstruction {efc})") for efc in efcs}
    out: dict[str, list[float]] = {"backup": [], **{v: [] for v in lite_steps.values()},
                                   "restore server+postgresql": []}
    cpu: dict[str, list[float]] = {k: [] for k in out}
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
            t0, c0 = time.perf_counter(), _cpu_s()
            create_backup(src, dest, progress=False)
            out["backup"].append(time.perf_counter() - t0)
            cpu["backup"].append(_cpu_s() - c0)
            for efc, step in lite_steps.items():
                lite = Settings(data_dir=root / f"lite{r}-{efc}")
                t0, c0 = time.perf_counter(), _cpu_s()
                load0 = os.getloadavg()[0]
                with lite_ef_construction(efc):
                    restore_backup(lite, dest, progress=False)
                out[step].append(time.perf_counter() - t0)
                cpu[step].append(_cpu_s() - c0)
                print(f"round {r}: {step} {out[step][-1]:.1f} s (CPU {cpu[step][-1]:.1f} s, "
                      f"load {load0:.1f}-{os.getloadavg()[0]:.1f})", flush=True)
                shutil.rmtree(root / f"lite{r}-{efc}", ignore_errors=True)
            if server is not None:
                url, admin = _pg_database()
                target = Settings(data_dir=root / f"srv{r}", database_url=url,
                                  milvus_uri=server.uri)
                t0, c0 = time.perf_counter(), _cpu_s()
                restore_backup(target, dest, progress=False, force=True)
                out["restore server+postgresql"].append(time.perf_counter() - t0)
                cpu["restore server+postgresql"].append(_cpu_s() - c0)
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
    print("| step | median wall s | median CPU s (this process and children) | runs |\n"
          "|---|---|---|---|")
    for step, times in out.items():
        if times:
            print(f"| {step} | {statistics.median(times):.1f} | "
                  f"{statistics.median(cpu[step]):.1f} | {len(times)} |")


if __name__ == "__main__":
    main()
