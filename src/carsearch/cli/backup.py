"""`carsearch backup create|verify|restore`: back up a deployment, check a backup, restore it
into empty targets of either shape (the way to move from one machine to a cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from carsearch.cli.context import echo_json, settings_from

backup_app = typer.Typer(help="Backups: create, verify, restore (across shapes).",
                         no_args_is_help=True)


def _say(body: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        echo_json(body)
    else:
        for line in lines:
            typer.echo(line)


@backup_app.command("create")
def create_command(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="A new (or empty) folder.")],
    with_images: Annotated[bool, typer.Option(
        "--with-images", help="Copy the stored image files too (else their manifest only).")]
        = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Back up the database, every non-retired collection's vectors, the model folders and
    the image store's manifest (or files), with a manifest of counts and sha256."""
    from carsearch.backup.create import create_backup

    body = create_backup(settings_from(ctx), out, with_images=with_images,
                         progress=not as_json)
    cols = ", ".join(f"{k} ({v['rows']} rows, {v['status']})"
                     for k, v in body["collections"].items()) or "none"
    models = ", ".join(k for k, v in body["models"].items() if v["included"]) or "none"
    img = body["images"]
    _say({k: v for k, v in body.items() if k != "files"} | {"n_files": len(body["files"])},
         as_json, [
        f"backup written to {out} ({len(body['files'])} files, revision {body['revision']})",
        f"database ({body['source']['database']}): "
        + ", ".join(f"{t} {n}" for t, n in body["tables"].items()),
        f"collections: {cols}",
        f"models: {models}",
        f"images: {img['rows']} rows in the manifest, {img['stored']} stored, "
        f"{img['files']} files copied",
        f"guarantee: {body['guarantee']}",
    ])


@backup_app.command("verify")
def verify_command(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="The backup folder.")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check every file's sha256 and every count against the manifest."""
    from carsearch.backup.manifest import verify

    del ctx
    body = verify(folder)
    _say({"ok": True, "files": len(body["files"]), "tables": body["tables"]}, as_json,
         [f"ok: {len(body['files'])} files, {sum(body['tables'].values())} rows, "
          f"{len(body['collections'])} collections match the manifest"])


@backup_app.command("restore")
def restore_command(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="The backup folder.")],
    force: Annotated[bool, typer.Option(
        "--force", help="Replace what the targets hold (drops every Milvus collection and "
        "every database row there).")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Restore a backup into the database, Milvus and folders the settings name (empty
    targets of either shape), then check the ingest invariant."""
    from carsearch.backup.restore import restore_backup

    out = restore_backup(settings_from(ctx), folder, force=force, progress=not as_json)
    _say(out, as_json, [
        f"restored {folder} onto {out['target']['database']} + Milvus "
        f"{out['target']['milvus']} (revision {out['revision']})",
        "collections: " + (", ".join(f"{k} {v}" for k, v in out["collections"].items())
                           or "none"),
        "serving: " + (", ".join(f"{k}: {v}" for k, v in out["serving"].items()) or "none"),
    ])
