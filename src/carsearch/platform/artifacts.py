"""Trusted artifacts: files are checked against the hashes the database recorded before
anything loads them.

Whatever the platform loads from disk that could run code or change results is hashed
when it is written and checked before it is read: model versions (the registry's
``artifact_sha256``), exact indexes (``kind="exact_index"``, keyed by model version) and
training checkpoints (``kind="checkpoint"``, keyed by the checkpoint's resolved path).
The hashes live in the ``artifact_hashes`` table, not in a file beside the artifact:
whoever can write a run or data directory could rewrite such a file to match their own
files, but not the database.

    ledger = ArtifactLedger(db)
    ledger.record("checkpoint", key, directory)      # every file under directory
    ledger.verify("checkpoint", key, directory)      # ArtifactTamperedError naming the file

``verify`` refuses, naming the file: a file whose sha256 differs from the record, a
recorded file that is missing, a file that was never recorded (``complete=True``, the
default), a symlink or other non-regular entry, and an artifact with no record at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import delete, select

from carsearch.platform.db import ArtifactHash, Database
from carsearch.platform.errors import ArtifactTamperedError
from carsearch.platform.images import sha256_file

__all__ = ["CHECKPOINT", "EXACT_INDEX", "ArtifactLedger", "hash_files"]

log = logging.getLogger(__name__)

EXACT_INDEX = "exact_index"
CHECKPOINT = "checkpoint"


def _entries(directory: Path) -> list[Path]:
    """Every entry under ``directory`` that is not a directory, relative, sorted."""
    return sorted(p.relative_to(directory) for p in directory.rglob("*") if not p.is_dir()
                  or p.is_symlink())


def hash_files(directory: Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """``{relative path: sha256}`` of the named files, or of every file under
    ``directory``; a symlink or other non-regular entry raises ArtifactTamperedError."""
    directory = Path(directory)
    rels = [Path(n) for n in names] if names is not None else _entries(directory)
    out: dict[str, str] = {}
    for rel in rels:
        path = directory / rel
        if path.is_symlink() or not path.is_file():
            raise ArtifactTamperedError(f"{path}: not a regular file")
        out[rel.as_posix()] = sha256_file(path)
    return out


class ArtifactLedger:
    """The recorded hashes of artifacts, in the platform's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record_hashes(self, kind: str, key: str, files: dict[str, str]) -> None:
        """Record ``files`` (``{relative path: sha256}``) for ``(kind, key)``, replacing an
        earlier record."""
        with self.db.session() as s:
            row = s.scalar(select(ArtifactHash).where(ArtifactHash.kind == kind,
                                                      ArtifactHash.key == key))
            if row is None:
                s.add(ArtifactHash(kind=kind, key=key, files=dict(files)))
            else:
                row.files = dict(files)
        log.info("recorded the sha256 of %d files of %s %s", len(files), kind, key)

    def record(self, kind: str, key: str, directory: Path,
               names: Iterable[str] | None = None) -> dict[str, str]:
        """Hash the named files (default: every file under ``directory``) and record them."""
        files = hash_files(directory, names)
        self.record_hashes(kind, key, files)
        return files

    def recorded(self, kind: str, key: str) -> dict[str, str] | None:
        """The recorded ``{relative path: sha256}``, or None when nothing was recorded."""
        with self.db.session() as s:
            row = s.scalar(select(ArtifactHash).where(ArtifactHash.kind == kind,
                                                      ArtifactHash.key == key))
            return dict(row.files) if row is not None else None

    def forget(self, kind: str, key: str) -> None:
        with self.db.session() as s:
            s.execute(delete(ArtifactHash).where(ArtifactHash.kind == kind,
                                                 ArtifactHash.key == key))

    def verify(self, kind: str, key: str, directory: Path, *,
               complete: bool = True) -> dict[str, str]:
        """Check the files under ``directory`` against the record of ``(kind, key)``;
        returns the record. ``complete``: every file under the directory must have been
        recorded (a checkpoint); otherwise only the recorded files are checked."""
        directory = Path(directory)
        expected = self.recorded(kind, key)
        if expected is None:
            raise ArtifactTamperedError(
                f"{directory}: no sha256 was recorded for this {kind.replace('_', ' ')} "
                f"({key}); it was not written by this platform, or its record was lost"
            )
        if complete:
            for rel in _entries(directory):
                if rel.as_posix() not in expected:
                    raise ArtifactTamperedError(
                        f"{directory / rel}: not a recorded file of this "
                        f"{kind.replace('_', ' ')}; refusing to load it")
        for rel, digest in sorted(expected.items()):
            path = directory / rel
            if path.is_symlink() or not path.is_file():
                raise ArtifactTamperedError(f"{path}: recorded but missing or not a regular "
                                            "file")
            if sha256_file(path) != digest:
                raise ArtifactTamperedError(
                    f"{path}: sha256 differs from the one recorded when it was written "
                    f"({digest[:12]}…); refusing to load it")
        return expected
