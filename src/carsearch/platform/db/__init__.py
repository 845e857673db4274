"""The metadata database: its tables, engines and sessions, migrations, and the queries
of each table in one module (images, queue, reports, leases).

Owns: the SQLAlchemy models (`models`), `Database` (`engine`), the Alembic runner
(`migrate`) and one module per table family. May import: SQLAlchemy, Alembic and
`carsearch.platform` basics (settings, errors, ids); nothing above the platform.
"""

from carsearch.platform.db.engine import Database, as_utc, make_engine, utcnow
from carsearch.platform.db.models import (
    AnnReport,
    ArtifactHash,
    Base,
    Collection,
    DriftReport,
    Image,
    ImageStatus,
    IngestJob,
    JobState,
    LabelTask,
    LabelTaskImage,
    Lease,
    LoopStatus,
    ModelVersion,
    QueryFeedback,
    QueryLog,
    RetrainRequest,
    RunStatus,
    TrainingRun,
    VersionStatus,
)

__all__ = [
    "AnnReport",
    "ArtifactHash",
    "Base",
    "Collection",
    "Database",
    "DriftReport",
    "Image",
    "ImageStatus",
    "IngestJob",
    "JobState",
    "LabelTask",
    "LabelTaskImage",
    "Lease",
    "LoopStatus",
    "ModelVersion",
    "QueryFeedback",
    "QueryLog",
    "RetrainRequest",
    "RunStatus",
    "TrainingRun",
    "VersionStatus",
    "as_utc",
    "make_engine",
    "utcnow",
]
