"""`carsearch models`: the registry (publish, list, promote, roll back, retire, verify,
export to ONNX)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from carsearch.cli.context import collection_from, collection_option, echo_json, platform_from

if TYPE_CHECKING:
    from carsearch.platform.db import ModelVersion

models_app = typer.Typer(help="Model registry: publish, list, promote, roll back.",
                         no_args_is_help=True)


def _version_dict(v: ModelVersion) -> dict[str, Any]:
    return {
        "name": v.name,
        "status": v.status.value,
        "dim": v.dim,
        "collection": v.image_collection,
        "milvus_collection": v.collection,
        "base_model": v.base_model,
        "artifact_path": v.artifact_path,
        "artifact_sha256": v.artifact_sha256,
        "created_at": v.created_at,
        "promoted_at": v.promoted_at,
        "metrics": v.metrics,
    }


@models_app.command("publish")
def models_publish(
    ctx: typer.Context,
    artifact: Annotated[Path, typer.Argument(help="Model directory (save_pretrained layout).")],
    name: Annotated[str | None, typer.Option(help="Version name (default: dated).")] = None,
    base: Annotated[str, typer.Option(help="Base model it came from.")] = "",
    promote: Annotated[bool, typer.Option(help="Promote it to serving at once.")] = False,
    collection: Annotated[str | None, collection_option()] = None,
) -> None:
    """Copy a model directory into the registry as a candidate version for a collection."""
    p = platform_from(ctx)
    v = p.registry.publish(artifact, name=name, base_model=base,
                           collection=collection_from(p, collection))
    typer.echo(f"published {v.name} for {v.image_collection} (sha256 "
               f"{v.artifact_sha256[:12]}, dim {v.dim})")
    if promote:
        from carsearch.lifecycle.reindex import promote_with_backfill

        _, report = promote_with_backfill(p, v.name)
        typer.echo(f"{v.name} is serving (re-indexed {report.embedded} images)")


GiveUp = typer.Option(
    "--give-up-unreadable",
    help="Quarantine indexed images whose files cannot be read (instead of refusing).",
)


@models_app.command("list")
def models_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List model versions."""
    versions = platform_from(ctx).registry.list()
    if as_json:
        echo_json([_version_dict(v) for v in versions])
        return
    if not versions:
        typer.echo("no model versions")
    for v in versions:
        typer.echo(f"{v.name:40s} {v.status.value:9s} {v.image_collection:12s} dim={v.dim} "
                   f"{v.artifact_sha256[:12]}")


@models_app.command("promote")
def models_promote(
    ctx: typer.Context, name: str, give_up_unreadable: Annotated[bool, GiveUp] = False
) -> None:
    """Re-index every image into NAME's collection, then make NAME serve.

    The current version keeps serving until the new collection is complete; images whose
    files cannot be read refuse the switch (nothing is left behind) unless given up.
    """
    from carsearch.lifecycle.reindex import promote_with_backfill

    v, report = promote_with_backfill(platform_from(ctx), name,
                                      give_up_unreadable=give_up_unreadable)
    typer.echo(f"{v.name} is serving (re-indexed {report.embedded} images, "
               f"{report.already} already there, {report.unreadable} unreadable) for "
               f"{v.image_collection}")


@models_app.command("rollback")
def models_rollback(
    ctx: typer.Context, give_up_unreadable: Annotated[bool, GiveUp] = False,
    collection: Annotated[str | None, collection_option()] = None,
) -> None:
    """Serve again the version that served a collection before the current one.

    Images indexed since it last served are embedded into its collection first.
    """
    from carsearch.lifecycle.reindex import promote_with_backfill

    p = platform_from(ctx)
    previous = p.registry.previous(collection_from(p, collection))
    v, report = promote_with_backfill(p, previous.name,
                                      give_up_unreadable=give_up_unreadable)
    typer.echo(f"rolled back: {v.name} is serving (caught up {report.embedded} images)")


@models_app.command("retire")
def models_retire(
    ctx: typer.Context,
    name: str,
    drop: Annotated[bool, typer.Option(
        "--drop", help="Also drop its Milvus collection and saved exact index.")] = False,
) -> None:
    """Take a non-serving version out of service for good."""
    from carsearch.lifecycle.reindex import drop_version_data

    p = platform_from(ctx)
    v = p.registry.retire(name)
    typer.echo(f"{v.name} is retired")
    if drop:
        typer.echo(f"dropped {', '.join(drop_version_data(p, v)) or 'nothing (none left)'}")


@models_app.command("verify")
def models_verify(ctx: typer.Context, name: str) -> None:
    """Check a version's artifact against the hash recorded when it was published."""
    reg = platform_from(ctx).registry
    path = reg.verify(reg.get(name))
    typer.echo(f"{name}: artifact at {path} matches its recorded sha256")




@models_app.command("export")
def models_export(
    ctx: typer.Context,
    name: str,
    onnx: Annotated[Path, typer.Option("--onnx", help="Directory for the ONNX graphs.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Export a version's vision and text towers to ONNX (with the preprocessing config)
    and check them against PyTorch: max abs difference <= 1e-3, cosine >= 0.9999."""
    from carsearch.platform.artifacts import ArtifactLedger
    from carsearch.platform.errors import CarsearchError
    from carsearch.platform.models.onnx import MAX_ABS_DIFF, MIN_COSINE, Parity, export_onnx

    reg = platform_from(ctx).registry
    path = reg.verify(reg.get(name))
    manifest = export_onnx(path, onnx, ledger=ArtifactLedger(reg.db))
    parity = Parity(**manifest["parity"])
    if as_json:
        echo_json(manifest)
    else:
        typer.echo(f"{name}: vision.onnx and text.onnx in {onnx} (opset {manifest['opset']}, "
                   f"{manifest['dim']}-d)")
        typer.echo(f"parity with PyTorch: vision max |diff| {parity.vision_max_abs:.2e}, "
                   f"min cos {parity.vision_min_cos:.6f}; text max |diff| "
                   f"{parity.text_max_abs:.2e}, min cos {parity.text_min_cos:.6f}")
    if not parity.ok:
        raise CarsearchError(f"the export differs from PyTorch beyond max |diff| "
                             f"{MAX_ABS_DIFF} / cosine {MIN_COSINE}: do not deploy it")
