"""`carsearch base build`: build the compact SigLIP base model into a directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from carsearch.platform.errors import CarsearchError, ConfigError

app = typer.Typer(help="Build the compact SigLIP base model.", no_args_is_help=True)


@app.callback()
def _base() -> None:
    """Build the compact SigLIP base model."""


@app.command("build")
def build(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the model into.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed for the initialisation.")] = 0,
    image_size: Annotated[
        int, typer.Option("--image-size", min=8, help="Input image side in pixels.")
    ] = 64,
    patch_size: Annotated[
        int, typer.Option("--patch-size", min=1, help="Vision patch side in pixels.")
    ] = 16,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty directory.")
    ] = False,
) -> None:
    """Build a randomly initialised compact SigLIP (model, tokenizer, processor).

    With --force the files a build writes are overwritten; other files stay.
    """
    if out.exists() and not out.is_dir():
        raise CarsearchError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CarsearchError(f"{out} is not empty; pass --force to overwrite it")
    from carsearch.training.base_model import BUILD_INFO, build_compact_base

    try:
        build_compact_base(out, seed=seed, image_size=image_size, patch_size=patch_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    info = json.loads((out / BUILD_INFO).read_text())
    typer.echo(f"built {out}")
    typer.echo(f"parameters: {info['parameters']:,}")
