"""`carsearch search`: text or image in, hits out (filters read from the text)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from carsearch.cli.context import (
    collection_from,
    collection_option,
    echo_json,
    encoder_option,
    platform_from,
    use_encoder,
)
from carsearch.platform.errors import ConfigError, QueryError

if TYPE_CHECKING:
    from carsearch.platform.runtime import Platform
    from carsearch.platform.search.nlfilters import VocabularyCache
    from carsearch.platform.search.service import SearchResult
    from carsearch.platform.vectors.filters import SearchFilters


def search_command(
    ctx: typer.Context,
    query: Annotated[str | None, typer.Argument(help="What to look for.")] = None,
    k: Annotated[int, typer.Option("--k", help="How many hits.")] = 10,
    image: Annotated[Path | None, typer.Option(help="Search by an image instead.")] = None,
    make: Annotated[list[str] | None, typer.Option(help="Only this make (repeatable).")] = None,
    body: Annotated[list[str] | None, typer.Option(help="Body category: pickup, suv, ...")] = None,
    colour: Annotated[list[str] | None, typer.Option(help="Only this colour.")] = None,
    source: Annotated[list[str] | None, typer.Option(help="Only this source.")] = None,
    year_min: Annotated[int | None, typer.Option(help="Earliest model year.")] = None,
    year_max: Annotated[int | None, typer.Option(help="Latest model year.")] = None,
    parse: Annotated[bool, typer.Option(
        "--parse/--no-parse",
        help="Read filters from the query text (colour, make, body, year), as the page does.",
    )] = True,
    min_prob: Annotated[float | None, typer.Option(
        "--min-prob", help="Drop text hits whose model probability is lower (0-1); "
        "its calibration per version: carsearch evaluate.",
    )] = None,
    interactive: Annotated[bool, typer.Option(
        "--interactive", "-i",
        help="Keep the model loaded and answer queries typed at a prompt until Ctrl-D.",
    )] = False,
    encoder: Annotated[str | None, encoder_option()] = None,
    collection: Annotated[str | None, collection_option()] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Search a collection's serving version by text (or --image) and print the hits.

    "red 2012 chevy pickup" also filters on colour, year, make and body where those values
    exist in the index (--no-parse: vector similarity alone); options override them.
    Filters read from the text are relaxed, the least certain first, when fewer than
    --k vehicles meet them (the output says what was relaxed); options are never relaxed.
    A general collection (photos) reads no vehicle filters and filters on --source only.
    """
    from pydantic import ValidationError

    from carsearch.platform.vectors.filters import SearchFilters

    try:
        filters = SearchFilters(
            make=tuple(make or ()), body=tuple(body or ()), colour=tuple(colour or ()),
            source=tuple(source or ()), year_min=year_min, year_max=year_max,
        )
    except ValidationError as exc:
        raise QueryError("bad filter: " + "; ".join(e["msg"] for e in exc.errors())) from None
    use_encoder(ctx, encoder)
    p = platform_from(ctx)
    name = collection_from(p, collection)
    if not interactive:  # the printed latency is the search's, not the model's load
        p.search.encoder_for(p.search.serving(name)).load()
    if image is not None:
        from carsearch.platform.images import DECODE_MAX_SIDE, load_image

        result = p.search.search_image(
            load_image(image, max_pixels=p.settings.max_image_pixels,
                       max_side=DECODE_MAX_SIDE), k, filters, name
        )
    elif interactive:
        _interactive(p, k, filters, parse, min_prob, as_json, name)
        return
    elif query is None:
        raise ConfigError("give a query, --interactive, or --image PATH")
    else:
        result = _text(p, query, k, filters, parse, min_prob, as_json, collection=name)
    if as_json:
        echo_json(result.to_dict())
        return
    _print_hits(result, filters)


def _text(p: Platform, query: str, k: int, filters: SearchFilters, parse: bool,
          min_prob: float | None, as_json: bool,
          vocab: VocabularyCache | None = None, collection: str | None = None) -> SearchResult:
    """One text query through the search service (filters read from it unless
    --no-parse); the chips and what was relaxed printed (unless --json)."""
    from carsearch.platform.search.service import SearchRequest

    result = p.search.search(SearchRequest(
        query, k, filters, parse=parse, min_prob=min_prob, collection=collection,
        vocabulary=vocab.get() if vocab is not None else None))
    chips = ", ".join(c.label for c in result.chips)
    if chips and not as_json:
        typer.echo(f"filters read from the query: {chips}")
    if result.relaxed and not as_json:
        typer.echo(f"relaxed: {result.relaxed}")
    return result


