"""The tables, as SQLAlchemy 2 models.

The schema is made and changed only by the Alembic migrations (carsearch/migrations);
these models describe it for the code. SQLite (embedded default) and PostgreSQL
(production) run the same models.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from carsearch.platform.db.engine import utcnow

JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    pass


class ImageStatus(enum.StrEnum):
    pending = "pending"
    indexed = "indexed"
    quarantined = "quarantined"


class VersionStatus(enum.StrEnum):
    candidate = "candidate"
    serving = "serving"
    retired = "retired"


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    dead = "dead"


class RunStatus(enum.StrEnum):
    running = "running"
    finished = "finished"
    failed = "failed"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings with a CHECK constraint: portable and easy to migrate.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class Collection(Base):
    """A named set of images searched together (``vehicles``, ``photos``): its kind says
    which metadata fields and filters it has (platform/collections.py). Each collection
    has its own serving model version."""

    __tablename__ = "collections"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Image(Base):
    """One image of one collection. `id` is derived from the content hash and the
    collection (see ids.image_id), so the same photo may sit in two collections."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("collection", "sha256", name="uq_images_collection_sha256"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    collection: Mapped[str] = mapped_column(String(64), nullable=False, default="vehicles",
                                            server_default="vehicles", index=True)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(64), nullable=False, default="unknown")
    make: Mapped[str | None] = mapped_column(String(64), index=True)
    model: Mapped[str | None] = mapped_column(String(128))
    year: Mapped[int | None] = mapped_column(Integer, index=True)
    body_type: Mapped[str | None] = mapped_column(String(32))
    colour: Mapped[str | None] = mapped_column(String(32))
    class_name: Mapped[str | None] = mapped_column(String(256), index=True)
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # The vehicle's box [x1, y1, x2, y2] in pixels (clipped to the image), or None: the
    # whole frame. The image policy of the version crops to it before embedding.
    box: Mapped[list[int] | None] = mapped_column(JSONType)
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[ImageStatus] = mapped_column(
        _enum(ImageStatus, "image_status"), nullable=False, default=ImageStatus.pending
    )
    error: Mapped[str | None] = mapped_column(Text)


