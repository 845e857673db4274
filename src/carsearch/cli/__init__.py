"""The one command-line entry point: `carsearch <verb>`, a module per verb group.

The root callback builds Settings from the environment, sizes the thread pools before any
library starts them, and hands the Settings to every command through the Typer context
(`ctx.obj`); errors a person can fix print as one line. May import every part; imports
only Typer and the settings at start, the rest inside the commands.
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
    for name in ("faiss.loader", "alembic", "httpx", "milvus_lite"):
        logging.getLogger(name).setLevel(floor)
    # pymilvus asks Milvus Lite for AllocTimestamp, which Lite does not implement; the
    # client falls back by itself, but grpc logs the refusal as an error with a trace.
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)


def _evaluate_app() -> typer.Typer:
    """`carsearch evaluate` (retrieval metrics of models) with `evaluate ann` beneath it."""
    from carsearch.cli import monitor, train

    sub = typer.Typer(
        invoke_without_command=True,
        help="Retrieval metrics of models on the test split; `evaluate ann` audits Milvus.",
    )

    @functools.wraps(train.evaluate_command)
    def _models(ctx: typer.Context, **kwargs: Any) -> None:
        if ctx.invoked_subcommand is None:
            train.evaluate_command(ctx, **kwargs)

    sub.callback()(_models)
    sub.command("ann")(monitor.ann_command)
    return sub


def _register() -> None:
    # One module per verb group; each imports its heavy libraries inside the commands, so
    # that `carsearch --help` starts at once.
    from carsearch.cli import (
        augment,
        backup,
        base,
        collections,
        data,
        db,
        ingest,
        label,
        models,
        monitor,
        retrain,
        search,
        serve,
        train,
    )

    app.add_typer(db.db_app, name="db")
    app.add_typer(backup.backup_app, name="backup")
    app.add_typer(base.app, name="base")
    app.add_typer(data.app, name="data")
    app.add_typer(collections.collections_app, name="collections")
    app.add_typer(models.models_app, name="models")
    app.add_typer(ingest.ingest_app, name="ingest")
    app.add_typer(label.label_app, name="label")
    app.add_typer(retrain.retrain_app, name="retrain")
    app.command("search")(search.search_command)
    app.command("classify")(search.classify_command)
    app.command("duplicates")(search.duplicates_command)
    app.command("reconcile")(ingest.reconcile_command)
    app.command("augment")(augment.augment_command)
    app.command("train")(train.train_command)
    app.add_typer(_evaluate_app(), name="evaluate")
    app.add_typer(monitor.drift_app, name="drift")
    app.command("serve")(serve.serve_command)
    app.command("health")(monitor.health_command)


_register()


def main() -> None:
    from carsearch.platform.memory import keep_freed_memory

    keep_freed_memory()  # batches reuse freed pages: platform/memory.py
    try:
        app()
    except CarsearchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
