"""`carsearch serve`: start the Gradio search page, optionally with the platform's
background jobs (ingest worker, drift job) on threads of the same process."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from carsearch.cli.context import HealthPort, serving_health, settings_from

if TYPE_CHECKING:
    from carsearch.platform.runtime import Platform
    from carsearch.platform.scheduler import BackgroundJobs

log = logging.getLogger(__name__)


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
    drift_every: Annotated[
        float | None,
        typer.Option(help="Also run the drift job every SECONDS in this process.", min=1),
    ] = None,
    retrain_every: Annotated[
        float | None,
        typer.Option(help="Also run the retrain job every SECONDS in this process (with "
                     "Milvus Lite, the one process that can promote).", min=1),
    ] = None,
    health_port: Annotated[int, HealthPort] = 0,
    no_auth: Annotated[
        bool,
        typer.Option(
            "--no-auth",
            help="Serve a non-loopback address without CARSEARCH_UI_AUTH (refused "
            "otherwise); the page then says it is open to anyone.",
        ),
    ] = False,
) -> None:
    """Serve the search page (auth: set CARSEARCH_UI_AUTH=user:password; required for
    a non-loopback --host unless --no-auth)."""
    from carsearch.lifecycle.labelling import PlatformLabeller
    from carsearch.monitoring.health import Health
    from carsearch.platform.errors import CarsearchError, ConfigError
    from carsearch.platform.runtime import Platform
    from carsearch.platform.scheduler import BackgroundJobs
    from carsearch.ui.app import LaunchOptions, launch, parse_auth

    if inbox is not None and not ingest:
        raise typer.BadParameter("--inbox needs --ingest")
    settings = settings_from(ctx)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    auth = parse_auth(settings.ui_auth)
    open_to_network = auth is None and not is_loopback(host)
    if open_to_network and not no_auth:
        raise ConfigError(
            f"refusing to serve {host} without a login: set CARSEARCH_UI_AUTH=user:password, "
            "or pass --no-auth to open the page to anyone who can reach it")
    if open_to_network:
        log.warning("serving %s with no login (--no-auth): anyone who can reach it may "
                    "search", host)
    settings.ensure_dirs()
    platform = Platform(settings)
    ctx.call_on_close(platform.close)
    login = " (login required)" if auth else ""
    typer.echo(f"carsearch search page: http://{host}:{port}{login}")
    health = Health(platform, role="page")
    jobs = BackgroundJobs(health)
    if ingest:
        _start_worker(jobs, platform, inbox)
    if drift_every is not None:
        _start_drift(jobs, platform, drift_every)
    if retrain_every is not None:
        _start_retrain(jobs, platform, retrain_every)
    page_up = threading.Event()

    def page() -> str:
        if not page_up.is_set():
            raise CarsearchError("the page is starting")
        return f"http://{host}:{port}"

    health.add_check("page", page)  # ready only once the page itself answers
    demo = None
    try:
        with serving_health(health, health_port, settings.health_host):
            options = LaunchOptions(host=host, port=port, auth=auth,
                                    max_file_size=max_file_size, no_auth=open_to_network)
            demo = launch(platform, options, block=False,
                          labeller=PlatformLabeller(platform))
            page_up.set()
            demo.block_thread()
    except KeyboardInterrupt:
        # Ctrl-C is how a person stops the page, also while it is still starting (the
        # page answers before `launch` returns): a normal stop, not an error.
        log.info("interrupted: stopping the page")
        if demo is not None:
            demo.close()
    finally:
        jobs.stop()


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only: localhost or a loopback
    address (127.0.0.0/8, ::1). Any other name, and 0.0.0.0, is the network."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _start_worker(jobs: BackgroundJobs, platform: Platform, inbox: Path | None) -> None:
    from carsearch.ingest.worker import IngestWorker

    if inbox is not None:
        inbox.mkdir(parents=True, exist_ok=True)
    worker = IngestWorker(platform, inbox=inbox)
    jobs.start("ingest-worker", worker.run_forever, worker.stop_event.set,
               worker.poll_interval)
    where = f", watching {inbox}" if inbox is not None else ""
    typer.echo(f"ingest worker running in this process{where}")


def _start_drift(jobs: BackgroundJobs, platform: Platform, every_s: float) -> None:
    from carsearch.monitoring.drift import run_drift
    from carsearch.platform.scheduler import run_every

    stop = threading.Event()

    def once() -> None:
        log.info("drift job: %s", run_drift(platform).summary())

    # The first run waits one interval: the page should come up before the job reads.
    jobs.start("drift-job", lambda state: run_every(once, every_s, stop=stop, state=state,
                                                    first_wait_s=every_s),
               stop.set, every_s)
    typer.echo(f"drift job running in this process every {every_s:g} s")


def _start_retrain(jobs: BackgroundJobs, platform: Platform, every_s: float) -> None:
    from carsearch.lifecycle.retrain import RetrainJob
    from carsearch.platform.scheduler import run_every

    stop = threading.Event()
    job = RetrainJob(platform)

    def once() -> None:
        rep = job.tick()
        for r in rep.ran:
            log.warning("retrain job: request %s %s: %s", r["request"], r["state"], r["reason"])

    jobs.start("retrain-job", lambda state: run_every(once, every_s, stop=stop, state=state),
               stop.set, every_s)
    typer.echo(f"retrain job running in this process every {every_s:g} s")
