"""Queries of the report tables: drift_reports, ann_reports, loop_status, and the
training runs as the flywheel shows them.

The drift job, the ANN audit and every loop write here; the Status tab, the health port's
metrics and the jobs themselves read here.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from carsearch.platform.db.engine import Database, as_utc
from carsearch.platform.db.models import (
    AnnReport,
    DriftReport,
    LoopStatus,
    ModelVersion,
    RunStatus,
    TrainingRun,
)

# --- drift_reports --------------------------------------------------------------------------


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


def drift_events(db: Database, n: int = 5) -> list[dict[str, Any]]:
    """The newest drift reports that found isolated clusters, with what they started."""
    with db.session() as s:
        rows = list(s.scalars(select(DriftReport).where(DriftReport.n_isolated > 0)
                              .order_by(DriftReport.id.desc()).limit(n)))
    out = []
    for r in rows:
        report = r.report or {}
        retrain = report.get("retrain") or {}
        out.append({"id": r.id, "created_at": r.created_at, "n_isolated": r.n_isolated,
                    "label_tasks": list(report.get("label_tasks") or []),
                    "retrain": (f"request {retrain['request']}" if retrain.get("request")
                                else str(retrain.get("request_state") or
                                         retrain.get("state", "")))})
    return out


def training_runs(db: Database, n: int = 5) -> list[dict[str, Any]]:
    """The newest training runs and their outcome: promoted (why), kept as a candidate
    (why), published without a promotion asked, stopped, or failed (the error)."""
    with db.session() as s:
        rows = list(s.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(n)))
        names = {v.id: v.name for v in s.scalars(select(ModelVersion).where(
            ModelVersion.id.in_([r.model_version_id for r in rows if r.model_version_id])))}
    out = []
    for r in rows:
        outcome = (r.metrics or {}).get("outcome") or {}
        if r.status == RunStatus.failed:
            what = f"failed: {r.error or 'unknown error'}"
        elif r.status == RunStatus.running:
            what = "running"
        elif outcome.get("promoted"):
            what = f"promoted: {outcome.get('reason', '')}"
        elif outcome.get("promote_asked"):
            what = f"kept as candidate: {outcome.get('reason', '')}"
        else:
            what = "published as a candidate (no promotion asked)"
        out.append({"id": r.id, "started_at": r.started_at, "finished_at": r.finished_at,
                    "version": names.get(r.model_version_id or -1), "outcome": what[:300]})
    return out


def previous_until(db: Database, page: int = 500) -> datetime | None:
    """Where the default window starts: the end of the newest report that advanced it."""
    offset = 0
    while True:
        with db.session() as s:
            rows = list(s.scalars(select(DriftReport.report).order_by(DriftReport.id.desc())
                                  .offset(offset).limit(page)))
        for rep in rows:
            if (rep or {}).get("advances") and rep.get("until"):
                return as_utc(datetime.fromisoformat(rep["until"]))
        if len(rows) < page:
            return None
        offset += page


def last_retrain_start(db: Database, after: datetime) -> tuple[int, str] | None:
    """``(report id, created_at)`` of the newest report after ``after`` that started the
    retrain command, or None."""
    with db.session() as s:
        rows = s.execute(select(DriftReport.id, DriftReport.created_at, DriftReport.report)
                         .where(DriftReport.created_at >= after)
                         .order_by(DriftReport.id.desc())).all()
    for rid, created, rep in rows:
        if ((rep or {}).get("retrain") or {}).get("started"):
            return int(rid), as_utc(created).isoformat()
    return None


def record_drift(db: Database, report: dict[str, Any], version_id: int, *, n_images: int,
                 n_isolated: int, retrain_triggered: bool) -> int:
    """Write a drift report row; returns its id."""
    with db.session() as s:
        row = DriftReport(model_version_id=version_id, n_images=n_images,
                          n_isolated=n_isolated, retrain_triggered=retrain_triggered,
                          report=report)
        s.add(row)
        s.flush()
        return int(row.id)


def update_drift(db: Database, report_id: int, report: dict[str, Any]) -> None:
    with db.session() as s:
        row = s.get(DriftReport, report_id)
        if row is not None:
            row.report = report


# --- ann_reports ----------------------------------------------------------------------------


def latest_ann_report(db: Database, model_version_id: int | None = None) -> dict[str, Any] | None:
    """The newest recorded audit (optionally of one version) as a dict, or None."""
    stmt = select(AnnReport).order_by(AnnReport.created_at.desc(), AnnReport.id.desc()).limit(1)
    if model_version_id is not None:
        stmt = stmt.where(AnnReport.model_version_id == model_version_id)
    with db.session() as s:
        row = s.scalar(stmt)
        if row is None:
            return None
        version = s.get(ModelVersion, row.model_version_id) if row.model_version_id else None
        return {
            "id": row.id,
            "created_at": row.created_at.isoformat() if row.created_at else None,
            "model_version_id": row.model_version_id,
            "model_version": version.name if version else None,
            "index_type": row.index_type,
            "params": row.params,
            "n_queries": row.n_queries,
            "n_vectors": row.n_vectors,
            "recall_at_10": row.recall_at_10,
            "report": row.report,
        }



# --- loop_status ----------------------------------------------------------------------------

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
        updated = as_utc(r.updated_at)
        silent = (now - updated).total_seconds() > LOOP_STALE_S and r.state != "stopped"
        detail = r.detail or {}
        out.append({"process": r.process, "role": r.role, "loop": r.loop,
                    "state": "silent" if silent else r.state, "updated_at": updated,
                    "failures": detail.get("total_failures", 0),
                    "last_error": detail.get("last_error"),
                    "paused": detail.get("paused")})
    return out


