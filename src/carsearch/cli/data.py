"""`carsearch data ...`: inspect a Stanford Cars layout, render the catalogue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from carsearch.cli.context import settings_from

app = typer.Typer(
    help="Data sets: inspect Stanford Cars layouts, render the catalogue.",
    no_args_is_help=True,
)


def _max_pixels(ctx: typer.Context) -> int:
    return settings_from(ctx).max_image_pixels


def _text_summary(s: dict[str, Any]) -> list[str]:
    lines = [
        f"root: {s['root']}",
        f"images: {s['images']} usable of {s['annotations']} annotated",
        f"classes: {s['classes']} ({s['makes']} makes)",
        f"split: {s['split_source']}",
        "splits: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()),
        f"classes in both splits: {s['classes_in_both_splits']}",
        "body categories: " + ", ".join(f"{k} {v}" for k, v in s["body_categories"].items()),
    ]
    if s["colours"]:
        lines.append("colours: " + ", ".join(f"{k} {v}" for k, v in s["colours"].items()))
    if s["converted_to_rgb"]:
        lines.append(
            "converted to RGB: " + ", ".join(f"{k} {v}" for k, v in s["converted_to_rgb"].items())
        )
    lines.append(
        f"quarantined: {len(s['quarantined'])}" + ("" if s["scanned"] else " (not scanned)")
    )
    lines.extend(f"  {q['path']}: {q['reason']}" for q in s["quarantined"])
    if "devkit" in s:
        d = s["devkit"]
        lines.append(
            f"devkit-original: {d['classes']} classes, {d['train_annotations']} train "
            f"annotations, {d['unlabelled_test']} unlabelled test annotations"
        )
    return lines


@app.command()
def inspect(
    ctx: typer.Context,
    root: Annotated[Path, typer.Option(help="Data set root (Stanford Cars layout).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    scan: Annotated[
        bool, typer.Option(help="Decode every image, quarantining unreadable ones.")
    ] = True,
) -> None:
    """Count images, classes and splits; list quarantined files with reasons."""
    from carsearch.data.stanford import load_stanford, read_devkit

    ds = load_stanford(root, max_pixels=_max_pixels(ctx))
    if scan:
        ds.scan(progress=not as_json)
    summary = ds.summary()
    devkit = root / "devkit-original"
    if (devkit / "cars_meta.mat").is_file():
        kit = read_devkit(devkit)
        summary["devkit"] = {
            "classes": len(kit.class_names),
            "train_annotations": len(kit.train),
            "unlabelled_test": len(kit.test_unlabelled),
        }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for line in _text_summary(summary):
            typer.echo(line)


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Directory to write the catalogue into.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives identical files.")] = 0,
    width: Annotated[int | None, typer.Option(
        help="Image width in pixels (default: the catalogue's, 320).")] = None,
    height: Annotated[int | None, typer.Option(
        help="Image height in pixels (default: the catalogue's, 240).")] = None,
    force: Annotated[bool, typer.Option(help="Replace a catalogue already in --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Render a labelled vehicle catalogue in the Stanford Cars layout."""
    from carsearch.data.catalogue import DEFAULT_SIZE, write_catalogue

    size = (width or DEFAULT_SIZE[0], height or DEFAULT_SIZE[1])
    report = write_catalogue(out, n, seed=seed, size=size, force=force, progress=not as_json)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "out": str(report.out),
                    "images": report.images,
                    "classes": report.classes,
                    "seed": report.seed,
                    "seconds": round(report.seconds, 3),
                    "images_per_s": round(report.images_per_s, 1),
                }
            )
        )
    else:
        typer.echo(
            f"rendered {report.images} images of {report.classes} classes into {report.out} "
            f"in {report.seconds:.1f} s ({report.images_per_s:.0f} images/s)"
        )


@app.command()
def novel(
    out: Annotated[Path, typer.Option(help="Folder to write the photos into (an inbox).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of photos.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives identical files.")] = 0,
    colour: Annotated[list[str] | None, typer.Option(help="Paint (repeatable; default: "
                                                     "every colour in turn).")] = None,
) -> None:
    """Render unlabelled photos of a vehicle the catalogue lacks (the Zephyr Aero coupe):
    dropped into an inbox, they are what the drift job finds as an unrecognised vehicle."""
    from carsearch.data.catalogue import NOVEL, write_vehicles
    from carsearch.platform.errors import ConfigError
    from carsearch.platform.vehicles import COLOURS

    bad = [c for c in colour or [] if c not in COLOURS]
    if bad:
        raise ConfigError(f"unknown colour {bad[0]!r} (one of {', '.join(COLOURS)})")
    paths = write_vehicles(out, NOVEL, n, seed=seed, colours=tuple(colour or ()))
    typer.echo(f"rendered {len(paths)} photos of a {NOVEL.class_name} into {out}")
