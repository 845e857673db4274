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
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from carsearch.platform.db import Database, migrate
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.server import LocalMilvusServer, MilvusServerError
from fixtures.common import REPO, empty_server, in_ci, reset_pg
from ingest_world import PublishedModel

# Fixture modules every test module can use (their fixtures are named as parameters).
pytest_plugins = ["fixtures.cli", "fixtures.site", "fixtures.search_world",
                  "fixtures.pages"]

PG_SERVER = os.environ.get(
    "CARSEARCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
STANFORD = Path(os.environ.get("CARSEARCH_STANFORD_ROOT", REPO.parent / "shared" / "stanford_cars"))

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_in_ci = in_ci  # the names test modules imported from here before tests/fixtures
_reset_pg = reset_pg
__all__ = ["REPO", "_in_ci", "_reset_pg", "empty_server"]


# ---- Test tiers ----------------------------------------------------------------------
# `make test` runs `pytest -m "not full"` (the newcomer's loop, a few minutes on 2 cores);
# `make test-all` runs everything (CI). A test joins the full tier when any of these holds:
# - it runs on a PostgreSQL or Milvus server shape (a `postgres` or `milvus_server` mark,
#   which the shape parameters in this file and the modules' own shape fixtures carry);
# - it needs the real photos (the `stanford_root` fixture) or is marked `slow` or `full`;
# - its module or its name is in the lists below (measured slow: a CLI subprocess per
#   step, a page server, a training run, a browser).
# Everything else stays in the fast tier, so a new test is fast unless it says otherwise.
# CLI behaviour runs in-process (tests/fixtures/cli.py: `cli`, `invoke`); the CLI tests
# that became cheap that way are back in the fast tier (the missing-model and label CLI
# tests, `label create`, `classify`, the Unsplash manifest ingested twice). What moved
# tier or was merged, and why: docs/TESTING.md.
FULL_MARKS = {"full", "slow", "postgres", "milvus_server"}
FULL_FIXTURES = {"stanford_root", "pg_server", "pg_database", "milvus_server"}
FULL_MODULES = {
    "test_bench_server.py",
    "test_chaos.py",
    "test_checkpoint_layouts.py",
    "test_demo_script.py",
    "test_milvus_auth.py",
    "test_production_shape.py",
    "test_retrain.py",
    "test_train_ddp.py",
    "test_ui_browser.py",
    "test_ui_ingest.py",
}
FULL_TESTS: set[str] = {  # "module::test" (every parameter of it)
    "test_alerts.py::test_a_real_prometheus_scrapes_the_ingest_worker",
    "test_api.py::test_the_served_api_needs_the_page_login",
    "test_backup.py::test_the_cli_backs_up_verifies_restores_and_refuses",
    "test_cli.py::test_model_lifecycle_moves_the_serving_alias",
    "test_cli.py::test_round_trip",
    "test_cli.py::test_unmigrated_database_is_one_line",
    "test_collections.py::test_a_general_collection_from_an_unsplash_manifest_end_to_end",
    "test_compact_base.py::test_the_recipes_default_base_trains_stage_1_only",
    "test_compact_base.py::test_a_stage1_only_run_publishes_stage1s_model_with_its_policy",
    "test_compact_base.py::test_train_passes_no_class_texts_to_stage_1",
    "test_compact_base.py::"
    "test_stage1_trains_on_the_served_framings_with_colour_aware_positives",
    "test_drift.py::test_cli_json_and_one_line_errors",
    "test_fuzz.py::test_the_cli",
    "test_fuzz.py::test_the_json_api_answers_every_input",
    "test_fuzz.py::test_the_search_options",
    "test_ingest_worker.py::test_sigkill_and_restart",
    "test_onnx.py::test_export_command_and_onnx_for_ingest_and_search",
    "test_search_features.py::test_page_two_of_a_100_result_query_while_the_worker_ingests",
    "test_search_features.py::test_the_cli_search_options",
    "test_security.py::test_a_person_logs_in_through_the_gate_in_chromium",
    "test_security.py::test_every_route_refuses_a_client_without_credentials",
    "test_security.py::test_no_auth_starts_on_the_network_and_the_page_says_so",
    "test_security.py::test_serving_the_network_without_a_login_is_refused",
    "test_train.py::test_a_tampered_checkpoint_is_refused_before_anything_is_unpickled",
    "test_train.py::test_each_loss_trains_through_the_real_loops",
    "test_train.py::test_resume_continues_exactly",
    "test_ui.py::test_login_is_required_when_auth_is_set",
}
# Modules or tests whose single test (with its module's fixtures) can run past the default
# per-test timeout (pyproject's `timeout`, 600 s) on a loaded 2-core machine, with theirs:
# the so400m layout (6-7 min alone), whole pipelines in subprocesses, DDP, training.
LONG_TESTS = {
    "test_checkpoint_layouts.py": 1200,
    "test_chaos.py": 900,
    "test_demo_script.py": 900,
    "test_production_shape.py": 900,
    "test_retrain.py": 1800,
    "test_train_ddp.py": 900,
}


# `make test-all TEST_WORKERS=2` runs on two pytest-xdist workers, `--dist loadscope`: each module
# (or class) whole on one worker, so its module-scoped worlds, servers and browsers are
# made once, and the chaos runs (one module) never run beside each other; handed out in
# collection order. Under xdist the modules measured longest go first, so that no worker
# is left running one of them alone at the end; the others, and every module's own tests,
# keep their order. Each worker has its own temporary directory (so its own Milvus server
# data, SQLite template and Lite files), PostgreSQL database names carry the process id,
# ports are free ones, and Milvus server starts are serialised machine-wide
# (`LocalMilvusServer`).
LONGEST_FIRST = [
    "test_retrain.py",
    "test_chaos.py",
    "test_checkpoint_layouts.py",
    "test_ann_audit.py",
    "test_security.py",
    "test_production_shape.py",
    "test_ui_browser.py",
    "test_demo_script.py",
    "test_train_ddp.py",
    "test_cli.py",
]


def _in_full_tier(item: pytest.Item) -> bool:
    module = item.path.name
    name = f"{module}::{item.originalname if isinstance(item, pytest.Function) else item.name}"
    return (module in FULL_MODULES or name in FULL_TESTS
            or any(m.name in FULL_MARKS for m in item.iter_markers())
            or bool(FULL_FIXTURES & set(getattr(item, "fixturenames", ()))))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _in_full_tier(item):
            item.add_marker(pytest.mark.full)
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        limit = LONG_TESTS.get(name) or LONG_TESTS.get(item.path.name)
        if limit and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(limit))
    if hasattr(config, "workerinput"):  # an xdist worker: the same order on every worker
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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


