"""Run the Alembic migrations: the only way the schema is made or changed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import OperationalError

from carsearch.platform.db.engine import make_engine
from carsearch.platform.errors import ConfigError


def migrations_dir() -> Path:
    """The Alembic environment shipped inside the package (``carsearch/migrations``), so
    an installed wheel migrates from any directory; $CARSEARCH_MIGRATIONS_DIR overrides."""
    env = os.environ.get("CARSEARCH_MIGRATIONS_DIR")
    where = Path(env) if env else Path(__file__).resolve().parents[2] / "migrations"
    if not (where / "env.py").is_file():
        raise ConfigError(f"no Alembic environment at {where} (CARSEARCH_MIGRATIONS_DIR)")
    return where


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command  # its autogenerate imports are slow: only when migrating

    _run(url, lambda cfg: command.upgrade(cfg, revision))


def downgrade(url: str, revision: str) -> None:
    from alembic import command  # its autogenerate imports are slow: only when migrating

    _run(url, lambda cfg: command.downgrade(cfg, revision))


def _run(url: str, fn: Callable[[Config], None]) -> None:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        fn(alembic_config(url))
    except OperationalError as exc:
        raise ConfigError(f"cannot reach the database {_safe(url)}: {_one_line(exc)}") from None


def current_revision(url: str) -> str | None:
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None  # not created yet; connecting would create an empty file
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise ConfigError(f"cannot reach the database {_safe(url)}: {_one_line(exc)}") from None
    finally:
        engine.dispose()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def _one_line(exc: OperationalError) -> str:
    return " ".join(str(exc.orig).split())


def _safe(url: str) -> str:
    """A URL with any password masked, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
