"""What CLI verbs share: the Settings the root built, and running a job on a schedule."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer

from carsearch.platform.settings import Settings, load_settings

if TYPE_CHECKING:
    from carsearch.monitoring.health import Health
    from carsearch.platform.runtime import Platform


def platform_from(ctx: typer.Context) -> Platform:
    """The platform for a verb, closed when the command ends."""
    from carsearch.platform.runtime import Platform

    p = Platform(settings_from(ctx))
    ctx.call_on_close(p.close)
    return p


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def encoder_option() -> Any:
    """`--encoder torch|onnx`: what runs the model for this command (CARSEARCH_ENCODER)."""
    return typer.Option("--encoder", metavar="torch|onnx",
                        help="PyTorch, or ONNX Runtime over an export of the version "
                             "(made on first use); default CARSEARCH_ENCODER.")


def use_encoder(ctx: typer.Context, encoder: str | None) -> None:
    """Make the command's Settings use ``encoder`` (None: keep CARSEARCH_ENCODER)."""
    if encoder is None:
        return
    from carsearch.platform.errors import ConfigError

    if encoder not in ("torch", "onnx"):
        raise ConfigError(f"--encoder is torch or onnx, not {encoder!r}")
    ctx.find_root().obj = settings_from(ctx).model_copy(update={"encoder": encoder})


def settings_from(ctx: typer.Context) -> Settings:
    """The Settings the `carsearch` root callback built, or fresh ones from the
    environment when a verb runs under another root (a test's own Typer app)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else load_settings()


def once_or_every(platform: Platform, job: Callable[[], None], every: float | None, *,
                  name: str, health_port: int | None = None) -> None:
    """Run a job once, or every ``every`` seconds until SIGINT/SIGTERM as a supervised
    loop (with /healthz and /metrics on ``health_port``); then close the platform (the
    scheduled verbs: `evaluate ann`, `drift run`)."""
    from carsearch.monitoring.health import Health
    from carsearch.platform.scheduler import run_every

    try:
        if every is None:
            job()
            return
        health = Health(platform, role=name)
        with serving_health(health, health_port, platform.settings.health_host):
            run_every(job, every, state=health.loop(name, every))
    finally:
        platform.close()


@contextmanager
def serving_health(health: Health, port: int | None, host: str) -> Iterator[None]:
    """Serve /healthz and /metrics on ``port`` (none when it is None or 0) meanwhile."""
    from carsearch.monitoring.health import HealthServer

    server = HealthServer(health, port, host).start() if port else None
    try:
        yield
    finally:
        if server is not None:
            server.stop()


def collection_option() -> Any:
    """`--collection NAME`: which image collection (default: vehicles, or the only one)."""
    return typer.Option("--collection", "-c", metavar="NAME",
                        help="Image collection (default: vehicles, or the only one; "
                             "`carsearch collections list`).")


def collection_from(platform: Platform, name: str | None) -> str:
    """The collection a command means (checked: it exists)."""
    from carsearch.platform import collections

    return collections.resolve(platform.db, name).name


HealthPort = typer.Option(
    "--health-port", min=0, max=65535,
    help="Serve /healthz, /livez and /metrics on this port (CARSEARCH_HEALTH_HOST, "
    "127.0.0.1 by default); 0: none.",
)
