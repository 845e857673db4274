"""What the page's header and Status tab show, gathered from the table modules.

Each part answers one question: what is serving, how big is its index, how is the ingest
queue, what did the last drift job and ANN audit find, which loops run where, what are
the latest evaluation metrics. Nothing here writes. Parts written by other processes
that may not exist yet (an ANN report, an evaluation file) come back as None.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from carsearch.platform.db import (
    Database,
    ImageStatus,
    images,
    labels,
    queue,
    reports,
    retrains,
)
from carsearch.platform.models.registry import Registry
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.protocol import ManagedStore

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
    reg = Registry(db, Path())
    return [VersionInfo(v.name, v.status.value, v.dim, v.collection, v.created_at,
                        v.promoted_at) for v in reversed(reg.list())]


def serving_info(db: Database, store: ManagedStore | None) -> ServingInfo:
    """The serving version and its index size (vectors in Milvus)."""
    version = Registry(db, Path()).serving()
    indexed = images.counts_by_status(db, "vehicles")[ImageStatus.indexed.value]
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
    version = Registry(db, Path()).serving()
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
    labelling: dict[str, int] = field(default_factory=dict)  # tasks open / done
    drift_events: list[dict[str, Any]] = field(default_factory=list)
    retrains: list[dict[str, Any]] = field(default_factory=list)  # training runs
    retrain_requests: list[dict[str, Any]] = field(default_factory=list)


def system_status(db: Database, store: ManagedStore | None) -> SystemStatus:
    """Everything the status tab shows, in one call."""
    return SystemStatus(
        serving=serving_info(db, store),
        queue=queue.counts(db),
        images=images.counts_by_status(db),
        versions=versions(db),
        drift=reports.latest_drift(db),
        ann=reports.latest_ann_report(db),
        loops=reports.loop_statuses(db),
        alias=_alias(store),
        labelling=labels.counts(db),
        drift_events=reports.drift_events(db),
        retrains=reports.training_runs(db),
        retrain_requests=retrains.listing(db, 5),
    )


def _alias(store: ManagedStore | None) -> str | None:
    if store is None:
        return None
    try:
        target = store.alias_target()
        return str(target) if target else None
    except Exception as exc:  # status must render even when Milvus is down
        log.warning("cannot read the serving alias: %s", exc)
        return None
