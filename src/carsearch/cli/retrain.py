"""`carsearch retrain`: ask for a retrain, run the retrain job, list and retry requests."""

from __future__ import annotations

import getpass
from typing import Annotated, Any

import typer

from carsearch.cli.context import echo_json, once_or_every, platform_from

retrain_app = typer.Typer(help="The retrain job: labelled images and feedback into a "
                          "candidate, promoted only when at least as good.",
                          no_args_is_help=True)


def _line(r: dict[str, Any]) -> str:
    made = f", version {r['version']}" if r["version"] else ""
    return (f"request {r['id']}: {r['state']} ({r['requested_by']}{made}): "
            f"{r['reason'] or ''}")


@retrain_app.command("request")
def retrain_request(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ask for a retrain now (on everything labelled so far). Only the database is
    touched: the retrain job (`carsearch retrain run`, or `serve --retrain-every`) runs
    it; an open request is reused rather than doubled."""
    from carsearch.platform.db import retrains

    p = platform_from(ctx)
    rid, made = retrains.by_person(p.db, "vehicles", f"{getpass.getuser()} (cli)")
    row = retrains.get(p.db, rid) or {}
    if as_json:
        echo_json({"made": made, **row})
        return
    typer.echo(("asked: " if made else "already asked: ") + _line(row))


@retrain_app.command("run")
def retrain_run(
    ctx: typer.Context,
    request: Annotated[int | None, typer.Option(help="Only this request (when it is "
                                                "ready).")] = None,
    every: Annotated[float | None, typer.Option(min=1.0, help="Check every SECONDS until "
                                                "stopped (default: once).")] = None,
    health_port: Annotated[int | None, typer.Option(help="With --every: /healthz and "
                                                    "/metrics on this port.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the retrain job here: declare dead runs interrupted, make fully labelled
    requests ready, train / evaluate / promote the ready ones. With Milvus Lite, run it in
    the process that holds the file (`serve --retrain-every`); this command then only
    works while no page is serving."""
    from carsearch.lifecycle.retrain import RetrainJob

    p = platform_from(ctx)
    job = RetrainJob(p, progress=not as_json and every is None)

    def once() -> None:
        p.store  # noqa: B018  (open the store first: a held Lite file fails before training)
        rep = job.tick(request_id=request)
        if as_json:
            echo_json(rep.to_dict())
            return
        for n in rep.interrupted:
            typer.echo(f"request {n}: interrupted (its process stopped; "
                       f"`carsearch retrain retry {n}` runs it again)")
        for n in rep.ready:
            typer.echo(f"request {n}: ready (every labelling task is done)")
        for r in rep.ran:
            typer.echo(f"request {r['request']}: {r['state']}: {r['reason']}")
        if not rep.ran:
            typer.echo("no ready retrain request")

    once_or_every(p, once, every, name="retrain", health_port=health_port)


@retrain_app.command("list")
def retrain_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, help="The newest N.")] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Retrain requests, newest first, with their state and why."""
    from carsearch.platform.db import retrains

    rows = retrains.listing(platform_from(ctx).db, limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        typer.echo("no retrain requests")
    for r in rows:
        typer.echo(_line(r))


@retrain_app.command("retry")
def retrain_retry(
    ctx: typer.Context,
    request: Annotated[int, typer.Argument(help="A failed, interrupted or candidate "
                                           "request.")],
) -> None:
    """Make an ended request ready again (the job runs it on its next check)."""
    from carsearch.platform.db import retrains
    from carsearch.platform.errors import ConfigError

    db = platform_from(ctx).db
    try:
        retrains.retry(db, request)
    except (LookupError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    typer.echo(_line(retrains.get(db, request) or {}))
