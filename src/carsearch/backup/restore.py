"""Restoring a backup into empty targets of either shape (Lite + SQLite, or a Milvus
server + PostgreSQL), whatever shape it was taken on.

Order: the backup is verified; the targets are checked empty (any image or model version
row, any Milvus collection, or a model folder of the same name makes them non-empty:
refused unless ``force``, which clears them); the database is migrated to the backup's
Alembic revision, filled in one transaction (all but the writing processes' leases and
loop states), then migrated to this code's head; the model
folders are copied and checked against the registry's sha256 (their rows point at the new
place); the images are copied where the backup holds them; the vectors are written into
collections of the same names and, on a server, the serving aliases pointed as they were.
It ends by checking the ingest invariant of every serving collection.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from tqdm import tqdm

from carsearch.backup import manifest, tables
from carsearch.backup.manifest import BackupError
from carsearch.platform.collections import alias_for
from carsearch.platform.db import migrate
from carsearch.platform.db.engine import make_engine
from carsearch.platform.models.registry import artifact_sha256
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.milvus import MilvusStore
from carsearch.platform.vectors.protocol import VectorRow

log = logging.getLogger(__name__)


def restore_backup(settings: Settings, root: Path, *, force: bool = False,
                   progress: bool = True, batch: int = 5000) -> dict[str, Any]:
    """Restore the backup at ``root`` into the targets ``settings`` names; a summary."""
    root = Path(root)
    body = manifest.verify(root)
    settings.ensure_dirs()
    store = MilvusStore(settings.milvus_uri, token=settings.milvus_token)
    try:
        busy = _not_empty(settings, store, body)
        if busy and not force:
            raise BackupError(f"the target is not empty ({'; '.join(busy)}): restore into "
                              "empty targets, or pass --force to replace what is there")
        if busy:
            _clear(settings, store, body)
        _database(settings, root, body)
        _models(settings, root, body)
        images = _images(settings, root, body)
        rows = _vectors(store, root, body, progress, batch)
        _check_invariant(settings, store, body)
    finally:
        store.close()
    return {"restored_from": str(root), "revision": migrate.current_revision(
        settings.database_url), "tables": body["tables"], "collections": rows,
        "serving": body.get("serving", {}), "images_copied": images,
        "target": {"database": sa.engine.make_url(settings.database_url).get_backend_name(),
                   "milvus": "lite" if settings.milvus_is_lite else "server"}}


def _not_empty(settings: Settings, store: MilvusStore, body: dict[str, Any]) -> list[str]:
    busy = []
    url = settings.database_url
    if migrate.current_revision(url) is not None:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                for table in ("images", "model_versions"):
                    if table in sa.inspect(conn).get_table_names():
                        n = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
                        if n:
                            busy.append(f"{n} rows in {table}")
        finally:
            engine.dispose()
    names = store.list_collections()
    if names:
        busy.append(f"{len(names)} Milvus collections")
    folders = [n for n in body.get("models", {}) if (settings.model_dir / n).exists()]
    if folders:
        busy.append(f"model folders {', '.join(sorted(folders))} in {settings.model_dir}")
    return busy


def _clear(settings: Settings, store: MilvusStore, body: dict[str, Any]) -> None:
    log.warning("--force: dropping every Milvus collection at %s and every row of %s",
                store.uri, sa.engine.make_url(settings.database_url).render_as_string())
    for name in store.list_collections():
        store.drop(name)
    for name in body.get("models", {}):
        shutil.rmtree(settings.model_dir / name, ignore_errors=True)


def _database(settings: Settings, root: Path, body: dict[str, Any]) -> None:
    url = settings.database_url
    revision = body["revision"]
    current = migrate.current_revision(url)
    if current != revision:
        migrate.upgrade(url, revision)
        if migrate.current_revision(url) != revision:
            raise BackupError(f"the target database is at revision {current}, the backup at "
                              f"{revision}: restore into an empty database")
    model_dir = Path(settings.model_dir).resolve()
    source_images = Path(body["source"]["image_dir"])
    image_dir = Path(settings.image_dir).resolve()
    with_files = body.get("images", {}).get("with_files", False)

    def version_row(row: dict[str, Any]) -> dict[str, Any]:
        if body["models"].get(row["name"], {}).get("included"):
            row["artifact_path"] = str(model_dir / row["name"])
        return row

    def image_row(row: dict[str, Any]) -> dict[str, Any]:
        path = Path(row["path"])
        if with_files and path.is_relative_to(source_images):
            row["path"] = str(image_dir / path.relative_to(source_images))
        return row

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            tables.clear_tables(conn)
            tables.import_tables(conn, root / "db", body["tables"],
                                 rewrite={"model_versions": version_row, "images": image_row})
    finally:
        engine.dispose()
    migrate.upgrade(url, "head")


def _models(settings: Settings, root: Path, body: dict[str, Any]) -> None:
    for name, info in body.get("models", {}).items():
        if not info.get("included"):
            continue
        dest = Path(settings.model_dir) / name
        tmp = dest.with_name(dest.name + ".restore")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(root / "models" / name, tmp)
        if artifact_sha256(tmp) != info["artifact_sha256"]:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BackupError(f"model version {name} does not match its sha256 after copying")
        tmp.rename(dest)


def _images(settings: Settings, root: Path, body: dict[str, Any]) -> int:
    files = root / "images" / "files"
    if not files.is_dir():
        return 0
    n = 0
    for src in sorted(p for p in files.rglob("*") if p.is_file()):
        dest = Path(settings.image_dir) / src.relative_to(files)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        n += 1
    return n


def _vectors(store: MilvusStore, root: Path, body: dict[str, Any], progress: bool,
             batch: int) -> dict[str, int]:
    done: dict[str, int] = {}
    for name, info in body.get("collections", {}).items():
        with np.load(root / "vectors" / f"{name}.npz", allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        store.ensure_collection(name, int(info["dim"]))
        ids = data["ids"]
        bar = tqdm(total=len(ids), desc=f"restore {name}", unit="row", disable=not progress)
        for start in range(0, len(ids), batch):
            sl = slice(start, start + batch)
            rows = [VectorRow(make=str(m), body=str(b), colour=str(c), source=str(s),
                              year=int(y))
                    for m, b, c, s, y in zip(data["make"][sl], data["body"][sl],
                                             data["colour"][sl], data["source"][sl],
                                             data["year"][sl], strict=True)]
            store.upsert(name, [int(i) for i in ids[sl]], data["vectors"][sl], rows)
            bar.update(len(rows))
        bar.close()
        store.flush(name)
        done[name] = len(ids)
    if not store.is_lite:
        aliases = body.get("aliases") or {
            alias_for(c): v for c, v in _serving_collections(body).items()}
        for alias, target in aliases.items():
            store.point_alias(target, alias)
    return done


def _serving_collections(body: dict[str, Any]) -> dict[str, str]:
    """image collection -> Milvus collection of its serving version."""
    return {info["image_collection"]: name for name, info in body["collections"].items()
            if info["status"] == "serving"}


def _check_invariant(settings: Settings, store: MilvusStore, body: dict[str, Any]) -> None:
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            for image_collection, name in _serving_collections(body).items():
                in_db = set(conn.execute(sa.text(
                    "SELECT id FROM images WHERE status = 'indexed' AND collection = :c"),
                    {"c": image_collection}).scalars())
                in_milvus = store.ids(name)
                if in_db != in_milvus:
                    raise BackupError(
                        f"after the restore {name} holds {len(in_milvus)} ids, the database "
                        f"{len(in_db)} indexed images of {image_collection}")
    finally:
        engine.dispose()
