"""Shared fixtures: real SQLite and PostgreSQL databases, Milvus Lite files, a real
Milvus server, a real model.

PostgreSQL is the server at 127.0.0.1:5432 (user postgres, trust auth). Each test run
creates its own database and drops it at the end. Where the server is unreachable the
PostgreSQL tests skip, except under CI (CI=true), where they fail: CI must run them.

The Milvus server is the standalone binary of the `milvus` package (a dev dependency),
started once per test run on free ports with a temporary data directory and stopped (its
whole process group) at the end. `milvus_uri` gives each test a Lite file and the server
in turn; a server test starts with no collections. Where the server cannot start the
server tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from carsearch.platform.db import Database, migrate
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.server import LocalMilvusServer, MilvusServerError

REPO = Path(__file__).resolve().parents[1]
PG_SERVER = os.environ.get(
    "CARSEARCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
STANFORD = Path(os.environ.get("CARSEARCH_STANFORD_ROOT", REPO.parent / "shared" / "stanford_cars"))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The PostgreSQL server URL (the maintenance database), or skip/fail."""
    engine = sa.create_engine(PG_SERVER, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        msg = f"PostgreSQL at {PG_SERVER} is unreachable: {exc.orig}"
        if _in_ci():
            pytest.fail(msg + " (CI must run the PostgreSQL tests)")
        pytest.skip(msg)
    engine.dispose()
    yield PG_SERVER


@pytest.fixture(scope="session")
def pg_database(pg_server: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, dropped at the end."""
    name = f"carsearch_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = pg_server.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _reset_pg(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database URL of each kind (not migrated)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    url: str = request.getfixturevalue("pg_database")
    _reset_pg(url)
    return url


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """A migrated database of each kind."""
    migrate.upgrade(db_url)
    db = Database(db_url)
    yield db
    db.dispose()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMilvusServer]:
    """One Milvus standalone server for the whole run, or skip/fail."""
    server = LocalMilvusServer(tmp_path_factory.mktemp("milvus-server"))
    try:
        server.start()
    except MilvusServerError as exc:
        if _in_ci():
            pytest.fail(f"{exc} (CI must run the Milvus server tests)")
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


def empty_server(uri: str) -> None:
    """Drop every collection (and so its aliases) on a server between tests."""
    from carsearch.platform.vectors.store import MilvusStore

    store = MilvusStore(uri)
    try:
        for name in store.list_collections():
            store.drop(name)
    finally:
        store.close()


@pytest.fixture(params=["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def milvus_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A Milvus Lite file, then the Milvus server (emptied for this test)."""
    if request.param == "lite":
        return str(tmp_path / "milvus.db")
    server: LocalMilvusServer = request.getfixturevalue("milvus_server")
    empty_server(server.uri)
    return server.uri


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture(scope="session")
def compact_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real compact SigLIP built once per test run."""
    from carsearch.training.base_model import build_compact_base

    out = tmp_path_factory.mktemp("model") / "compact"
    build_compact_base(out, seed=0)
    return out


@pytest.fixture(scope="session")
def stanford_root() -> Path:
    if not (STANFORD / "cars_meta.mat").is_file():
        pytest.skip(f"Stanford Cars is not at {STANFORD} (set CARSEARCH_STANFORD_ROOT)")
    return STANFORD
