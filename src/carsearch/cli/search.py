"""`carsearch search`: text or image in, hits out (filters read from the text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from carsearch.cli.context import echo_json, platform_from
from carsearch.platform.errors import ConfigError, QueryError


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

    from carsearch.platform.vectors.store import SearchFilters

    try:
        filters = SearchFilters(
            make=tuple(make or ()), body=tuple(body or ()), colour=tuple(colour or ()),
            year_min=year_min, year_max=year_max,
        )
    except ValidationError as exc:
        raise QueryError("bad filter: " + "; ".join(e["msg"] for e in exc.errors())) from None
    p = platform_from(ctx)
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
            from carsearch.platform.search.nlfilters import (
                load_vocabulary,
                merge_filters,
                parse_query,
            )

            parsed = parse_query(p.search.clean_query(query), load_vocabulary(p.db))
            filters = merge_filters(parsed.filters, filters)
            chips = ", ".join(c.label for c in parsed.chips)
        result = p.search.search_text(query, k, filters)
        if chips and not as_json:
            typer.echo(f"filters read from the query: {chips}")
    if as_json:
        echo_json(result.to_dict())
        return
    typer.echo(f"{len(result.hits)} hits in {result.latency_ms:.1f} ms ({result.version})")
    for h in result.hits:
        label = h.class_name or " ".join(str(x) for x in (h.make, h.model, h.year) if x)
        typer.echo(f"{h.rank:3d}. {h.score:+.3f}  {label or '-'}  {h.path}")
