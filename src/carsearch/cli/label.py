"""`carsearch label`: the labelling queue (list, export, import)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from carsearch.cli.context import echo_json, platform_from

label_app = typer.Typer(help="Labelling tasks from drift: export, fill in, import.",
                        no_args_is_help=True)


@label_app.command("list")
def label_list(
    ctx: typer.Context,
    every: Annotated[bool, typer.Option("--all", help="Done tasks too.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The labelling tasks (open ones unless --all) with their progress."""
    from carsearch.platform.db import labels

    found = labels.tasks(platform_from(ctx).db, None if every else "open")
    if as_json:
        echo_json([{k: v for k, v in t.items() if k != "unlabelled_ids"} for t in found])
        return
    if not found:
        typer.echo("no labelling tasks" if every else "no open labelling tasks")
    for t in found:
        typer.echo(f"task {t['id']}: {t['state']}, {t['labelled']}/{t['size']} labelled, "
                   f"drift report {t['drift_report_id']}, nearest "
                   f"{t['nearest_class'] or '?'}")


@label_app.command("create")
def label_create(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(help="Only images ingested from this ISO "
                                              "time on.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most N images, "
                                       "newest first.")] = 500,
) -> None:
    """A labelling task by hand: the indexed vehicle images nobody labelled (no make) and
    no task holds yet, for when a person sees new vehicles the drift job did not flag."""
    from datetime import datetime

    from carsearch.platform.db import as_utc, images, labels
    from carsearch.platform.errors import ConfigError

    p = platform_from(ctx)
    try:
        start = as_utc(datetime.fromisoformat(since)) if since else None
    except ValueError:
        raise ConfigError(f"--since must be an ISO time, not {since!r}") from None
    ids = images.unlabelled_ids(p.db, "vehicles", since=start, limit=limit)
    made = labels.create_tasks(p.db, None, "vehicles",
                               [labels.NewTask(ids, None, {})]) if ids else []
    if not made:
        typer.echo("no unlabelled images outside a task: no task made")
        return
    (task,) = [t for t in labels.tasks(p.db) if t["id"] == made[0]]
    typer.echo(f"task {task['id']}: {task['size']} unlabelled image(s); "
               "`carsearch label export --out todo.csv` to label them")


@label_app.command("export")
def label_export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="FILE.csv or FILE.jsonl to write.")],
    task: Annotated[list[int] | None, typer.Option(help="Only this task (repeatable).")] = None,
) -> None:
    """Write the images of the open tasks still to label, one row each, with a thumbnail,
    the cluster, the nearest known class and a suggested label; fill in make, model,
    year, body_type and colour, then `carsearch label import FILE`."""
    from carsearch.lifecycle.labelling import export_rows, write_rows
    from carsearch.platform.thumbnails import ThumbnailCache

    p = platform_from(ctx)
    thumbs = ThumbnailCache.for_settings(p.settings)
    rows = export_rows(p, lambda iid, path: str(thumbs.get(iid, path)), task)
    write_rows(rows, out)
    typer.echo(f"wrote {len(rows)} image(s) to label to {out}")


@label_app.command("import")
def label_import(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The filled-in CSV or JSONL.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check every row (known body types and colours, years in range, text within its
    limits) and apply them all to the database and Milvus, or none: each bad row is
    reported with its line and reason (exit 2)."""
    from carsearch.lifecycle.labelling import LabelImportError, import_labels

    try:
        report = import_labels(platform_from(ctx), path)
    except LabelImportError as exc:
        for problem in exc.problems:
            typer.echo(f"rejected: {problem}", err=True)
        raise
    if as_json:
        echo_json(report.to_dict())
        return
    typer.echo(f"applied {report.applied} of {report.rows} row(s) ({report.skipped_empty} "
               f"left empty); tasks done: {', '.join(map(str, report.tasks_done)) or 'none'}")
