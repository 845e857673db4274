"""`carsearch collections`: the image collections side by side (create, list)."""

from __future__ import annotations

from typing import Annotated

import typer

from carsearch.cli.context import echo_json, platform_from

collections_app = typer.Typer(help="Image collections: vehicles, photos, ...",
                              no_args_is_help=True)


@collections_app.command("create")
def collections_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Lower-case name, e.g. photos.")],
    kind: Annotated[str, typer.Option(
        help="vehicles (make, model, year, body, colour; filters read from the query) or "
             "general (description, photographer; a source filter).")] = "general",
    description: Annotated[str | None, typer.Option(help="What it holds.")] = None,
) -> None:
    """Make a collection (nothing changes when it exists with the same kind). It needs a
    serving model version of its own: `carsearch models publish DIR --collection NAME
    --promote`."""
    from carsearch.platform import collections

    c = collections.create(platform_from(ctx).db, name, kind, description)
    typer.echo(f"collection {c.name} ({c.kind})")


@collections_app.command("list")
def collections_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Every collection with its kind, image counts and serving version."""
    from carsearch.platform import collections
    from carsearch.platform.db import images

    p = platform_from(ctx)
    rows = []
    for c in collections.list_all(p.db):
        serving = p.registry.serving(c.name)
        rows.append({"name": c.name, "kind": c.kind, "description": c.description,
                     "images": images.counts_by_status(p.db, c.name),
                     "serving": serving.name if serving else None})
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        typer.echo(f"{r['name']:16s} {r['kind']:9s} indexed {r['images']['indexed']:6d}  "
                   f"serving {r['serving'] or '-'}")
