"""`carsearch serve`: start the Gradio search page."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from carsearch.cli_context import settings_from

if TYPE_CHECKING:
    from carsearch.platform.runtime import Platform


def serve_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 7860,
    max_file_size: Annotated[
        str, typer.Option(help="Largest upload Gradio accepts, e.g. 20mb.")
    ] = "20mb",
    ingest: Annotated[
        bool,
        typer.Option(
            "--ingest/--no-ingest",
            help="Also run the ingest worker in this process: the way to ingest while "
            "the page serves a Milvus Lite file, which one process opens at a time.",
        ),
    ] = False,
    inbox: Annotated[
        Path | None, typer.Option(help="Inbox folder for the worker (with --ingest).")
    ] = None,
) -> None:
    """Serve the search page (auth: set CARSEARCH_UI_AUTH=user:password)."""
    from carsearch.platform.runtime import Platform
    from carsearch.ui.app import LaunchOptions, launch, parse_auth

    if inbox is not None and not ingest:
        raise typer.BadParameter("--inbox needs --ingest")

    settings = settings_from(ctx)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    auth = parse_auth(settings.ui_auth)
    settings.ensure_dirs()
    platform = Platform(settings)
    ctx.call_on_close(platform.close)
    login = " (login required)" if auth else ""
    typer.echo(f"carsearch search page: http://{host}:{port}{login}")
    worker = _start_worker(platform, inbox) if ingest else None
    try:
        launch(platform, LaunchOptions(host=host, port=port, auth=auth,
                                       max_file_size=max_file_size))
    finally:
        if worker is not None:
            worker.stop()


class _BackgroundWorker:
    """The ingest worker on a thread of the page's process, sharing its Platform: one
    Milvus Lite client, one encoder, and writes that reach the search mirror at once."""

    def __init__(self, platform: Platform, inbox: Path | None) -> None:
        from carsearch.ingest.worker import IngestWorker

        self.worker = IngestWorker(platform, inbox=inbox)
        self.thread = threading.Thread(target=self.worker.run_forever, name="ingest-worker",
                                       daemon=True)

    def stop(self) -> None:
        """Finish the current batch, then return."""
        self.worker.stop_event.set()
        self.thread.join(timeout=120)


def _start_worker(platform: Platform, inbox: Path | None) -> _BackgroundWorker:
    if inbox is not None:
        inbox.mkdir(parents=True, exist_ok=True)
    bg = _BackgroundWorker(platform, inbox)
    bg.thread.start()
    where = f", watching {inbox}" if inbox is not None else ""
    typer.echo(f"ingest worker running in this process{where}")
    return bg
