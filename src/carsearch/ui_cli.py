"""`carsearch serve`: start the Gradio search page."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from carsearch.cli_context import settings_from


def serve_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 7860,
    max_file_size: Annotated[
        str, typer.Option(help="Largest upload Gradio accepts, e.g. 20mb.")
    ] = "20mb",
) -> None:
    """Serve the search page (auth: set CARSEARCH_UI_AUTH=user:password)."""
    from carsearch.platform.runtime import Platform
    from carsearch.ui.app import LaunchOptions, launch, parse_auth

    settings = settings_from(ctx)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    auth = parse_auth(settings.ui_auth)
    settings.ensure_dirs()
    platform = Platform(settings)
    ctx.call_on_close(platform.close)
    login = " (login required)" if auth else ""
    typer.echo(f"carsearch search page: http://{host}:{port}{login}")
    launch(platform, LaunchOptions(host=host, port=port, auth=auth, max_file_size=max_file_size))
