"""Alembic migrations up and down on SQLite and the real PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from carsearch.platform.db import Base, Database, ModelVersion, VersionStatus, migrate

TABLES = {
    "images", "model_versions", "ingest_jobs", "training_runs", "drift_reports", "query_log",
    "ann_reports", "query_feedback", "loop_status", "leases",
}


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_then_downgrade(db_url: str) -> None:
    assert migrate.current_revision(db_url) is None
    migrate.upgrade(db_url)
    assert migrate.current_revision(db_url) == migrate.head_revision()
    assert _tables(db_url) >= TABLES
    migrate.downgrade(db_url, "base")
    assert migrate.current_revision(db_url) is None
    assert _tables(db_url) == set()
    migrate.upgrade(db_url)  # and up again, cleanly
    assert _tables(db_url) >= TABLES


def test_models_match_the_migrations(database: Database) -> None:
    with database.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_database_allows_one_serving_version(database: Database) -> None:
    def version(name: str) -> ModelVersion:
        return ModelVersion(
            name=name, base_model="b", artifact_path="/x", artifact_sha256="0" * 64,
            dim=8, collection=name, status=VersionStatus.serving,
        )

    with database.session() as s:
        s.add(version("a"))
    with pytest.raises(sa.exc.IntegrityError), database.session() as s:
        s.add(version("b"))


def test_unreachable_database_is_one_line(tmp_path) -> None:
    from carsearch.platform.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        migrate.upgrade("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(err.value)
    assert "cannot reach the database" in str(err.value)
