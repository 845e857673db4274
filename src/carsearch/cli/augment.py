"""`carsearch augment`: messy search queries for every labelled image, judged, as JSONL.

The lead registers it with `app.command("augment")(augment_command)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from carsearch.cli.context import settings_from
from carsearch.platform.errors import ConfigError

GENERATORS = ("offline", "ollama")
JUDGES = ("rules", "ollama")
SPLITS = ("train", "test", "all")


def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{option} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def augment_command(
    ctx: typer.Context,
    root: Annotated[Path, typer.Option("--root", help="Stanford Cars layout (or catalogue).")],
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write (resumed if present).")],
    generator: Annotated[str, typer.Option(help="offline (deterministic rules) or ollama.")] = (
        "offline"
    ),
    judge: Annotated[str, typer.Option(help="rules, or ollama (rules AND the LLM).")] = "rules",
    n: Annotated[int, typer.Option("--n", min=1, max=50, help="Candidates per image.")] = 5,
    split: Annotated[str, typer.Option(help="train, test or all.")] = "train",
    seed: Annotated[int, typer.Option(help="Seed of the offline generator.")] = 0,
    limit: Annotated[int, typer.Option(min=0, help="Only the first N images (0: all).")] = 0,
    ollama_host: Annotated[str, typer.Option(help="Default: CARSEARCH_OLLAMA_HOST.")] = "",
    ollama_model: Annotated[str, typer.Option(help="Default: CARSEARCH_OLLAMA_MODEL.")] = "",
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Ollama requests at once.")] = 4,
    timeout: Annotated[float, typer.Option(min=0.1, help="Ollama request timeout (s).")] = 120.0,
    retries: Annotated[int, typer.Option(min=0, max=10, help="Retries per Ollama request.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Write several messy search queries per labelled image, each judged against its label."""
    _choice(generator, GENERATORS, "--generator")
    _choice(judge, JUDGES, "--judge")
    _choice(split, SPLITS, "--split")
    settings = settings_from(ctx)
    host = ollama_host or settings.ollama_host
    model = ollama_model or settings.ollama_model
    from carsearch.data.augment import (
        Judge,
        OfflineGenerator,
        OllamaGenerator,
        OllamaJudge,
        QueryGenerator,
        RuleJudge,
        augment,
    )
    from carsearch.data.stanford import load_stanford

    dataset = load_stanford(root, split=None if split == "all" else split)
    images = dataset.images[:limit] if limit else dataset.images
    gen: QueryGenerator = (
        OfflineGenerator(seed=seed)
        if generator == "offline"
        else OllamaGenerator(host, model, timeout, retries, concurrency)
    )
    jdg: Judge = (
        RuleJudge() if judge == "rules"
        else OllamaJudge(host, model, timeout, retries, concurrency)
    )
    summary = augment(((im.image_id, im.label) for im in images), gen, jdg, out, n)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    typer.echo(f"wrote {out}")
    typer.echo(
        f"images: {summary.images_done} done, {summary.images_skipped} already there, "
        f"{summary.images_failed} failed"
    )
    typer.echo(f"queries: {summary.candidates} candidates, {summary.accepted} accepted "
               f"({summary.acceptance_rate:.1%}), {summary.queries_per_s:,.0f} queries/s")
    for reason, count in sorted(summary.rejected.items()):
        typer.echo(f"rejected {reason}: {count}")
