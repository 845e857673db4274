"""The one command-line entry point: `carsearch <verb>`.

The root callback builds Settings from the environment and hands it to every command
through the Typer context (`ctx.obj`); errors a person can fix print as one line.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

import typer

from carsearch.platform.errors import CarsearchError
from carsearch.platform.settings import apply_thread_settings, load_settings

app = typer.Typer(
    name="carsearch",
    help="Natural-language vehicle image retrieval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(ctx: typer.Context) -> None:
    """Natural-language vehicle image retrieval."""
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet_libraries(settings.log_level)
    apply_thread_settings(settings)
    ctx.obj = settings


def quiet_libraries(level: str) -> None:
    """Keep third-party chatter (faiss loader, Milvus Lite start/stop) below our own logs."""
    floor = max(logging.WARNING, logging.getLevelName(level))
    for name in ("faiss.loader", "alembic.runtime.migration", "httpx", "milvus_lite"):
        logging.getLogger(name).setLevel(floor)
    # pymilvus asks Milvus Lite for AllocTimestamp, which Lite does not implement; the
    # client falls back by itself, but grpc logs the refusal as an error with a trace.
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)


def _evaluate_app() -> typer.Typer:
    """`carsearch evaluate` (retrieval metrics of models) with `evaluate ann` beneath it."""
    from carsearch import bench_cli
    from carsearch.training import train_cli

    sub = typer.Typer(
        invoke_without_command=True,
        help="Retrieval metrics of models on the test split; `evaluate ann` audits Milvus.",
    )

    @functools.wraps(train_cli.evaluate_command)
    def _models(ctx: typer.Context, **kwargs: Any) -> None:
        if ctx.invoked_subcommand is None:
            train_cli.evaluate_command(ctx, **kwargs)

    sub.callback()(_models)
    sub.command("ann")(bench_cli.ann_command)
    return sub


def _register() -> None:
    # Sub-commands live beside the parts they drive; imported here so that
    # `carsearch --help` lists them all.
    from carsearch import bench_cli, health_cli, platform_cli, ui_cli
    from carsearch.training import augment_cli, base_cli, data_cli, drift_cli, train_cli

    app.add_typer(platform_cli.db_app, name="db")
    app.add_typer(base_cli.app, name="base")
    app.add_typer(data_cli.app, name="data")
    app.add_typer(platform_cli.models_app, name="models")
    app.add_typer(platform_cli.ingest_app, name="ingest")
    app.command("search")(platform_cli.search_command)
    app.command("reconcile")(platform_cli.reconcile_command)
    app.command("augment")(augment_cli.augment_command)
    app.command("train")(train_cli.train_command)
    app.add_typer(_evaluate_app(), name="evaluate")
    app.add_typer(bench_cli.app, name="bench")
    app.add_typer(drift_cli.app, name="drift")
    app.command("serve")(ui_cli.serve_command)
    app.command("health")(health_cli.health_command)


_register()


def main() -> None:
    try:
        app()
    except CarsearchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
