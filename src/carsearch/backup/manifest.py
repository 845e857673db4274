"""The backup folder's manifest: what it holds, how many rows, and the sha256 of every file.

Layout of a backup folder::

    manifest.json                 format, created_at, source shape, counts, files + sha256
    db/<table>.jsonl              every row of every table (portable, typed JSON lines)
    db/carsearch.sqlite           SQLite only: the online-backup API's copy of the file
    vectors/<collection>.npz      ids, vectors and scalar fields of one Milvus collection
    models/<version>/...          the registry's folder of every version that has one
    images/manifest.jsonl         the image store: id, collection, sha256, stored file
    images/files/<ab>/<sha>.<ext> the stored files themselves (only with --with-images)
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from carsearch.platform.errors import CarsearchError

FORMAT = "carsearch-backup/1"
MANIFEST = "manifest.json"


class BackupError(CarsearchError):
    """A backup that cannot be taken, verified or restored as asked."""


def sha256_of(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but the manifest, by relative path."""
    skip = {root / MANIFEST, root / (MANIFEST + ".part")}
    return {p.relative_to(root).as_posix(): sha256_of(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p not in skip}


def write_manifest(root: Path, body: dict[str, Any]) -> dict[str, Any]:
    body = {"format": FORMAT, **body, "files": file_hashes(root)}
    tmp = root / (MANIFEST + ".part")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    tmp.replace(root / MANIFEST)
    return body


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BackupError(f"{root} is not a backup: no {MANIFEST}")
    try:
        body: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{path} cannot be read: {exc}") from None
    if body.get("format") != FORMAT:
        raise BackupError(f"{path} is format {body.get('format')!r}, this code reads {FORMAT}")
    return body


_NAMES = {"tables": re.compile(r"^[a-z_][a-z0-9_]{0,62}$"),
          "collections": re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$"),
          "models": re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")}


def _check_names(root: Path, body: dict[str, Any]) -> None:
    """Names the restore turns into paths: plain names only (a manifest naming
    ``../x`` must not make the restore read or write outside its folders)."""
    for part, pattern in _NAMES.items():
        for name in body.get(part, {}):
            if not pattern.match(name) or ".." in name:
                raise BackupError(f"backup {root}: the manifest names {part[:-1]} {name!r}, "
                                  "which is not a plain name")


def verify(root: Path) -> dict[str, Any]:
    """Check every file's sha256 and every count against the manifest; the manifest, or
    BackupError naming the first mismatch."""
    import numpy as np

    root = Path(root)
    body = read_manifest(root)
    _check_names(root, body)
    listed: dict[str, str] = body.get("files", {})
    present = file_hashes(root)
    for rel in sorted(set(listed) - set(present)):
        raise BackupError(f"backup {root}: {rel} is missing")
    for rel in sorted(set(present) - set(listed)):
        raise BackupError(f"backup {root}: {rel} is not in the manifest")
    for rel, digest in listed.items():
        if present[rel] != digest:
            raise BackupError(f"backup {root}: {rel} has sha256 {present[rel][:12]}…, "
                              f"the manifest says {digest[:12]}…")
    for table, n in body.get("tables", {}).items():
        got = _lines(root / "db" / f"{table}.jsonl")
        if got != n:
            raise BackupError(f"backup {root}: table {table} holds {got} rows, "
                              f"the manifest says {n}")
    for name, info in body.get("collections", {}).items():
        with np.load(root / "vectors" / f"{name}.npz", allow_pickle=False) as z:
            got = int(z["ids"].shape[0])
            if got != info["rows"] or z["vectors"].shape != (got, info["dim"]):
                raise BackupError(f"backup {root}: collection {name} holds {got} rows of "
                                  f"{z['vectors'].shape[1:]}, the manifest says "
                                  f"{info['rows']} of dim {info['dim']}")
    images = body.get("images", {})
    if images:
        got = _lines(root / "images" / "manifest.jsonl")
        if got != images["rows"]:
            raise BackupError(f"backup {root}: the image manifest holds {got} rows, "
                              f"the manifest says {images['rows']}")
    return body


def _lines(path: Path) -> int:
    if not path.is_file():
        return -1
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())