def _print_hits(result: SearchResult, filters: SearchFilters) -> None:
    from carsearch.platform.vectors.filters import SearchFilters

    typer.echo(f"{len(result.hits)} hits in {result.latency_ms:.1f} ms ({result.collection}, "
               f"{result.version})")
    if not result.hits and filters != SearchFilters():
        typer.echo("nothing matched the filters you gave: widen them")
    for h in result.hits:
        label = (h.class_name or " ".join(str(x) for x in (h.make, h.model, h.year) if x)
                 or (h.description or "")[:60])
        if h.photographer:
            label = f"{label}  by {h.photographer}"
        unmet = f"  (not {', '.join(h.unmet)})" if h.unmet else ""
        prob = f"  p={h.probability:.3f}" if h.probability is not None else ""
        typer.echo(f"{h.rank:3d}. {h.score:+.3f}{prob}  {label or '-'}  {h.path}{unmet}")


def _interactive(p: Platform, k: int, filters: SearchFilters, parse: bool,
                 min_prob: float | None, as_json: bool, collection: str | None = None) -> None:
    """Queries from a prompt (or piped lines) until end of input: the encoder and the
    vocabulary stay loaded, so each answer costs only the search. A query the service
    refuses gets its message and the prompt comes back."""
    from carsearch.platform.errors import CarsearchError
    from carsearch.platform.search.nlfilters import VocabularyCache

    p.search.warm()
    vocab = VocabularyCache(p.db)  # re-read at most once a minute
    prompt = "search> " if sys.stdin.isatty() else ""
    typer.echo(f"{p.search.collection(collection)}: model {p.search.serving(collection).name}; "
               "type a query, Ctrl-D to stop", err=True)
    while True:
        try:
            line = input(prompt)
        except EOFError:
            typer.echo("", err=True)
            return
        except KeyboardInterrupt:  # Ctrl-C drops the line, as a shell does
            typer.echo("", err=True)
            continue
        if not line.strip():
            continue
        try:
            result = _text(p, line, k, filters, parse, min_prob, as_json, vocab, collection)
        except CarsearchError as exc:
            typer.echo(f"error: {exc}", err=True)
            continue
        if as_json:
            typer.echo(json.dumps(result.to_dict(), default=str))  # one line per answer
        else:
            _print_hits(result, filters)


def classify_command(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(help="Image files to classify.")],
    labels: Annotated[str, typer.Option(help='Comma-separated labels: "sedan,pickup,suv".')],
    template: Annotated[str, typer.Option(
        help="Prompt for each label; {} is the label.")] = "a photo of a {}.",
    top: Annotated[int, typer.Option(min=1, help="Labels shown per image.")] = 5,
    collection: Annotated[str | None, collection_option()] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Zero-shot classification with the version serving a collection (default: vehicles,
    or the only one): each label's own probability,
    sigmoid(exp(logit_scale) * cos + logit_bias), independent of the other labels (they
    need not sum to one). An unreadable image is reported and the others go on (exit 1)."""
    from carsearch.platform.errors import ImageRejectedError
    from carsearch.platform.images import DECODE_MAX_SIDE, load_image
    from carsearch.platform.search.classify import check_template, parse_labels

    names = parse_labels(labels)
    check_template(template)
    p = platform_from(ctx)
    loaded, failed = [], []
    for path in images:
        try:
            loaded.append((path, load_image(path, max_pixels=p.settings.max_image_pixels,
                                            max_side=DECODE_MAX_SIDE)))
        except ImageRejectedError as exc:
            failed.append({"image": str(path), "error": exc.reason})
    name = collection_from(p, collection)
    scores = (p.search.classify([im for _, im in loaded], names, template, name)
              if loaded else [])
    results = [{"image": str(path), "labels": [s.to_dict() for s in row]}
               for (path, _), row in zip(loaded, scores, strict=True)]
    if as_json:
        echo_json({"collection": name, "model": p.search.serving(name).name,
                   "template": template, "results": results, "rejected": failed})
    else:
        for r in results:
            typer.echo(r["image"])
            for s in r["labels"][:top]:
                typer.echo(f"  {s['probability']:.3f}  {s['label']}")
        for f in failed:
            typer.echo(f"{f['image']}: rejected: {f['error']}", err=True)
    if failed:
        raise typer.Exit(1)
