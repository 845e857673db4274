"""`carsearch base build`: build the compact base model into a directory.

`--kind pretrained` (the default): the compact dual encoder on packaged pretrained
weights (ImageNet EfficientNet-Lite0, WordLlama token embeddings); `--kind siglip-random`:
the randomly initialised compact SigLIP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from carsearch.platform.errors import CarsearchError, ConfigError

app = typer.Typer(help="Build the compact base model.", no_args_is_help=True)

KINDS = ("pretrained", "siglip-random")


@app.callback()
def _base() -> None:
    """Build the compact base model."""


@app.command("build")
def build(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the model into.")],
    kind: Annotated[str, typer.Option(
        "--kind", help="pretrained (EfficientNet-Lite0 + WordLlama weights from pip "
        "packages) or siglip-random (a SigLIP from random weights).")] = "pretrained",
    seed: Annotated[int, typer.Option("--seed", help="Seed for the initialisation.")] = 0,
    image_size: Annotated[
        int, typer.Option("--image-size", min=0, help="Input image side in pixels "
                          "(default: 224 pretrained, 64 siglip-random).")
    ] = 0,
    patch_size: Annotated[
        int, typer.Option("--patch-size", min=1, help="Vision patch side in pixels.")
    ] = 16,
    text_layers: Annotated[
        int, typer.Option("--text-layers", min=-1, max=12, help="pretrained: transformer "
                          "layers on the text side (0: mean-pooled token embeddings and an "
                          "MLP; -1: the recipe's default).")
    ] = -1,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a non-empty directory.")
    ] = False,
) -> None:
    """Build the compact base (model, tokenizer, processor) with save_pretrained.

    With --force the files a build writes are overwritten; other files stay.
    """
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if out.exists() and not out.is_dir():
        raise CarsearchError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CarsearchError(f"{out} is not empty; pass --force to overwrite it")
    from carsearch.training.base_model import BUILD_INFO, build_compact_base

    try:
        if kind == "pretrained":
            from carsearch.training.pretrained_base import PretrainedSpec, build_pretrained_base

            chosen: dict[str, int] = {}
            if image_size:
                chosen["image_size"] = image_size
            if text_layers >= 0:
                chosen["text_layers"] = text_layers
            spec = PretrainedSpec(**chosen)
            build_pretrained_base(out, seed=seed, spec=spec)
        else:
            build_compact_base(out, seed=seed, image_size=image_size or 64,
                               patch_size=patch_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    info = json.loads((out / BUILD_INFO).read_text())
    typer.echo(f"built {out}")
    typer.echo(f"parameters: {info['parameters']:,}")
