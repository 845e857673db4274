"""`carsearch drift run`: the drift job once, or every N seconds.

`app` is the `drift` sub-app the root CLI registers; settings come from the root context.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Annotated

import typer

from carsearch.cli_context import HealthPort, once_or_every, settings_from
from carsearch.platform.errors import ConfigError

__all__ = ["app", "parse_since"]

log = logging.getLogger(__name__)

app = typer.Typer(help="Drift monitoring: isolated clusters of new embeddings trigger "
                  "retraining.", no_args_is_help=True)


def parse_since(value: str) -> datetime:
    """An ISO-8601 date or time; without an offset it is taken as UTC."""
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError(
            f"--since must be an ISO-8601 date or time (2025-01-31T12:00:00+00:00), "
            f"got {value!r}"
        ) from None


@app.command("run")
def run_command(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(
        help="Check images ingested since this ISO time (default: since the last report; "
             "the first run records a baseline).")] = None,
    every: Annotated[float | None, typer.Option(
        help="Repeat every SECONDS until SIGINT/SIGTERM.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    health_port: Annotated[int, HealthPort] = 0,
) -> None:
    """Compare the kNN density of newly indexed images with the collection's, record a
    drift report, and start the retrain command when isolated clusters are found."""
    from carsearch.platform.runtime import Platform
    from carsearch.training.drift import run_drift

    start = parse_since(since) if since is not None else None
    if start is not None and every is not None:
        raise ConfigError("--since checks one window; --every follows the last report: "
                          "use one of them")
    platform = Platform(settings_from(ctx))

    def once() -> None:
        run = run_drift(platform, since=start, progress=not as_json and every is None)
        typer.echo(json.dumps(run.to_dict(), indent=2) if as_json else run.summary())

    once_or_every(platform, once, every, name="drift-job", health_port=health_port)
