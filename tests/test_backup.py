"""Backups that restore, across shapes: a world with a published, serving model and a few
dozen indexed images on Milvus Lite + SQLite is backed up and restored onto the Milvus
server + PostgreSQL, and the reverse; the restored side keeps the ingest invariant, the
serving version and alias, the Alembic head, and answers the same text queries with the
same ids in the same order. A backup taken while images are being ingested (the ingest
forced between the database snapshot and the vector read) holds exactly the snapshot's
rows. Tampering is caught by `backup verify`; a non-empty target is refused without
--force. All parts are real: Lite files, the Milvus server fixture, SQLite, PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from carsearch.backup.create import create_backup
from carsearch.backup.manifest import BackupError, verify
from carsearch.backup.restore import restore_backup
from carsearch.ingest.pipeline import IngestItem, ingest_items, platform_writer
from carsearch.platform.collections import alias_for
from carsearch.platform.db import Lease, QueryFeedback, images, migrate
from carsearch.platform.runtime import Platform
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.milvus import MilvusStore
from fixtures.cli import invoke, one_line_error, run
from fixtures.common import empty_server
from fixtures.common import reset_pg as _reset_pg
from ingest_world import PublishedModel, world
from ui_world import draw_car

CLASSES = [("Chevrolet Silverado 1500 Regular Cab 2012", (200, 20, 20)),
           ("BMW M3 Coupe 2012", (15, 15, 15)),
           ("Jeep Wrangler SUV 2012", (20, 150, 40)),
           ("Ford F-150 Regular Cab 2007", (20, 40, 200)),
           ("Audi R8 Coupe 2012", (230, 200, 30)),
           ("Dodge Ram Pickup 3500 Crew Cab 2010", (120, 120, 120))]
QUERIES = [c for c, _ in CLASSES] + ["red pickup", "black coupe", "green suv"]


def _ingest(p: Platform, folder: Path, n0: int, n: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n0, n0 + n):
        cls, colour = CLASSES[i % len(CLASSES)]
        path = folder / f"car{i}.png"
        draw_car(path, i, colour)
        items.append(IngestItem(path, "lot", {"class_name": cls}))
    return ingest_items(items, db=p.db, writer=platform_writer(p),
                        max_pixels=p.settings.max_image_pixels, progress=False).indexed


def _source(tmp: Path, model: PublishedModel, db_url: str, milvus_uri: str,
            n: int = 24) -> Platform:
    migrate.upgrade(db_url)  # where the drill puts it, not a copy of the template
    p = world(tmp, db_url, model, milvus_uri)
    p.registry.publish(model.artifact, name="v2")  # a candidate, no collection yet
    v1 = p.registry.require_serving()
    if not p.settings.milvus_is_lite:
        p.store.ensure_collection(v1.collection, v1.dim)
        p.store.point_alias(v1.collection, alias_for("vehicles"))
    assert _ingest(p, tmp / "inbox", 0, n) == n
    with p.db.session() as s:
        s.add(QueryFeedback(image_id=1, vote=1, query="red pickup"))
        s.add(Lease(name="drift", holder="old-host:1", expires_at=datetime.now(UTC)
                    + timedelta(hours=1)))
    return p


def _answers(p: Platform) -> list[list[int]]:
    return [[h.image_id for h in p.search.search_text(q, k=10).hits] for q in QUERIES]


def _target(tmp: Path, db_url: str, milvus_uri: str) -> Settings:
    s = Settings(data_dir=tmp / "target", database_url=db_url, milvus_uri=milvus_uri)
    s.ensure_dirs()
    return s


def _check_restored(s: Settings, body: dict, answers: list[list[int]]) -> None:
    assert migrate.current_revision(s.database_url) == migrate.head_revision()
    p = Platform(s)
    try:
        v = p.registry.require_serving()
        assert v.name == "v1"
        assert p.registry.get("v2").status.value == "candidate"
        assert Path(v.artifact_path).parent == s.model_dir.resolve()
        p.registry.verify(v)
        with p.db.session() as sess:  # the old processes' lease is not restored
            assert sess.scalar(sa.select(sa.func.count()).select_from(Lease)) == 0
            assert sess.scalar(sa.select(sa.func.count()).select_from(QueryFeedback)) == 1
        in_db = images.indexed_ids(p.db)
        assert p.store.ids(v.collection) == in_db
        assert len(in_db) == body["collections"][v.collection]["rows"]
        if not s.milvus_is_lite:
            assert p.store.alias_target(alias_for("vehicles")) == v.collection
        assert _answers(p) == answers
        # New rows after the restore get fresh ids (PostgreSQL's sequences moved on).
        with p.db.session() as sess:
            sess.add(QueryFeedback(image_id=2, vote=-1, query="after"))
    finally:
        p.close()


@pytest.mark.postgres
@pytest.mark.milvus_server
@pytest.mark.parametrize("direction", ["lite-to-server", "server-to-lite"])
def test_restore_drill_across_shapes(tmp_path: Path, published_model: PublishedModel,
                                     pg_database: str,
                                     milvus_server, direction: str) -> None:
    _reset_pg(pg_database)
    empty_server(milvus_server.uri)
    lite = (f"sqlite:///{tmp_path / 'lite' / 'carsearch.db'}", str(tmp_path / "lite" / "m.db"))
    server = (pg_database, milvus_server.uri)
    src, dst = (lite, server) if direction == "lite-to-server" else (server, lite)
    p = _source(tmp_path / "src", published_model, *src)
    answers = _answers(p)
    assert all(answers)
    settings = p.settings
    p.close()  # a Lite file is opened by one process at a time
    body = create_backup(settings, tmp_path / "backup", with_images=True, progress=False)
    assert body["source"]["milvus"] == ("lite" if src is lite else "server")
    assert body["images"] == {"rows": 24, "stored": 24, "files": 24, "with_files": True}
    assert set(body["models"]) == {"v1", "v2"}
    if src is server:  # the source is emptied: the restore must not read from it
        _reset_pg(pg_database)
        empty_server(milvus_server.uri)
    target = _target(tmp_path / "dst", *dst)
    out = restore_backup(target, tmp_path / "backup", progress=False)
    assert out["serving"] == {"vehicles": "v1"}
    _check_restored(target, body, answers)


@pytest.mark.postgres
@pytest.mark.milvus_server
def test_backup_taken_while_ingesting_holds_the_snapshot(
        tmp_path: Path, published_model: PublishedModel, pg_database: str,
        milvus_server) -> None:
    """The production shape keeps ingesting while the backup runs: 12 more images are
    indexed between the database snapshot and the vector read (forced by the hook). The
    backup holds the snapshot's 12 and restores with the invariant holding."""
    _reset_pg(pg_database)
    empty_server(milvus_server.uri)
    p = _source(tmp_path / "src", published_model, pg_database, milvus_server.uri, n=12)
    v = p.registry.require_serving()
    try:
        body = create_backup(p.settings, tmp_path / "backup", progress=False,
                             hook=lambda point: _ingest(p, tmp_path / "late", 100, 12))
        assert len(p.store.ids(v.collection)) == 24  # the live side moved on
    finally:
        p.close()
    assert body["collections"][v.collection]["rows"] == 12
    assert body["tables"]["images"] == 12
    target = _target(tmp_path / "dst", f"sqlite:///{tmp_path / 'dst.db'}",
                     str(tmp_path / "dst-m.db"))
    restore_backup(target, tmp_path / "backup", progress=False)
    t = Platform(target)
    try:
        assert t.store.ids(v.collection) == images.indexed_ids(t.db)
        assert len(images.indexed_ids(t.db)) == 12
    finally:
        t.close()


