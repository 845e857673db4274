"""Taking a backup: the database first (one snapshot), then what the snapshot names.

What it guarantees, while the page and ingest workers keep running (production shape):
the database part is one consistent snapshot (SQLite's online backup API; on PostgreSQL
one read-only REPEATABLE READ transaction); the vectors are read after it and cut to the
snapshot: a serving collection keeps exactly the ids the snapshot has indexed (so the
ingest invariant holds in the backup) and a candidate collection the ids of the
snapshot's images. An indexed id the snapshot has but Milvus no longer holds (deleted
after the snapshot) fails the backup rather than leave it inconsistent: run it again.
Rows ingested after the snapshot are not in the backup. Model folders are checked
against the registry's sha256 as they are copied. A Milvus Lite file can be opened by
one process at a time, so on the one-machine shape the backup runs while `serve` is
stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from tqdm import tqdm

from carsearch.backup import manifest, tables
from carsearch.backup.manifest import BackupError
from carsearch.platform.collections import alias_for
from carsearch.platform.db import migrate
from carsearch.platform.db.engine import make_engine
from carsearch.platform.images import sha256_file
from carsearch.platform.models.registry import artifact_sha256
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.milvus import MilvusStore, lite_file_in_use

log = logging.getLogger(__name__)

Hook = Callable[[str], None]
SCALARS = ("make", "body", "colour", "source", "year")
GUARANTEE = ("database: one snapshot; vectors: read after it, cut to the snapshot's ids "
             "(serving collections: exactly its indexed ids); later writes not included")


def _no_hook(point: str) -> None:
    del point


def create_backup(settings: Settings, out: Path, *, with_images: bool = False,
                  hook: Hook = _no_hook, progress: bool = True) -> dict[str, Any]:
    """Write a backup of the deployment ``settings`` names into ``out`` (a new or empty
    folder); the manifest it wrote."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BackupError(f"{out} exists and is not an empty folder: choose a new one")
    url = settings.database_url
    revision = migrate.current_revision(url)
    if revision is None:
        raise BackupError("the database has no schema: nothing to back up")
    if settings.milvus_is_lite and lite_file_in_use(settings.milvus_uri):
        raise BackupError(f"the Milvus Lite file {settings.milvus_uri} is open in another "
                          "process (one process may open it at a time): stop `carsearch "
                          "serve` for the backup")
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write(settings, out, url, revision, with_images, hook, progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half backup left to be mistaken for one
        raise


def _write(settings: Settings, out: Path, url: str, revision: str, with_images: bool,
           hook: Hook, progress: bool) -> dict[str, Any]:
    counts = _database(url, out / "db")
    hook("after-database")
    snap = _Snapshot(out / "db")
    body: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(),
        "guarantee": GUARANTEE,
        "source": {"database": make_url(url).get_backend_name(),
                   "milvus": "lite" if settings.milvus_is_lite else "server",
                   "image_dir": str(Path(settings.image_dir).resolve())},
        "revision": revision,
        "tables": counts,
    }
    body.update(_vectors(settings, out / "vectors", snap, progress))
    body["models"] = _models(out / "models", snap)
    body["images"] = _images(settings, out / "images", snap, with_images, progress)
    return manifest.write_manifest(out, body)


def _database(url: str, out: Path) -> dict[str, int]:
    """The snapshot: SQLite's online backup into the folder, then exported from that copy;
    PostgreSQL exported in one read-only REPEATABLE READ transaction."""
    out.mkdir(parents=True, exist_ok=True)
    if url.startswith("sqlite"):
        copy = out / "carsearch.sqlite"
        src = sqlite3.connect(f"file:{make_url(url).database}?mode=ro", uri=True, timeout=30)
        dst = sqlite3.connect(copy)
        try:
            src.backup(dst)
            # A self-contained file: the copy of a WAL database is in WAL mode, and opening
            # it would leave -wal / -shm files beside it in the backup.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
            src.close()
        engine = sa.create_engine(f"sqlite:///file:{copy}?mode=ro&uri=true")
        try:
            with engine.connect() as conn:
                return tables.export_tables(conn, out)
        finally:
            engine.dispose()
    engine = make_engine(url)
    try:
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            conn.execute(sa.text("SET TRANSACTION READ ONLY"))
            counts = tables.export_tables(conn, out)
            conn.rollback()
            return counts
    finally:
        engine.dispose()


class _Snapshot:
    """What the exported snapshot says about versions and images."""

    def __init__(self, db: Path) -> None:
        self.versions = list(tables.read_rows(db / "model_versions.jsonl"))
        self.collections = [r["name"] for r in tables.read_rows(db / "collections.jsonl")]
        self.images: dict[str, set[int]] = {}
        self.indexed: dict[str, set[int]] = {}
        self.image_rows = db / "images.jsonl"
        for r in tables.read_rows(self.image_rows):
            self.images.setdefault(r["collection"], set()).add(int(r["id"]))
            if r["status"] == "indexed":
                self.indexed.setdefault(r["collection"], set()).add(int(r["id"]))


