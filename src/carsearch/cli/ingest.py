"""`carsearch ingest` (run, once, manifest, enqueue, status, requeue) and `carsearch
reconcile`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from carsearch.cli.context import (
    HealthPort,
    collection_from,
    collection_option,
    echo_json,
    encoder_option,
    platform_from,
    serving_health,
    use_encoder,
)
from carsearch.cli.models import GiveUp

ingest_app = typer.Typer(help="Ingest images into Milvus and the database.",
                         no_args_is_help=True)


@ingest_app.command("manifest")
def ingest_manifest(
    ctx: typer.Context,
    manifest: Annotated[Path, typer.Argument(
        help="JSONL or CSV with a path or url column, or Unsplash Lite's photos.tsv*.")],
    source: Annotated[str, typer.Option(help="Source name recorded per image.")] = "manifest",
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 64,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Parallel downloads.")] = 4,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds per request.")] = 15.0,
    retries: Annotated[int, typer.Option(min=0, max=10, help="Retries per URL.")] = 3,
    max_bytes: Annotated[int, typer.Option(min=1, help="Largest download.")] = 20_000_000,
    retry_failed: Annotated[bool, typer.Option(
        help="Ask again for URLs that failed for good last time.")] = False,
    encoder: Annotated[str | None, encoder_option()] = None,
    collection: Annotated[str | None, collection_option()] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Embed the images a manifest lists with the collection's serving version and index
    them.

    Rows that give a URL are downloaded first (bounded concurrency, timeouts, retries
    with backoff, a size cap, content-type and decode checks) into the image store;
    nothing is fetched twice across runs (DATA_DIR/downloads.jsonl), and every row that
    could not be fetched is reported with its reason."""
    from carsearch.ingest.download import (
        Downloader,
        failures,
        is_url_manifest,
        read_url_manifest,
    )
    from carsearch.ingest.pipeline import IngestItem, ingest_items, platform_writer, read_manifest

    use_encoder(ctx, encoder)
    p = platform_from(ctx)
    name = collection_from(p, collection)
    version = p.registry.require_serving(name)
    download: dict[str, Any] | None = None
    if is_url_manifest(manifest):
        rows = read_url_manifest(manifest)
        got = Downloader(
            p.settings.image_dir, p.settings.data_dir / "downloads.jsonl",
            concurrency=concurrency, timeout_s=timeout, retries=retries,
            max_bytes=max_bytes, max_pixels=p.settings.max_image_pixels,
            allow_networks=p.settings.download.allow_networks,
        ).fetch_all([r.url for r in rows], retry_failed=retry_failed)
        items = [IngestItem(Path(str(got[r.url].path)), source=source, meta=r.meta)
                 for r in rows if got[r.url].status != "failed"]
        statuses = [f.status for f in got.values()]
        download = {s: statuses.count(s) for s in ("fetched", "cached", "failed")}
        download["failures"] = failures(rows, got)
    else:
        items = list(read_manifest(manifest, source))
    summary = ingest_items(
        items,
        db=p.db,
        writer=platform_writer(p, collection=name),
        max_pixels=p.settings.max_image_pixels,
        batch_size=batch_size,
        total=len(items),
    )
    if as_json:
        echo_json({**summary.to_dict(), **({"download": download} if download else {})})
    else:
        if download is not None:
            typer.echo(f"downloaded {download['fetched']}, already here {download['cached']}, "
                       f"failed {download['failed']}")
            for f in download["failures"]:
                typer.echo(f"  line {f['line']}: {f['url']}: {f['reason']}")
        typer.echo(
            f"indexed {summary.indexed}, quarantined {summary.quarantined} "
            f"of {summary.seen} into {name} ({version.collection})"
        )


