"""`carsearch db`: the schema, through the Alembic migrations shipped in the package."""

from __future__ import annotations

from typing import Annotated

import typer

from carsearch.cli.context import settings_from

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Migrate the database up to a revision (default: the newest)."""
    from carsearch.platform.db import migrate

    url = settings_from(ctx).database_url
    migrate.upgrade(url, revision)
    typer.echo(f"database at revision {migrate.current_revision(url)}")


@db_app.command("downgrade")
def db_downgrade(
    ctx: typer.Context, revision: Annotated[str, typer.Argument(help="Target, e.g. base.")]
) -> None:
    """Migrate the database down to a revision."""
    from carsearch.platform.db import migrate

    url = settings_from(ctx).database_url
    migrate.downgrade(url, revision)
    typer.echo(f"database at revision {migrate.current_revision(url) or 'base'}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Show the database's revision and the newest one."""
    from carsearch.platform.db import migrate

    url = settings_from(ctx).database_url
    typer.echo(f"current: {migrate.current_revision(url) or 'base'}")
    typer.echo(f"head:    {migrate.head_revision()}")