class ModelVersion(Base):
    """A published model: artifact on disk, its hash, metrics and lifecycle state."""

    __tablename__ = "model_versions"
    __table_args__ = (
        # At most one serving version per image collection, enforced by the database.
        Index(
            "uq_model_versions_one_serving",
            "image_collection",
            "status",
            unique=True,
            sqlite_where=text("status = 'serving'"),
            postgresql_where=text("status = 'serving'"),
        ),
        # Two versions in one collection would serve each other's vectors.
        UniqueConstraint("collection", name="uq_model_versions_collection"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    base_model: Mapped[str] = mapped_column(Text, nullable=False)
    artifact_path: Mapped[str] = mapped_column(Text, nullable=False)
    artifact_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    metric: Mapped[str] = mapped_column(String(16), nullable=False, default="IP")
    # The Milvus collection holding this version's vectors (one per version)...
    collection: Mapped[str] = mapped_column(String(128), nullable=False)
    # ...of the images of this image collection (`collections.name`), which it serves.
    image_collection: Mapped[str] = mapped_column(String(64), nullable=False,
                                                  default="vehicles",
                                                  server_default="vehicles")
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    params: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[VersionStatus] = mapped_column(
        _enum(VersionStatus, "version_status"), nullable=False, default=VersionStatus.candidate
    )


class IngestJob(Base):
    """A queue row: one unit of ingest work, claimed by a worker."""

    __tablename__ = "ingest_jobs"
    __table_args__ = (Index("ix_ingest_jobs_claim", "state", "available_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False, default="image")
    state: Mapped[JobState] = mapped_column(
        _enum(JobState, "job_state"), nullable=False, default=JobState.queued
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=5)
    last_error: Mapped[str | None] = mapped_column(Text)
    locked_by: Mapped[str | None] = mapped_column(String(128))
    locked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    available_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[RunStatus] = mapped_column(
        _enum(RunStatus, "run_status"), nullable=False, default=RunStatus.running
    )
    base_model: Mapped[str] = mapped_column(Text, nullable=False)
    data_fingerprint: Mapped[str | None] = mapped_column(String(64))
    config: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    error: Mapped[str | None] = mapped_column(Text)


class DriftReport(Base):
    __tablename__ = "drift_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    n_images: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    n_isolated: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    retrain_triggered: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class QueryLog(Base):
    __tablename__ = "query_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="text")
    query: Mapped[str | None] = mapped_column(Text)
    filters: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    k: Mapped[int] = mapped_column(Integer, nullable=False)
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    result_ids: Mapped[list[int] | None] = mapped_column(JSONType)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))


class AnnReport(Base):
    """One ANN audit: Milvus top-k against FAISS exact top-k for a model version."""

    __tablename__ = "ann_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    index_type: Mapped[str] = mapped_column(String(32), nullable=False)
    params: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    n_queries: Mapped[int] = mapped_column(Integer, nullable=False)
    n_vectors: Mapped[int] = mapped_column(Integer, nullable=False)
    recall_at_10: Mapped[float | None] = mapped_column(Float)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class QueryFeedback(Base):
    """A thumbs-up (+1) or thumbs-down (-1) on one result of a logged query."""

    __tablename__ = "query_feedback"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    query_log_id: Mapped[int | None] = mapped_column(ForeignKey("query_log.id"))
    image_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    vote: Mapped[int] = mapped_column(Integer, nullable=False)
    query: Mapped[str | None] = mapped_column(Text)


class LoopStatus(Base):
    """The newest state of one background loop of one process (upserted as it changes),
    so that the page's Status tab shows the loops of every process of a deployment."""

    __tablename__ = "loop_status"
    __table_args__ = (Index("uq_loop_status_process_loop", "process", "loop", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    process: Mapped[str] = mapped_column(String(128), nullable=False)
    role: Mapped[str] = mapped_column(String(32), nullable=False)
    loop: Mapped[str] = mapped_column(String(64), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow, index=True
    )


class Lease(Base):
    """A named lease one process holds until it releases it or it expires: the drift job
    takes one per run, so two runs at once never both act on one drift event."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128), nullable=False)
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ArtifactHash(Base):
    """The sha256 of every file of an artifact the platform loads from disk and that could
    run code or change results (an exact index, a training checkpoint), recorded when it
    was written. Kept here, not beside the files, so that whoever can write the files
    cannot also write the hashes they are checked against (`carsearch.platform.artifacts`)."""

    __tablename__ = "artifact_hashes"
    __table_args__ = (UniqueConstraint("kind", "key", name="uq_artifact_hashes_kind_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    key: Mapped[str] = mapped_column(String(1024), nullable=False)
    # {path relative to the artifact's directory: sha256 hex}
    files: Mapped[dict[str, str]] = mapped_column(JSONType, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LabelTask(Base):
    """One isolated drift cluster waiting for a person's labels (all its images)."""

    __tablename__ = "label_tasks"
    __table_args__ = (
        # One task per cluster of a report: a drift run re-read never makes two.
        UniqueConstraint("drift_report_id", "cluster", name="uq_label_tasks_report_cluster"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    drift_report_id: Mapped[int | None] = mapped_column(ForeignKey("drift_reports.id"))
    cluster: Mapped[int] = mapped_column(Integer, nullable=False)
    collection: Mapped[str] = mapped_column(String(64), nullable=False, default="vehicles")
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    nearest_class_name: Mapped[str | None] = mapped_column(String(256))
    suggested: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="open")
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RetrainRequest(Base):
    """A retrain asked for by a drift event (one per report, the unique key) or by a
    person. States: ``waiting`` (for its labelling tasks), ``ready``, ``running`` (one
    holder, heart-beating), then ``promoted``, ``candidate`` (kept, with the reason),
    ``failed`` (the error) or ``interrupted`` (its process stopped; never restarted by
    itself)."""

    __tablename__ = "retrain_requests"
    __table_args__ = (
        UniqueConstraint("drift_report_id", name="uq_retrain_requests_report"),
        Index("ix_retrain_requests_state", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    drift_report_id: Mapped[int | None] = mapped_column(ForeignKey("drift_reports.id"))
    collection: Mapped[str] = mapped_column(String(64), nullable=False, default="vehicles")
    requested_by: Mapped[str] = mapped_column(String(128), nullable=False)
    task_ids: Mapped[list[int]] = mapped_column(JSONType, nullable=False, default=list)
    state: Mapped[str] = mapped_column(String(24), nullable=False, default="waiting")
    reason: Mapped[str | None] = mapped_column(Text)
    holder: Mapped[str | None] = mapped_column(String(256))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    training_run_id: Mapped[int | None] = mapped_column(Integer)
    version: Mapped[str | None] = mapped_column(String(128))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class LabelTaskImage(Base):
    """An image of a labelling task; ``labelled_at`` is set when its labels arrive."""

    __tablename__ = "label_task_images"

    task_id: Mapped[int] = mapped_column(ForeignKey("label_tasks.id"), primary_key=True)
    image_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    position: Mapped[int] = mapped_column(Integer, nullable=False)  # most central first
    labelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