def _vectors(settings: Settings, out: Path, snap: _Snapshot, progress: bool) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    store = MilvusStore(settings.milvus_uri, token=settings.milvus_token)
    found: dict[str, Any] = {}
    try:
        for v in snap.versions:
            if v["status"] == "retired" or not store.has_collection(v["collection"]):
                continue
            serving = v["status"] == "serving"
            keep = (snap.indexed if serving else snap.images).get(v["image_collection"], set())
            n, dim = _dump_collection(store, v["collection"], keep, out, strict=serving,
                                      progress=progress)
            found[v["collection"]] = {"rows": n, "dim": dim, "version": v["name"],
                                      "status": v["status"],
                                      "image_collection": v["image_collection"]}
        aliases = {}
        if not store.is_lite:
            for name in snap.collections:
                target = store.alias_target(alias_for(name))
                if target is not None:
                    aliases[alias_for(name)] = target
    finally:
        store.close()
    serving = {v["image_collection"]: v["name"] for v in snap.versions
               if v["status"] == "serving"}
    return {"collections": found, "aliases": aliases, "serving": serving}


def _dump_collection(store: MilvusStore, name: str, keep: set[int], out: Path, *,
                     strict: bool, progress: bool) -> tuple[int, int]:
    dim = store.dimension(name)
    ids: list[int] = []
    vecs: list[list[float]] = []
    scalars: dict[str, list[Any]] = {f: [] for f in SCALARS}
    bar = tqdm(desc=f"backup {name}", unit="row", disable=not progress)
    for page in store.scan(name, ["id", "vector", *SCALARS]):
        for r in page:
            if int(r["id"]) in keep:
                ids.append(int(r["id"]))
                vecs.append(r["vector"])
                for f in SCALARS:
                    scalars[f].append(r.get(f) or ("" if f != "year" else 0))
        bar.update(len(page))
    bar.close()
    if strict and len(ids) != len(keep):
        gone = len(keep - set(ids))
        raise BackupError(f"{gone} ids the database snapshot has indexed are not in {name} "
                          "(deleted after the snapshot?): take the backup again")
    order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
    arrays: dict[str, np.ndarray] = {
        "ids": np.asarray(ids, dtype=np.int64)[order],
        "vectors": np.asarray(vecs, dtype=np.float32).reshape(-1, dim)[order],
        "year": np.asarray(scalars["year"], dtype=np.int64)[order],
    }
    for f in ("make", "body", "colour", "source"):
        arrays[f] = np.asarray([str(x) for x in scalars[f]], dtype=np.str_)[order]
    np.savez(out / f"{name}.npz", **arrays)  # type: ignore[arg-type]
    return len(ids), dim


def _models(out: Path, snap: _Snapshot) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for v in snap.versions:
        src = Path(v["artifact_path"])
        if not src.is_dir():
            if v["status"] != "retired":
                raise BackupError(f"the folder of model version {v['name']} ({src}) is gone")
            found[v["name"]] = {"included": False, "reason": "retired, folder gone"}
            continue
        dest = out / v["name"]
        shutil.copytree(src, dest)
        if artifact_sha256(dest) != v["artifact_sha256"]:
            raise BackupError(f"the folder of model version {v['name']} ({src}) does not "
                              "match the registry's sha256: not backing up a changed model")
        found[v["name"]] = {"included": True, "artifact_sha256": v["artifact_sha256"]}
    return found


def _images(settings: Settings, out: Path, snap: _Snapshot, with_files: bool,
            progress: bool) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    root = Path(settings.image_dir).resolve()
    n = stored = copied = 0
    with (out / "manifest.jsonl").open("w") as fh:
        rows = tqdm(tables.read_rows(snap.image_rows), desc="backup images", unit="img",
                    disable=not progress)
        for r in rows:
            path = Path(r["path"])
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else None
            if rel is not None and not path.is_file():
                rel = None
            entry = {"id": r["id"], "collection": r["collection"], "sha256": r["sha256"],
                     "path": r["path"], "stored": rel}
            fh.write(json.dumps(entry) + "\n")
            n += 1
            if rel is None:
                continue
            stored += 1
            if with_files:
                dest = out / "files" / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
                if sha256_file(dest) != r["sha256"]:
                    raise BackupError(f"the stored image {path} does not match its sha256")
                copied += 1
    return {"rows": n, "stored": stored, "files": copied, "with_files": with_files}
