"""Model registry: published versions, their artifacts and hashes, and which one serves.

A version is a directory (safetensors weights, configs, tokenizer, processor) copied
under the model directory, with the sha256 of its contents recorded in the database.
Each image collection (platform/collections.py) has at most one serving version (the
database enforces it); a version serves the collection it was published for. Promoting keeps the
previous serving version as a candidate so that rollback returns to it; retiring takes
a version out of that cycle, for good.

Promote and retire are compare-and-set on the version row: each reads the row, checks,
and then changes the status only if it is still the one it read (``UPDATE ... WHERE
status = 'candidate'``). A retire racing a promotion of the same version therefore
either retires a candidate (the promotion then finds it retired and changes nothing) or
finds it serving and is refused: something always serves, and a version whose status is
retired never serves again, so `--drop` never drops a serving collection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from carsearch.platform import collections
from carsearch.platform.collections import DEFAULT_COLLECTION
from carsearch.platform.db import Database, ModelVersion, VersionStatus
from carsearch.platform.errors import ArtifactTamperedError, CarsearchError, ModelNotFoundError
from carsearch.platform.ids import collection_name

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class RegistryError(CarsearchError):
    """A registry operation that cannot be done as asked."""


def artifact_sha256(path: Path) -> str:
    """A sha256 over every file of a directory: relative paths and contents, in order."""
    if not path.is_dir():
        raise ModelNotFoundError(f"no model artifact at {path}")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def embedding_dim(artifact: Path) -> int:
    """The embedding dimension of a SigLIP artifact, from its config."""
    cfg_path = artifact / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{artifact} has no config.json: not a model directory")
    cfg = json.loads(cfg_path.read_text())
    vision = cfg.get("vision_config", {})
    text = cfg.get("text_config", {})
    # The compact base projects its 1280-d backbone features to projection_size.
    dim = int(vision.get("projection_size") or vision.get("hidden_size", 768))
    text_dim = int(text.get("projection_size") or text.get("hidden_size", dim))
    if text_dim != dim:
        raise RegistryError(f"text ({text_dim}) and image ({dim}) embeddings differ in size")
    return dim


class Registry:
    def __init__(self, db: Database, model_dir: Path) -> None:
        self.db = db
        self.model_dir = Path(model_dir)

    # -- queries -------------------------------------------------------------------
    def list(self) -> list[ModelVersion]:
        with self.db.session() as s:
            return list(s.scalars(select(ModelVersion).order_by(ModelVersion.id)))

    def get(self, name: str) -> ModelVersion:
        with self.db.session() as s:
            return self._get(s, name)

    def serving(self, collection: str = DEFAULT_COLLECTION) -> ModelVersion | None:
        """The version serving ``collection``, or None."""
        with self.db.session() as s:
            return s.scalar(select(ModelVersion).where(
                ModelVersion.status == VersionStatus.serving,
                ModelVersion.image_collection == collection))

    def all_serving(self) -> list[ModelVersion]:
        """The serving version of every collection that has one."""
        with self.db.session() as s:
            return list(s.scalars(select(ModelVersion).where(
                ModelVersion.status == VersionStatus.serving).order_by(ModelVersion.id)))

    def require_serving(self, collection: str = DEFAULT_COLLECTION) -> ModelVersion:
        v = self.serving(collection)
        if v is None:
            where = "" if collection == DEFAULT_COLLECTION else f" for collection {collection}"
            flag = "" if collection == DEFAULT_COLLECTION else f" --collection {collection}"
            raise ModelNotFoundError(
                f"no serving model version{where}: publish one{flag} and run "
                "`carsearch models promote NAME`"
            )
        return v

    @staticmethod
    def _get(s: Session, name: str) -> ModelVersion:
        v = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
        if v is None:
            raise ModelNotFoundError(f"no model version named {name!r}")
        return v

    # -- lifecycle -----------------------------------------------------------------
    def publish(
        self,
        artifact: Path,
        *,
        name: str | None = None,
        base_model: str = "",
        metrics: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        collection: str = DEFAULT_COLLECTION,
    ) -> ModelVersion:
        """Copy an artifact directory into the registry and record it as a candidate
        for ``collection``."""
        collections.get(self.db, collection)
        artifact = Path(artifact)
        if not artifact.is_dir():
            raise ModelNotFoundError(f"no model artifact at {artifact}")
        if not any(artifact.glob("*.safetensors")):
            raise RegistryError(f"{artifact} holds no .safetensors weights")
        dim = embedding_dim(artifact)
        digest = artifact_sha256(artifact)
        name = name or f"v{datetime.now(UTC):%Y%m%d-%H%M%S}-{digest[:8]}"
        if not _NAME.match(name):
            raise RegistryError(f"unusable version name {name!r}: letters, digits, _ . - only")
        dest = self.model_dir / name
        milvus_collection = collection_name(name)
        with self.db.session() as s:
            if s.scalar(select(ModelVersion).where(ModelVersion.name == name)) is not None:
                raise RegistryError(f"a model version named {name!r} already exists")
            clash = s.scalar(select(ModelVersion).where(
                ModelVersion.collection == milvus_collection))
            if clash is not None:
                raise RegistryError(
                    f"version name {name!r} maps to the Milvus collection "
                    f"{milvus_collection}, which "
                    f"version {clash.name!r} already uses (names differing only in . - _ "
                    "collide): choose another name"
                )
            if dest.exists():
                raise RegistryError(f"{dest} already exists; remove it or choose another name")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(artifact, tmp)
            if artifact_sha256(tmp) != digest:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RegistryError(f"{artifact} changed while it was being copied")
            tmp.rename(dest)
            v = ModelVersion(
                name=name,
                base_model=base_model or str(artifact),
                artifact_path=str(dest.resolve()),
                artifact_sha256=digest,
                dim=dim,
                metric="IP",
                collection=milvus_collection,
                image_collection=collection,
                metrics=metrics or {},
                params=params or {},
                status=VersionStatus.candidate,
            )
            s.add(v)
            s.flush()
            log.info("published model version %s for %s (%s, dim %d)", name, collection,
                     digest[:12], dim)
            return v

    def promote(self, name: str) -> ModelVersion:
        """Make `name` the serving version of its collection; the previous one stays as a
        candidate."""
        with self.db.session() as s:
            v = self._get(s, name)
            if v.status == VersionStatus.retired:
                raise RegistryError(f"{name} is retired and cannot serve")
            if v.status == VersionStatus.serving:
                return v
            self.verify(v)
            current = s.scalar(
                select(ModelVersion)
                .where(ModelVersion.status == VersionStatus.serving,
                       ModelVersion.image_collection == v.image_collection)
                .with_for_update()
            )
            if current is not None:
                current.status = VersionStatus.candidate
                s.flush()
            switched = s.execute(update(ModelVersion).where(
                ModelVersion.id == v.id, ModelVersion.status == VersionStatus.candidate,
            ).values(status=VersionStatus.serving, promoted_at=datetime.now(UTC)))
            if switched.rowcount != 1:  # retired (or promoted) since it was read
                now = s.scalar(select(ModelVersion.status).where(ModelVersion.id == v.id))
                raise RegistryError(f"{name} became {now.value if now else 'unknown'} while "
                                    "it was being promoted; nothing was switched")
            s.refresh(v)
            log.info("promoted %s (was %s)", name, current.name if current else "none")
            return v

    def previous(self, collection: str = DEFAULT_COLLECTION) -> ModelVersion:
        """The version that served ``collection`` before the current one (what rollback
        returns to)."""
        with self.db.session() as s:
            current = s.scalar(select(ModelVersion).where(
                ModelVersion.status == VersionStatus.serving,
                ModelVersion.image_collection == collection))
            q = select(ModelVersion).where(
                ModelVersion.status == VersionStatus.candidate,
                ModelVersion.promoted_at.is_not(None),
                ModelVersion.image_collection == collection,
            )
            if current is not None and current.promoted_at is not None:
                q = q.where(ModelVersion.promoted_at < current.promoted_at)
            previous = s.scalar(q.order_by(ModelVersion.promoted_at.desc()).limit(1))
            if previous is None:
                raise RegistryError("nothing to roll back to: no earlier serving version")
            return previous

    def rollback(self, collection: str = DEFAULT_COLLECTION) -> ModelVersion:
        """Serve again the version that served ``collection`` before the current one."""
        return self.promote(self.previous(collection).name)

    def retire(self, name: str) -> ModelVersion:
        """Take a candidate out of service for good (a serving version is refused, also
        one promoted after this call read it)."""
        with self.db.session() as s:
            v = self._get(s, name)
            if v.status == VersionStatus.serving:
                raise RegistryError(f"{name} is serving: promote another version first")
            if v.status == VersionStatus.retired:
                return v
            done = s.execute(update(ModelVersion).where(
                ModelVersion.id == v.id, ModelVersion.status == VersionStatus.candidate,
            ).values(status=VersionStatus.retired))
            if done.rowcount != 1:  # promoted since it was read
                raise RegistryError(f"{name} is serving: promote another version first")
            s.refresh(v)
            return v

    def verify(self, version: ModelVersion) -> Path:
        """The artifact path, after checking its hash still matches the registry."""
        path = Path(version.artifact_path)
        actual = artifact_sha256(path)
        if actual != version.artifact_sha256:
            raise ArtifactTamperedError(
                f"artifact of {version.name} at {path} changed since it was published "
                f"(sha256 {actual[:12]}…, registry has {version.artifact_sha256[:12]}…); "
                "refusing to load it"
            )
        return path
