"""`carsearch search`: text or image in, hits out (filters read from the text)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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
    exclude: Annotated[list[str] | None, typer.Option(
        "--not", "--exclude", metavar="FIELD=VALUE",
        help="Leave out vehicles with this value, never relaxed (repeatable): "
             "colour=red, make=Ford, body=pickup, source=..., year=2005 or year=2005-2009.",
    )] = None,
    image_id: Annotated[int | None, typer.Option(
        "--image-id", help="Image + text: start from this indexed image; the query's "
        "filters apply and its other words are mixed in (\"but blue\").")] = None,
    image_weight: Annotated[float | None, typer.Option(
        "--image-weight", help="The image's share of an image + text query (0-1).")] = None,
    cursor: Annotated[str | None, typer.Option(
        "--cursor", help="The next page: the cursor the previous page printed.")] = None,
    sort: Annotated[str, typer.Option(
        "--sort", metavar="score|year|arrival",
        help="Order of what passed: score (default), year (newest first) or arrival "
             "(latest ingested first), within exact matches and then relaxed ones.")] = "score",
    collapse_duplicates: Annotated[bool, typer.Option(
        "--collapse-duplicates", help="Fold near-duplicate images into one hit.")] = False,
    diversity: Annotated[float, typer.Option(
        "--diversity", help="0-1: re-rank the best matches by maximal marginal relevance, "
        "trading relevance for hits unlike those above them (0: off; with --sort score)."
    )] = 0.0,
    like: Annotated[list[int] | None, typer.Option(
        "--like", metavar="ID", help="An image id you liked: moves the query toward it "
        "(repeatable).")] = None,
    dislike: Annotated[list[int] | None, typer.Option(
        "--dislike", metavar="ID", help="An image id you disliked: moves the query away "
        "from it and leaves it out (repeatable).")] = None,
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
    options = _Options(exclude=parse_exclusions(exclude or []), image_id=image_id,
                       image_weight=image_weight, cursor=cursor, sort=sort,
                       collapse=collapse_duplicates, liked=tuple(like or ()),
                       disliked=tuple(dislike or ()), diversity=diversity)
    use_encoder(ctx, encoder)
    p = platform_from(ctx)
    name = collection_from(p, collection)
    if not interactive:  # the printed latency is the search's, not the model's load
        p.search.encoder_for(p.search.serving(name)).load()
    if image is not None and image_id is not None:
        raise ConfigError("give --image or --image-id, not both")
    if image is not None:
        from carsearch.platform.images import DECODE_MAX_SIDE, load_image

        picture = load_image(image, max_pixels=p.settings.max_image_pixels,
                             max_side=DECODE_MAX_SIDE)
        if query is None and options.plain():
            result = p.search.search_image(picture, k, filters, name)
        else:
            result = _text(p, query, k, filters, parse, min_prob, as_json, collection=name,
                           options=replace(options, image=picture))
    elif interactive:
        _interactive(p, k, filters, parse, min_prob, as_json, name, options)
        return
    elif query is None and image_id is None:
        raise ConfigError("give a query, --interactive, --image PATH or --image-id ID")
    else:
        result = _text(p, query, k, filters, parse, min_prob, as_json, collection=name,
                       options=options)
    if as_json:
        echo_json(result.to_dict())
        return
    _print_hits(result, filters)


@dataclass(frozen=True)
class _Options:
    """The search options beyond text, k and filters."""

    exclude: SearchFilters | None = None
    image_id: int | None = None
    image: Any = None
    image_weight: float | None = None
    cursor: str | None = None
    sort: str = "score"
    collapse: bool = False
    liked: tuple[int, ...] = ()
    disliked: tuple[int, ...] = ()
    diversity: float = 0.0

    def plain(self) -> bool:
        """Whether nothing beyond a plain image search was asked for."""
        return self == _Options(image=self.image)

    def request_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "exclude": self.exclude, "image_id": self.image_id, "image": self.image,
            "cursor": self.cursor, "sort": self.sort,
            "collapse_duplicates": self.collapse, "liked": self.liked,
            "disliked": self.disliked, "diversity": self.diversity,
        }
        if self.image_weight is not None:
            out["image_weight"] = self.image_weight
        return out


_EXCLUDABLE = ("make", "body", "colour", "source", "year")


def parse_exclusions(items: list[str]) -> SearchFilters | None:
    """``--not FIELD=VALUE`` options as the exclusions of a search (a QueryError for an
    unknown field or a bad value)."""
    from pydantic import ValidationError

    from carsearch.platform.vectors.filters import SearchFilters

    if not items:
        return None
    data: dict[str, Any] = {f: [] for f in _EXCLUDABLE if f != "year"}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip().lower(), value.strip()
        if name == "color":
            name = "colour"
        if not sep or name not in _EXCLUDABLE or not value:
            raise QueryError(f"--not takes FIELD=VALUE with FIELD one of "
                             f"{', '.join(_EXCLUDABLE)}, got {item!r}"[:200])
        if name != "year":
            data[name].append(value)
            continue
        if "year_min" in data:
            raise QueryError("--not year=... once: one year range can be excluded")
        lo, dash, hi = value.partition("-")
        try:
            data["year_min"] = int(lo) if lo.strip() else None
            data["year_max"] = (int(hi) if hi.strip() else None) if dash else data["year_min"]
        except ValueError:
            raise QueryError(f"--not year= takes a year or a range (2005-2009), "
                             f"got {value!r}"[:200]) from None
    try:
        return SearchFilters(**data)
    except ValidationError as exc:
        raise QueryError("bad exclusion: " + "; ".join(
            str(e["msg"]) for e in exc.errors())) from None


def _text(p: Platform, query: str | None, k: int, filters: SearchFilters, parse: bool,
          min_prob: float | None, as_json: bool,
          vocab: VocabularyCache | None = None, collection: str | None = None,
          options: _Options | None = None) -> SearchResult:
    """One query through the search service (filters and exclusions read from it unless
    --no-parse); the chips, exclusions and what was relaxed printed (unless --json)."""
    from carsearch.platform.search.service import SearchRequest

    extra = (options or _Options()).request_fields()
    result = p.search.search(SearchRequest(
        query, k, filters, parse=parse, min_prob=min_prob, collection=collection,
        vocabulary=vocab.get() if vocab is not None else None, **extra))
    if as_json:
        return result
    chips = ", ".join(c.label for c in result.chips)
    if chips:
        typer.echo(f"filters read from the query: {chips}")
    if result.exclusions:
        typer.echo("excluded (read from the query): "
                   + ", ".join(c.label.removeprefix("not ") for c in result.exclusions))
    if result.negative_terms:
        typer.echo("ranked away from: " + ", ".join(result.negative_terms))
    if result.relaxed:
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
        dups = (f"  (+{h.duplicates} near-duplicates: "
                f"{', '.join(str(i) for i in h.duplicate_ids[:5])}"
                f"{', ...' if h.duplicates > 5 else ''})" if h.duplicates else "")
        typer.echo(f"{h.rank:3d}. {h.score:+.3f}{prob}  {label or '-'}  {h.path}{unmet}"
                   f"{dups}  [id {h.image_id}]")
    if result.next_cursor:
        typer.echo(f"more: --cursor {result.next_cursor}")


def _interactive(p: Platform, k: int, filters: SearchFilters, parse: bool,
                 min_prob: float | None, as_json: bool, collection: str | None = None,
                 options: _Options | None = None) -> None:
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
            result = _text(p, line, k, filters, parse, min_prob, as_json, vocab, collection,
                           replace(options or _Options(), cursor=None))
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


def duplicates_command(
    ctx: typer.Context,
    collection: Annotated[str | None, collection_option()] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", min=0.0, max=1.0,
        help="Cosine at or above which two images are near-duplicates (default: the "
             "search's measured one).")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Groups printed.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Near-duplicate groups in a collection's serving index (exact cosine over every
    stored vector), largest first: how many images they hold and which one each keeps."""
    from carsearch.platform.db import images
    from carsearch.platform.search.duplicates import find_duplicates
    from carsearch.platform.search.service import DUPLICATE_COSINE

    p = platform_from(ctx)
    name = collection_from(p, collection)
    version = p.search.serving(name)
    cut = DUPLICATE_COSINE if threshold is None else threshold
    groups = find_duplicates(p.db, p.store, version.collection, cut)
    folded = sum(len(g.others) for g in groups)
    if as_json:
        echo_json({"collection": name, "model": version.name, "threshold": cut,
                   "groups": len(groups), "duplicates": folded,
                   "top": [{"keep": g.keep, "others": list(g.others), "size": g.size,
                            "min_cosine": g.min_cosine} for g in groups[:top]]})
        return
    typer.echo(f"{name} ({version.name}): {len(groups)} groups of near-duplicates "
               f"(cosine >= {cut:g}); {folded} images would fold into others")
    rows = images.by_ids(p.db, [g.keep for g in groups[:top]])
    for g in groups[:top]:
        row = rows.get(g.keep)
        where = row.path if row is not None else "-"
        typer.echo(f"  {g.size:4d} images  keep {g.keep} ({where})  "
                   f"min cosine {g.min_cosine:.3f}")