def _pg_url(server: str, name: str) -> str:
    return server.rsplit("/", 1)[0] + "/" + name


def _pg_admin(server: str, *statements: str) -> None:
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once per run; `database` copies it."""
    path = tmp_path_factory.mktemp("db-template") / "template.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def pg_template(pg_server: str) -> Iterator[str]:
    """A PostgreSQL database migrated to head once per run, the template each test's
    database is made from (`CREATE DATABASE ... TEMPLATE`); dropped at the end."""
    name = f"carsearch_tmpl_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    _pg_admin(pg_server, f'CREATE DATABASE "{name}"')
    try:
        migrate.upgrade(_pg_url(pg_server, name))
        yield name
    finally:
        _pg_admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_kind(request: pytest.FixtureRequest) -> str:
    """Each database kind in turn: SQLite, then the PostgreSQL server."""
    return str(request.param)


@pytest.fixture
def db_url(db_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database URL of each kind (not migrated)."""
    if db_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    url: str = request.getfixturevalue("pg_database")
    _reset_pg(url)
    return url


class MakeDatabase:
    """`make_database(kind)`: a migrated database of that kind, a copy of this run's
    template (a file copy on SQLite, `CREATE DATABASE ... TEMPLATE` on PostgreSQL), not
    Alembic per test; each is disposed (and on PostgreSQL dropped) after the test."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request, self.tmp_path = request, tmp_path
        self.made: list[tuple[Database, str | None]] = []

    def __call__(self, kind: str) -> Database:
        if kind == "sqlite":
            path = self.tmp_path / f"migrated{len(self.made)}.db"  # not db_url's test.db
            shutil.copyfile(self.request.getfixturevalue("sqlite_template"), path)
            db = Database(f"sqlite:///{path}")
            self.made.append((db, None))
            return db
        server: str = self.request.getfixturevalue("pg_server")
        template: str = self.request.getfixturevalue("pg_template")
        name = f"carsearch_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        _pg_admin(server, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        db = Database(_pg_url(server, name))
        self.made.append((db, server))
        return db

    def close(self) -> None:
        for db, server in reversed(self.made):
            db.dispose()
            if server is not None:
                name = db.url.rsplit("/", 1)[1]
                _pg_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def make_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeDatabase]:
    """A factory of migrated databases (`make_database("sqlite" | "postgresql")`)."""
    made = MakeDatabase(request, tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def database(db_kind: str, make_database: MakeDatabase) -> Database:
    """A migrated database of each kind: a copy of this run's migrated template (a file
    copy on SQLite, `CREATE DATABASE ... TEMPLATE` on PostgreSQL), not Alembic per test."""
    return make_database(db_kind)


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
def published_model(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path,
                    compact_model: Path) -> PublishedModel:
    """The compact model published once per run as `v1` (the real `Registry.publish`, into
    a registry of its own): `ingest_world.world` copies its folder and records its row in
    a test's database instead of publishing and promoting per test."""
    root = tmp_path_factory.mktemp("published")
    shutil.copyfile(sqlite_template, root / "registry.db")
    db = Database(f"sqlite:///{root / 'registry.db'}")
    try:
        return PublishedModel.publish(db, root / "models", compact_model, "v1")
    finally:
        db.dispose()


@pytest.fixture(scope="session")
def stanford_root() -> Path:
    """The real Stanford Cars photos (``../shared/stanford_cars`` or
    $CARSEARCH_STANFORD_ROOT). Skipped where absent, except under CI, where it fails: CI
    has ``../shared`` and must run the real-photo tests."""
    if not (STANFORD / "cars_meta.mat").is_file():
        msg = f"Stanford Cars is not at {STANFORD} (set CARSEARCH_STANFORD_ROOT)"
        if _in_ci():
            pytest.fail(msg + " (CI must run the real-photo tests)")
        pytest.skip(msg)
    return STANFORD
