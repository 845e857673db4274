"""Read-only system status for the search page and the CLI.

Small queries, each answering one question: what is serving, how big is its index,
how is the ingest queue, what did the last drift job and ANN audit find, what are the
latest evaluation metrics. Nothing here writes. Parts written by other processes that
may not exist yet (an ANN report, an evaluation file) come back as None.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from carsearch.platform.db import (
    Database,
    DriftReport,
    Image,
    ImageStatus,
    IngestJob,
    JobState,
    LoopStatus,
    ModelVersion,
    VersionStatus,
)
from carsearch.platform.settings import Settings
from carsearch.platform.vectorstore import VectorStore

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation_results.json"
METRIC_ORDER = ("Recall@1", "Recall@5", "Recall@10", "mAP", "MRR")


@dataclass(frozen=True)
class VersionInfo:
    name: str
    status: str
    dim: int
    collection: str
    created_at: datetime | None
    promoted_at: datetime | None


@dataclass(frozen=True)
class ServingInfo:
    version: str | None
    collection: str | None
    index_size: int | None  # vectors in the serving collection (None: store unreachable)
    images_indexed: int
    search_backend: str | None = None  # what answers searches (the mirror or Milvus)


@dataclass(frozen=True)
class MetricsTable:
    """Rows of (model, metric values) and where they came from."""

    source: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)


def versions(db: Database) -> list[VersionInfo]:
    with db.session() as s:
        rows = s.scalars(select(ModelVersion).order_by(ModelVersion.id.desc()))
        return [
            VersionInfo(v.name, str(v.status.value if hasattr(v.status, "value") else v.status),
                        v.dim, v.collection, v.created_at, v.promoted_at)
            for v in rows
        ]


def serving_version(db: Database) -> ModelVersion | None:
    with db.session() as s:
        return s.scalar(select(ModelVersion).where(ModelVersion.status == VersionStatus.serving))


def image_counts(db: Database) -> dict[str, int]:
    with db.session() as s:
        rows = s.execute(select(Image.status, func.count()).group_by(Image.status)).all()
    out = {st.value: 0 for st in ImageStatus}
    out.update({(st.value if isinstance(st, ImageStatus) else str(st)): int(n) for st, n in rows})
    return out


def serving_info(db: Database, store: VectorStore | None) -> ServingInfo:
    """The serving version and its index size (vectors in Milvus)."""
    version = serving_version(db)
    indexed = image_counts(db)[ImageStatus.indexed.value]
    if version is None:
        return ServingInfo(None, None, None, indexed)
    size: int | None = None
    backend: str | None = None
    if store is not None:
        backend = store.search_backend(version.collection)
        try:  # Bounded: a status line need not wait for a server's time tick
            size = store.count(version.collection, consistency="Bounded")
        except Exception as exc:  # status must render even when Milvus is down
            log.warning("cannot count %s: %s", version.collection, exc)
    return ServingInfo(version.name, version.collection, size, indexed, backend)


def ingest_queue(db: Database) -> dict[str, int]:
    """Ingest jobs by state (every state present, zero where none)."""
    with db.session() as s:
        rows = s.execute(select(IngestJob.state, func.count()).group_by(IngestJob.state)).all()
    out = {st.value: 0 for st in JobState}
    out.update({(st.value if isinstance(st, JobState) else str(st)): int(n) for st, n in rows})
    return out


def _drift_row(r: DriftReport) -> dict[str, Any]:
    report = r.report or {}
    return {
        "id": r.id,
        "created_at": r.created_at,
        "status": str(report.get("status", "")),
        "n_images": r.n_images,
        "n_isolated": r.n_isolated,
        "retrain_triggered": r.retrain_triggered,
        "report": report,
    }


def latest_drift(db: Database, scan: int = 200) -> dict[str, Any] | None:
    """The newest drift report, and under "last_check" the newest one that ran the
    detection, when that is an older row (a scheduled job often finds too few new images)."""
    with db.session() as s:
        rows = list(s.scalars(select(DriftReport).order_by(DriftReport.id.desc()).limit(scan)))
        if not rows:
            return None
        out = _drift_row(rows[0])
        if out["status"] not in ("checked", ""):
            checked = next((r for r in rows[1:] if (r.report or {}).get("status") == "checked"),
                           None)
            out["last_check"] = _drift_row(checked) if checked is not None else None
        return out


def latest_ann(db: Database) -> dict[str, Any] | None:
    """The newest ANN audit, through `ann_audit` where that module exists."""
    try:
        from carsearch.platform import ann_audit  # written by the ANN-audit work
    except ImportError:
        ann_audit = None  # type: ignore[assignment]
    if ann_audit is not None and hasattr(ann_audit, "latest_ann_report"):
        rep = ann_audit.latest_ann_report(db)
        if rep is None:
            return None
        if isinstance(rep, dict):
            return rep
        to_dict = getattr(rep, "to_dict", None)
        return dict(to_dict()) if callable(to_dict) else _row_dict(rep)
    from carsearch.platform.db import AnnReport

    with db.session() as s:
        row = s.scalar(select(AnnReport).order_by(AnnReport.id.desc()).limit(1))
        return _row_dict(row) if row is not None else None


def _row_dict(row: Any) -> dict[str, Any]:
    if hasattr(row, "__table__"):
        return {c.name: getattr(row, c.name) for c in row.__table__.columns}
    try:
        return asdict(row)
    except TypeError:
        return {"value": repr(row)}


# -- background loops --------------------------------------------------------------------
LOOP_STALE_S = 600.0  # a loop not heard of for this long shows as "silent"


def record_loop(db: Database, process: str, role: str, state: dict[str, Any]) -> None:
    """Upsert one loop's newest state (platform.health calls it on every change)."""
    with db.session() as s:
        row = s.scalar(select(LoopStatus).where(LoopStatus.process == process,
                                                LoopStatus.loop == state["name"]))
        if row is None:
            row = LoopStatus(process=process, loop=state["name"])
            s.add(row)
        row.role, row.state, row.detail = role, str(state["state"]), dict(state)
        row.updated_at = datetime.now(UTC)