@ingest_app.command("run")
def ingest_run(
    ctx: typer.Context,
    inbox: Annotated[Path | None, typer.Option(help="Watched folder of new images.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096)] = 32,
    poll: Annotated[float, typer.Option(help="Seconds between polls when idle.")] = 1.0,
    visibility_timeout: Annotated[float, typer.Option(help="Reclaim silent jobs after.")] = 60.0,
    health_port: Annotated[int, HealthPort] = 0,
    encoder: Annotated[str | None, encoder_option()] = None,
    collection: Annotated[str | None, collection_option()] = None,
) -> None:
    """Work continuously (inbox + queue) until SIGTERM or SIGINT. Queued jobs name their
    collection; the inbox's files go to --collection."""
    from carsearch.monitoring.health import Health

    use_encoder(ctx, encoder)
    worker = _worker(ctx, inbox, batch_size, poll, visibility_timeout, collection)
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
    encoder: Annotated[str | None, encoder_option()] = None,
    collection: Annotated[str | None, collection_option()] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Scan the inbox (into --collection), drain the queue, and exit. Inbox files still
    within the settle time (an image waiting for its sidecar) are waited for."""
    use_encoder(ctx, encoder)
    worker = _worker(ctx, inbox, batch_size, 1.0, visibility_timeout, collection)
    stats = worker.run_once()
    deadline = time.monotonic() + 2 * worker.p.settings.ingest.settle_s + 1.0
    while (worker.pause is None and worker.last_scan.waiting
           and time.monotonic() < deadline):
        time.sleep(min(worker.last_scan.next_due_s or 0.1, 5.0) + 0.05)
        stats = worker.run_once()
    paused = worker.pause.reason if worker.pause is not None else None
    if as_json:
        echo_json({"batches": stats.batches, "failed_batches": stats.failed_batches,
                   **stats.summary.to_dict(), "paused": paused})
    else:
        s = stats.summary
        typer.echo(f"indexed {s.indexed}, quarantined {s.quarantined}, "
                   f"failed batches {stats.failed_batches}")
        if paused:
            typer.echo(f"paused: {paused}")


def _worker(ctx: typer.Context, inbox: Path | None, batch_size: int, poll: float,
            visibility_timeout: float, collection: str | None = None) -> Any:
    from carsearch.ingest.worker import IngestWorker

    p = platform_from(ctx)
    return IngestWorker(p, inbox=inbox, batch_size=batch_size,
                        poll_interval=poll, visibility_timeout=visibility_timeout,
                        inbox_collection=collection_from(p, collection))


@ingest_app.command("enqueue")
def ingest_enqueue(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Image files to queue.")],
    source: Annotated[str, typer.Option()] = "queue",
    collection: Annotated[str | None, collection_option()] = None,
) -> None:
    """Queue image files as ingest jobs (what other systems do by inserting rows)."""
    from carsearch.platform.db import queue

    platform = platform_from(ctx)
    name = collection_from(platform, collection)
    ids = queue.enqueue(platform.db, [
        {"path": str(p.resolve()), "source": source, "meta": {}, "collection": name}
        for p in paths
    ])
    typer.echo(f"queued {len(ids)} jobs")


@ingest_app.command("status")
def ingest_status(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Queue counts, lag and throughput, and any worker that has paused claiming (with
    why: no serving version, the vector store or the image store unavailable)."""
    from carsearch.platform.db import queue
    from carsearch.platform.db.reports import loop_statuses

    db = platform_from(ctx).db
    st = queue.status(db)
    st["paused"] = [{"process": r["process"], "reason": r["paused"]}
                    for r in loop_statuses(db) if r["loop"] == "ingest-worker"
                    and r.get("paused") and r["state"] not in ("silent", "stopped", "dead")]
    if as_json:
        echo_json(st)
        return
    typer.echo(" ".join(f"{k}={st[k]}" for k in ("queued", "running", "done", "failed", "dead")))
    typer.echo(f"lag {st['lag_s']} s, throughput {st['throughput_per_s']}/s")
    if st["waiting"]:
        typer.echo(f"{st['waiting']} queued jobs wait for a lasting failure to clear")
    for p in st["paused"]:
        typer.echo(f"paused ({p['process']}): {p['reason']}")


@ingest_app.command("requeue")
def ingest_requeue(
    ctx: typer.Context,
    dead: Annotated[bool, typer.Option("--dead", help="Requeue the dead-lettered jobs.")] = False,
    since: Annotated[str | None, typer.Option(
        help="Only jobs that died at or after this ISO time (no offset: UTC).")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Bring jobs back to the queue with their attempts reset (the error each died with
    is logged and kept in its last_error, prefixed "requeued after:")."""
    from carsearch.cli.monitor import parse_since
    from carsearch.platform.db import queue
    from carsearch.platform.db.engine import as_utc
    from carsearch.platform.errors import ConfigError

    if not dead:
        raise ConfigError("say which jobs to requeue: --dead (the dead-lettered ones; "
                          "--since ISO narrows them)")
    start = as_utc(parse_since(since)) if since else None
    back = queue.requeue_dead(platform_from(ctx).db, start)
    if as_json:
        echo_json({"requeued": len(back), "jobs": [
            {"id": j.id, "attempts": j.attempts, "error": j.error} for j in back]})
        return
    typer.echo(f"requeued {len(back)} dead jobs")
    for j in back[:20]:
        typer.echo(f"  job {j.id} ({j.attempts} attempts): {j.error}")


def reconcile_command(
    ctx: typer.Context,
    version: Annotated[str | None, typer.Option(help="Version (default: serving).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Report only, repair nothing.")] = False,
    stale_after: Annotated[float, typer.Option(
        min=0, help="Seconds after which a pending row's batch counts as dead.")] = 3600.0,
    give_up_unreadable: Annotated[bool, GiveUp] = False,
    collection: Annotated[str | None, collection_option()] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Compare Milvus ids with the database and repair either side (one collection's
    serving version, or --version)."""
    from carsearch.lifecycle.reconcile import reconcile

    p = platform_from(ctx)
    v = p.registry.get(version) if version else None
    rep = reconcile(p, v, repair=not dry_run, stale_pending_s=stale_after,
                    give_up_unreadable=give_up_unreadable,
                    collection=collection_from(p, collection))
    if as_json:
        echo_json(rep.to_dict())
    else:
        typer.echo(
            f"{rep.version}: milvus {rep.milvus}, database {rep.database}, missing "
            f"{rep.missing} (re-embedded {rep.repaired_missing}, unreadable "
            f"{rep.unreadable}), orphans {rep.orphans} (removed {rep.removed_orphans}), "
            f"in flight {rep.pending - rep.stale_pending}, abandoned {rep.stale_pending}"
        )




@ingest_app.command("prune")
def ingest_prune(
    ctx: typer.Context,
    older_than_days: Annotated[float | None, typer.Option(
        help="Delete done rows older than this many days (default: "
        "CARSEARCH_INGEST__DONE_RETENTION_DAYS).")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Delete the queue's done rows older than the retention now (what the workers do
    every CARSEARCH_INGEST__PRUNE_INTERVAL_S; for a scheduled job where no worker runs).
    Queued, running, failed and dead rows are never deleted."""
    from datetime import timedelta

    from carsearch.platform.db import queue
    from carsearch.platform.errors import ConfigError

    p = platform_from(ctx)
    days = p.settings.ingest.done_retention_days if older_than_days is None else older_than_days
    if days <= 0:
        raise ConfigError("the retention is 0 (keep every done row): give --older-than-days "
                          "to prune anyway")
    gone = queue.prune_done(p.db, timedelta(days=days))
    if as_json:
        echo_json({"pruned": gone, "older_than_days": days})
        return
    typer.echo(f"pruned {gone} done jobs older than {days:g} days")