@pytest.fixture
def lite_backup(tmp_path: Path, published_model: PublishedModel
                ) -> tuple[Path, list[list[int]]]:
    p = _source(tmp_path / "src", published_model, f"sqlite:///{tmp_path / 'src.db'}",
                str(tmp_path / "src-m.db"), n=12)
    answers = _answers(p)
    settings = p.settings
    p.close()
    create_backup(settings, tmp_path / "backup", progress=False)
    return tmp_path / "backup", answers


def test_non_empty_target_is_refused_unless_forced(tmp_path: Path, lite_backup) -> None:
    root, answers = lite_backup
    target = _target(tmp_path / "dst", f"sqlite:///{tmp_path / 'dst.db'}",
                     str(tmp_path / "dst-m.db"))
    body = restore_backup(target, root, progress=False)
    with pytest.raises(BackupError, match="not empty"):
        restore_backup(target, root, progress=False)
    restore_backup(target, root, force=True, progress=False)
    _check_restored(target, verify(root), answers)
    del body


def test_verify_catches_a_changed_or_missing_file(tmp_path: Path, lite_backup) -> None:
    root, _ = lite_backup
    body = verify(root)
    assert body["tables"]["images"] == 12 and body["images"]["with_files"] is False
    assert sorted(p.name for p in (root / "db").glob("carsearch.sqlite*")) == ["carsearch.sqlite"]
    npz = next((root / "vectors").glob("*.npz"))
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["vectors"][0, 0] += 1.0
    np.savez(npz, **arrays)
    with pytest.raises(BackupError, match="sha256"):
        verify(root)
    npz.unlink()
    with pytest.raises(BackupError, match="missing"):
        verify(root)


def test_the_cli_backs_up_verifies_restores_and_refuses(tmp_path: Path, lite_backup) -> None:
    """`backup create|verify|restore` from the command line, with one-line errors."""
    import os

    root, _ = lite_backup
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARSEARCH_")}
    env.update(CARSEARCH_DATA_DIR=str(tmp_path / "cli"), CARSEARCH_LOG_LEVEL="WARNING")
    out = json.loads(invoke(["backup", "verify", str(root), "--json"], env).stdout)
    assert out["ok"] is True
    restored = invoke(["backup", "restore", str(root)], env).stdout
    assert "serving: vehicles: v1" in restored
    one_line_error(invoke(["backup", "restore", str(root)], env, ok=False), "not empty")
    second = invoke(["backup", "create", "--out", str(tmp_path / "again")], env).stdout
    assert "collections:" in second and "guarantee:" in second
    one_line_error(invoke(["backup", "create", "--out", str(tmp_path / "again")], env, ok=False),
                   "not an empty folder")
    manifest = tmp_path / "again" / "manifest.json"
    body = json.loads(manifest.read_text())
    body["tables"]["images"] += 1
    manifest.write_text(json.dumps(body))
    one_line_error(invoke(["backup", "verify", str(tmp_path / "again")], env, ok=False),
                   "table images holds 12 rows")
    one_line_error(invoke(["backup", "verify", str(tmp_path / "nowhere")], env, ok=False),
                   "not a backup")
    body["tables"]["images"] -= 1
    body["models"]["../../escape"] = body["models"].pop("v1")
    manifest.write_text(json.dumps(body))
    one_line_error(invoke(["backup", "verify", str(tmp_path / "again")], env, ok=False),
                   "not a plain name")
    held = MilvusStore(str(tmp_path / "cli" / "milvus.db"))  # as a running `serve` would
    try:
        one_line_error(run(["backup", "create", "--out", str(tmp_path / "busy")], env,
                           ok=False), "stop `carsearch serve`")
    finally:
        held.close()
    assert not (tmp_path / "busy").exists()
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'cli' / 'carsearch.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM images")).scalar() == 12
    engine.dispose()