def loop_statuses(db: Database, within_s: float = 86_400.0) -> list[dict[str, Any]]:
    """The loops of every process heard from within ``within_s``, newest first; a loop
    not updated for LOOP_STALE_S (its process gone, say) is marked silent."""
    now = datetime.now(UTC)
    since = now - timedelta(seconds=within_s)
    with db.session() as s:
        rows = list(s.scalars(select(LoopStatus).where(LoopStatus.updated_at >= since)
                              .order_by(LoopStatus.updated_at.desc())))
    out = []
    for r in rows:
        updated = r.updated_at if r.updated_at.tzinfo else r.updated_at.replace(tzinfo=UTC)
        silent = (now - updated).total_seconds() > LOOP_STALE_S and r.state != "stopped"
        detail = r.detail or {}
        out.append({"process": r.process, "role": r.role, "loop": r.loop,
                    "state": "silent" if silent else r.state, "updated_at": updated,
                    "failures": detail.get("total_failures", 0),
                    "last_error": detail.get("last_error")})
    return out


# -- metrics -----------------------------------------------------------------------------
def latest_evaluation_file(settings: Settings) -> Path | None:
    """The newest DATA_DIR/runs/*/evaluation_results.json, if any."""
    runs = settings.data_dir / "runs"
    if not runs.is_dir():
        return None
    files = [p for p in runs.glob(f"*/{EVALUATION_FILE}") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def _metric_columns(metrics: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = [m for m in METRIC_ORDER if any(m in d for d in metrics)]
    for d in metrics:
        for k, v in d.items():
            if k not in seen and isinstance(v, int | float) and not isinstance(v, bool):
                seen.append(k)
    return seen


def _table(source: str, named: dict[str, dict[str, Any]]) -> MetricsTable:
    cols = _metric_columns(list(named.values()))
    rows = [[name, *[d.get(c) for c in cols]] for name, d in named.items()]
    return MetricsTable(source=source, columns=["model", *cols], rows=rows)


def latest_metrics(db: Database, settings: Settings) -> MetricsTable | None:
    """Metrics of the serving version (registry), else the newest evaluation file."""
    version = serving_version(db)
    if version is not None and version.metrics:
        m = dict(version.metrics)
        named: dict[str, dict[str, Any]] = {}
        zero = m.pop("zero_shot", None)
        flat = {k: v for k, v in m.items() if not isinstance(v, dict)}
        if flat:
            named[f"{version.name} (serving)"] = flat
        if isinstance(zero, dict):
            named["zero-shot base"] = zero
        if named:
            return _table(f"model version {version.name}", named)
    path = latest_evaluation_file(settings)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not models:
        return None
    return _table(str(path), {str(k): v for k, v in models.items() if isinstance(v, dict)})


@dataclass(frozen=True)
class SystemStatus:
    serving: ServingInfo
    queue: dict[str, int]
    images: dict[str, int]
    versions: list[VersionInfo]
    drift: dict[str, Any] | None
    ann: dict[str, Any] | None
    loops: list[dict[str, Any]] = field(default_factory=list)
    alias: str | None = None


def system_status(db: Database, store: VectorStore | None) -> SystemStatus:
    """Everything the status tab shows, in one call."""
    return SystemStatus(
        serving=serving_info(db, store),
        queue=ingest_queue(db),
        images=image_counts(db),
        versions=versions(db),
        drift=latest_drift(db),
        ann=latest_ann(db),
        loops=loop_statuses(db),
        alias=_alias(store),
    )


def _alias(store: VectorStore | None) -> str | None:
    target = getattr(store, "alias_target", None)
    if target is None:
        return None
    try:
        return str(target()) if target() else None
    except Exception as exc:  # status must render even when Milvus is down
        log.warning("cannot read the serving alias: %s", exc)
        return None
