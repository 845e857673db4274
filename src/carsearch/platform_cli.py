"""CLI verbs for the platform core: db, models, ingest (manifest), search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from carsearch.cli_context import HealthPort, serving_health, settings_from
from carsearch.platform import migrate
from carsearch.platform.db import ModelVersion
from carsearch.platform.errors import ConfigError, QueryError
from carsearch.platform.runtime import Platform
from carsearch.platform.vectorstore import SearchFilters


def _platform(ctx: typer.Context) -> Platform:
    p = Platform(settings_from(ctx))
    ctx.call_on_close(p.close)
    return p


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# -- db ----------------------------------------------------------------------------------
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Migrate the database up to a revision (default: the newest)."""
    url = settings_from(ctx).database_url
    migrate.upgrade(url, revision)
    typer.echo(f"database at revision {migrate.current_revision(url)}")


@db_app.command("downgrade")
def db_downgrade(
    ctx: typer.Context, revision: Annotated[str, typer.Argument(help="Target, e.g. base.")]
) -> None:
    """Migrate the database down to a revision."""
    url = settings_from(ctx).database_url
    migrate.downgrade(url, revision)
    typer.echo(f"database at revision {migrate.current_revision(url) or 'base'}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Show the database's revision and the newest one."""
    url = settings_from(ctx).database_url
    typer.echo(f"current: {migrate.current_revision(url) or 'base'}")
    typer.echo(f"head:    {migrate.head_revision()}")


# -- models ------------------------------------------------------------------------------
models_app = typer.Typer(help="Model registry: publish, list, promote, roll back.",
                         no_args_is_help=True)


def _version_dict(v: ModelVersion) -> dict[str, Any]:
    return {
        "name": v.name,
        "status": v.status.value,
        "dim": v.dim,
        "collection": v.collection,
        "base_model": v.base_model,
        "artifact_path": v.artifact_path,
        "artifact_sha256": v.artifact_sha256,
        "created_at": v.created_at,
        "promoted_at": v.promoted_at,
        "metrics": v.metrics,
    }


@models_app.command("publish")
def models_publish(
    ctx: typer.Context,
    artifact: Annotated[Path, typer.Argument(help="Model directory (save_pretrained layout).")],
    name: Annotated[str | None, typer.Option(help="Version name (default: dated).")] = None,
    base: Annotated[str, typer.Option(help="Base model it came from.")] = "",
    promote: Annotated[bool, typer.Option(help="Promote it to serving at once.")] = False,
) -> None:
    """Copy a model directory into the registry as a candidate version."""
    p = _platform(ctx)
    v = p.registry.publish(artifact, name=name, base_model=base)
    typer.echo(f"published {v.name} (sha256 {v.artifact_sha256[:12]}, dim {v.dim})")
    if promote:
        from carsearch.ingest.reindex import promote_with_backfill

        _, report = promote_with_backfill(p, v.name)
        typer.echo(f"{v.name} is serving (re-indexed {report.embedded} images)")


GiveUp = typer.Option(
    "--give-up-unreadable",
    help="Quarantine indexed images whose files cannot be read (instead of refusing).",
)


@models_app.command("list")
def models_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List model versions."""
    versions = _platform(ctx).registry.list()
    if as_json:
        _echo_json([_version_dict(v) for v in versions])
        return
    if not versions:
        typer.echo("no model versions")
    for v in versions:
        typer.echo(f"{v.name:40s} {v.status.value:9s} dim={v.dim} {v.artifact_sha256[:12]}")


@models_app.command("promote")
def models_promote(
    ctx: typer.Context, name: str, give_up_unreadable: Annotated[bool, GiveUp] = False
) -> None:
    """Re-index every image into NAME's collection, then make NAME serve.

    The current version keeps serving until the new collection is complete; images whose
    files cannot be read refuse the switch (nothing is left behind) unless given up.
    """
    from carsearch.ingest.reindex import promote_with_backfill

    v, report = promote_with_backfill(_platform(ctx), name,
                                      give_up_unreadable=give_up_unreadable)
    typer.echo(f"{v.name} is serving (re-indexed {report.embedded} images, "
               f"{report.already} already there, {report.unreadable} unreadable)")


@models_app.command("rollback")
def models_rollback(
    ctx: typer.Context, give_up_unreadable: Annotated[bool, GiveUp] = False
) -> None:
    """Serve again the version that served before the current one.

    Images indexed since it last served are embedded into its collection first.
    """
    from carsearch.ingest.reindex import promote_with_backfill

    p = _platform(ctx)
    v, report = promote_with_backfill(p, p.registry.previous().name,
                                      give_up_unreadable=give_up_unreadable)
    typer.echo(f"rolled back: {v.name} is serving (caught up {report.embedded} images)")


@models_app.command("retire")
def models_retire(
    ctx: typer.Context,
    name: str,
    drop: Annotated[bool, typer.Option(
        "--drop", help="Also drop its Milvus collection and saved exact index.")] = False,
) -> None:
    """Take a non-serving version out of service for good."""
    from carsearch.ingest.reindex import drop_version_data

    p = _platform(ctx)
    v = p.registry.retire(name)
    typer.echo(f"{v.name} is retired")
    if drop:
        typer.echo(f"dropped {', '.join(drop_version_data(p, v)) or 'nothing (none left)'}")


@models_app.command("verify")
def models_verify(ctx: typer.Context, name: str) -> None:
    """Check a version's artifact against the hash recorded when it was published."""
    reg = _platform(ctx).registry
    path = reg.verify(reg.get(name))
    typer.echo(f"{name}: artifact at {path} matches its recorded sha256")


# -- ingest ------------------------------------------------------------------------------
ingest_app = typer.Typer(help="Ingest images into Milvus and the database.",
                         no_args_is_help=True)


@ingest_app.command("manifest")
def ingest_manifest(
    ctx: typer.Context,
    manifest: Annotated[Path, typer.Argument(help="JSONL or CSV with a path column.")],
    source: Annotated[str, typer.Option(help="Source name recorded per image.")] = "manifest",
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 64,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Embed the images a manifest lists with the serving version and index them."""
    from carsearch.ingest.pipeline import ingest_items, platform_writer, read_manifest

    p = _platform(ctx)
    version = p.registry.require_serving()
    items = list(read_manifest(manifest, source))
    summary = ingest_items(
        items,
        db=p.db,
        writer=platform_writer(p),
        max_pixels=p.settings.max_image_pixels,
        batch_size=batch_size,
        total=len(items),
    )
    if as_json:
        _echo_json(summary.to_dict())
    else:
        typer.echo(
            f"indexed {summary.indexed}, quarantined {summary.quarantined} "
            f"of {summary.seen} into {version.collection}"
        )


@ingest_app.command("run")
def ingest_run(
    ctx: typer.Context,
    inbox: Annotated[Path | None, typer.Option(help="Watched folder of new images.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 32,
    poll: Annotated[float, typer.Option(help="Seconds between polls when idle.")] = 1.0,
    visibility_timeout: Annotated[float, typer.Option(help="Reclaim silent jobs after.")] = 60.0,
    health_port: Annotated[int, HealthPort] = 0,
) -> None:
    """Work continuously (inbox + queue) until SIGTERM or SIGINT."""
    from carsearch.platform.health import Health

    worker = _worker(ctx, inbox, batch_size, poll, visibility_timeout)
    health = Health(worker.p, role="ingest")
    with serving_health(health, health_port, worker.p.settings.health_host):
        stats = worker.run_forever(health.loop("ingest-worker", poll))
    typer.echo(json.dumps(stats.summary.to_dict()))


@ingest_app.command("once")
def ingest_once(
    ctx: typer.Context,
    inbox: Annotated[Path | None, typer.Option(help="Watched folder of new images.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 32,
    visibility_timeout: Annotated[float, typer.Option(help="Reclaim silent jobs after.")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Scan the inbox, drain the queue, and exit."""
    stats = _worker(ctx, inbox, batch_size, 1.0, visibility_timeout).run_once()
    if as_json:
        _echo_json({"batches": stats.batches, "failed_batches": stats.failed_batches,
                    **stats.summary.to_dict()})
    else:
        s = stats.summary
        typer.echo(f"indexed {s.indexed}, quarantined {s.quarantined}, "
                   f"failed batches {stats.failed_batches}")


def _worker(ctx: typer.Context, inbox: Path | None, batch_size: int, poll: float,
            visibility_timeout: float) -> Any:
    from carsearch.ingest.worker import IngestWorker

    return IngestWorker(_platform(ctx), inbox=inbox, batch_size=batch_size,
                        poll_interval=poll, visibility_timeout=visibility_timeout)


@ingest_app.command("enqueue")
def ingest_enqueue(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Image files to queue.")],
    source: Annotated[str, typer.Option()] = "queue",
) -> None:
    """Queue image files as ingest jobs (what other systems do by inserting rows)."""
    from carsearch.ingest import queue

    ids = queue.enqueue(_platform(ctx).db, [
        {"path": str(p.resolve()), "source": source, "meta": {}} for p in paths
    ])
    typer.echo(f"queued {len(ids)} jobs")


@ingest_app.command("status")
def ingest_status(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Queue counts, lag and throughput."""
    from carsearch.ingest import queue

    st = queue.status(_platform(ctx).db)
    if as_json:
        _echo_json(st)
        return
    typer.echo(" ".join(f"{k}={st[k]}" for k in ("queued", "running", "done", "failed", "dead")))
    typer.echo(f"lag {st['lag_s']} s, throughput {st['throughput_per_s']}/s")


def reconcile_command(
    ctx: typer.Context,
    version: Annotated[str | None, typer.Option(help="Version (default: serving).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Report only, repair nothing.")] = False,
    stale_after: Annotated[float, typer.Option(
        min=0, help="Seconds after which a pending row's batch counts as dead.")] = 3600.0,
    give_up_unreadable: Annotated[bool, GiveUp] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Compare Milvus ids with the database and repair either side."""
    from carsearch.ingest.reindex import reconcile

    p = _platform(ctx)
    v = p.registry.get(version) if version else None
    rep = reconcile(p, v, repair=not dry_run, stale_pending_s=stale_after,
                    give_up_unreadable=give_up_unreadable)
    if as_json:
        _echo_json(rep.to_dict())
    else:
        typer.echo(
            f"{rep.version}: milvus {rep.milvus}, database {rep.database}, missing "
            f"{rep.missing} (re-embedded {rep.repaired_missing}, unreadable "
            f"{rep.unreadable}), orphans {rep.orphans} (removed {rep.removed_orphans}), "
            f"in flight {rep.pending - rep.stale_pending}, abandoned {rep.stale_pending}"
        )


# -- search ------------------------------------------------------------------------------
def search_command(
    ctx: typer.Context,
    query: Annotated[str | None, typer.Argument(help="What to look for.")] = None,
    k: Annotated[int, typer.Option("--k", help="How many hits.")] = 10,
    image: Annotated[Path | None, typer.Option(help="Search by an image instead.")] = None,
    make: Annotated[list[str] | None, typer.Option(help="Only this make (repeatable).")] = None,
    body: Annotated[list[str] | None, typer.Option(help="Body category: pickup, suv, ...")] = None,
    colour: Annotated[list[str] | None, typer.Option(help="Only this colour.")] = None,
    year_min: Annotated[int | None, typer.Option(help="Earliest model year.")] = None,
    year_max: Annotated[int | None, typer.Option(help="Latest model year.")] = None,
    parse: Annotated[bool, typer.Option(
        "--parse/--no-parse",
        help="Read filters from the query text (colour, make, body, year), as the page does.",
    )] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Search the serving version by text (or --image) and print the hits.

    "red 2012 chevy pickup" also filters on colour, year, make and body where those values
    exist in the index (--no-parse: vector similarity alone); options override them.
    """
    from pydantic import ValidationError

    try:
        filters = SearchFilters(
            make=tuple(make or ()), body=tuple(body or ()), colour=tuple(colour or ()),
            year_min=year_min, year_max=year_max,
        )
    except ValidationError as exc:
        raise QueryError("bad filter: " + "; ".join(e["msg"] for e in exc.errors())) from None
    p = _platform(ctx)
    if image is not None:
        from carsearch.platform.images import load_image

        result = p.search.search_image(
            load_image(image, max_pixels=p.settings.max_image_pixels), k, filters
        )
    elif query is None:
        raise ConfigError("give a query, or --image PATH")
    else:
        chips = ""
        if parse:
            from carsearch.platform.nlfilters import load_vocabulary, merge_filters, parse_query

            parsed = parse_query(p.search.clean_query(query), load_vocabulary(p.db))
            filters = merge_filters(parsed.filters, filters)
            chips = ", ".join(c.label for c in parsed.chips)
        result = p.search.search_text(query, k, filters)
        if chips and not as_json:
            typer.echo(f"filters read from the query: {chips}")
    if as_json:
        _echo_json(result.to_dict())
        return
    typer.echo(f"{len(result.hits)} hits in {result.latency_ms:.1f} ms ({result.version})")
    for h in result.hits:
        label = h.class_name or " ".join(str(x) for x in (h.make, h.model, h.year) if x)
        typer.echo(f"{h.rank:3d}. {h.score:+.3f}  {label or '-'}  {h.path}")
