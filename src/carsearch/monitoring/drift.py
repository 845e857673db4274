"""The drift job: cluster-density checks on new embeddings; isolated clusters trigger retraining.

``run_drift`` picks the images ingested in a window (by default since the last report),
samples references from the images indexed before it, reads both sets of vectors from the
serving version's Milvus collection, runs the detection (``drift_detect.detect_drift``:
kNN density, isolated clusters), records a ``drift_reports`` row and, when isolated
clusters are found, makes one labelling task per cluster and one retrain request for the
event (``platform.db.retrains``: it waits for the labels, then the retrain job runs it);
the optional retrain command is also started then (at most once per cooldown).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from carsearch.monitoring.drift_detect import (
    DriftDetection,
    IsolatedCluster,
    detect_drift,
    knn_density,
)
from carsearch.platform.db import (
    Database,
    Image,
    ModelVersion,
    as_utc,
    images,
    labels,
    leases,
    reports,
    retrains,
)
from carsearch.platform.errors import ConfigError
from carsearch.platform.scheduler import process_name
from carsearch.platform.settings import DriftSettings
from carsearch.platform.telemetry import METRICS
from carsearch.platform.vectors.exact import set_threads
from carsearch.platform.vectors.protocol import STRONG
from carsearch.platform.vehicles import parse_class_name

__all__ = [
    "DriftDetection",
    "DriftRun",
    "IsolatedCluster",
    "detect_drift",
    "knn_density",
    "run_drift",
]

log = logging.getLogger(__name__)

_READ_BATCH = 1000


# --- the job --------------------------------------------------------------------------------

# Statuses: "checked" (detection ran), "baseline" (the first run: marks where the next window
# starts), "too_few_new" (window kept open until enough images arrive), "too_few_reference".
_ADVANCING = ("checked", "baseline", "too_few_reference")


@dataclass
class DriftRun:
    """One run of the drift job: what it looked at, what it found, what it started."""

    status: str
    message: str
    model_version: str
    collection: str
    since: str | None  # ISO-8601 UTC; the window is [since, until)
    until: str
    advances: bool  # whether the next default window starts at ``until``
    params: dict[str, Any]
    n_new: int = 0  # new images checked (sampled, with vectors)
    n_new_in_window: int = 0
    n_new_missing: int = 0  # sampled new images whose vectors the collection lacks
    n_reference: int = 0
    n_reference_available: int = 0
    detection: DriftDetection | None = None
    retrain: dict[str, Any] = field(default_factory=dict)
    report_id: int | None = None
    label_tasks: list[int] = field(default_factory=list)  # the tasks its clusters made

    @property
    def n_isolated(self) -> int:
        return self.detection.n_isolated if self.detection is not None else 0

    @property
    def retrain_triggered(self) -> bool:
        return self.n_isolated > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["detection"] = self.detection.to_dict() if self.detection is not None else None
        d["n_isolated"] = self.n_isolated
        d["retrain_triggered"] = self.retrain_triggered
        return d

    def summary(self) -> str:
        head = f"drift report {self.report_id} ({self.model_version}): {self.message}"
        if self.detection is None:
            return head
        lines = [head]
        for c in self.detection.clusters:
            near = c.nearest_class_name or c.nearest_make or c.nearest_reference_id
            lines.append(f"  cluster of {c.size}: density {c.mean_density:.3f} < "
                         f"{self.detection.threshold:.3f}, nearest {near} "
                         f"(similarity {c.nearest_similarity or 0:.3f}); e.g. {c.member_ids[:3]}")
        if self.retrain:
            lines.append(f"  retrain: {self.retrain.get('state')}")
        return "\n".join(lines)


def suggestion(class_name: str | None) -> dict[str, Any]:
    """The nearest known class as the label a labelling task suggests (a person corrects
    it): its make, model, year and body type."""
    if not class_name:
        return {}
    try:
        label = parse_class_name(class_name)
    except ValueError:
        return {}
    return {k: v for k, v in {"make": label.make, "model": label.model, "year": label.year,
                              "body_type": label.body_type}.items() if v}


def _iso(dt: datetime | None) -> str | None:
    return as_utc(dt).isoformat() if dt is not None else None


def read_vectors(
    store: Any, collection: str, ids: Sequence[int], *, progress: bool = False,
    desc: str = "read vectors",
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids found, vectors)`` from the collection, in batches behind a progress bar."""
    found: list[np.ndarray] = []
    mats: list[np.ndarray] = []
    with tqdm(total=len(ids), desc=desc, unit="vec", disable=not progress, leave=False) as bar:
        for start in range(0, len(ids), _READ_BATCH):
            chunk = ids[start:start + _READ_BATCH]
            got, mat = store.vectors(collection, chunk, consistency=STRONG)
            found.append(got)
            mats.append(mat)
            bar.update(len(chunk))
    if not found:
        return np.empty(0, np.int64), np.empty((0, store.dimension(collection)), np.float32)
    return np.concatenate(found), np.concatenate(mats)


def _label_clusters(db: Database, clusters: list[IsolatedCluster]) -> None:
    labels = images.labels_of(db, {c.nearest_reference_id for c in clusters
                                   if c.nearest_reference_id is not None})
    for c in clusters:
        c.nearest_class_name, c.nearest_make = labels.get(c.nearest_reference_id or -1,
                                                          (None, None))


# --- retraining -----------------------------------------------------------------------------


def start_retrain(
    args: list[str], *, log_path: Path, env: dict[str, str], wait_s: float
) -> dict[str, Any]:
    """Start the retrain command (no shell, its own session, output to ``log_path``) and
    wait up to ``wait_s`` seconds for it; a command still running is reaped in the
    background."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"command": args, "log": str(log_path)}
    try:
        with log_path.open("ab") as fh:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
    except OSError as exc:
        log.error("cannot start the retrain command %s: %s", args, exc)
        return {**out, "started": False, "state": "failed to start", "error": str(exc)}
    out.update(started=True, pid=proc.pid)
    try:
        code = proc.wait(timeout=max(0.0, wait_s))
    except subprocess.TimeoutExpired:
        threading.Thread(target=_reap, args=(proc, args), name="retrain-reaper",
                         daemon=True).start()
        log.warning("retrain command started (pid %d), still running; output in %s",
                    proc.pid, log_path)
        return {**out, "state": "running", "exit_code": None}
    (log.warning if code == 0 else log.error)(
        "retrain command (pid %d) exited with %d; output in %s", proc.pid, code, log_path)
    return {**out, "state": "exited", "exit_code": code}


def _reap(proc: subprocess.Popen[bytes], args: list[str]) -> None:
    code = proc.wait()
    log.info("retrain command %s (pid %d) exited with %d", args, proc.pid, code)


def _retrain(platform: Any, run: DriftRun, now: datetime, wait_s: float) -> dict[str, Any]:
    """Start the configured command after a report that found isolated clusters (once per
    cooldown); the returned dict goes into the report."""
    cfg: DriftSettings = platform.settings.drift
    if not cfg.retrain_command.strip():
        return {"started": False, "state": "not configured (CARSEARCH_DRIFT__RETRAIN_COMMAND)"}
    args = shlex.split(cfg.retrain_command)
    prior = reports.last_retrain_start(platform.db, now - timedelta(hours=cfg.retrain_cooldown_h))
    if prior is not None and cfg.retrain_cooldown_h > 0:
        return {"command": args, "started": False,
                "state": f"cooldown: started by report {prior[0]} at {prior[1]} "
                         f"(cooldown {cfg.retrain_cooldown_h:g} h)"}
    env = {**os.environ, "CARSEARCH_DRIFT_REPORT_ID": str(run.report_id),
           "CARSEARCH_DRIFT_MODEL_VERSION": run.model_version}
    log_path = platform.settings.data_dir / "drift" / f"retrain-{run.report_id}.log"
    return start_retrain(args, log_path=log_path, env=env, wait_s=wait_s)


def _request(platform: Any, run: DriftRun, collection: str) -> dict[str, Any]:
    """The retrain request of this drift event: one per report that made new labelling
    tasks; a report whose clusters are all in earlier tasks (the same event seen again)
    asks for nothing."""
    if not run.label_tasks or run.report_id is None:
        return {"request": None, "request_state": "same drift event as earlier labelling "
                "tasks: no new retrain request"}
    rid, _ = retrains.for_drift_event(platform.db, run.report_id, collection, run.label_tasks)
    return {"request": rid, "request_state": f"waiting for {len(run.label_tasks)} "
            "labelling task(s); the retrain job runs it when they are done"}


# --- the whole run --------------------------------------------------------------------------


def _check(platform: Any, run: DriftRun, version: ModelVersion, since: datetime,
           until: datetime, seed: int, progress: bool) -> None:
    """Fill ``run`` with the window's images, the references and the detection."""
    cfg: DriftSettings = platform.settings.drift
    db, store = platform.db, platform.store
    mine = Image.collection == version.image_collection
    window = images.indexed(mine, Image.ingested_at >= since, Image.ingested_at < until)
    new_ids, run.n_new_in_window = images.sample_ids(db, window, cfg.max_new, seed)
    if run.n_new_in_window < cfg.min_new:
        run.status, run.advances = "too_few_new", False
        run.message = (f"{run.n_new_in_window} new images since {run.since} (minimum "
                       f"{cfg.min_new}): not checked; the window stays open")
        return
    got_new, new = read_vectors(store, version.collection, new_ids, progress=progress,
                                desc="new vectors")
    run.n_new, run.n_new_missing = len(got_new), len(new_ids) - len(got_new)
    if run.n_new < cfg.min_new:
        run.status, run.advances = "too_few_new", False
        run.message = (f"{run.n_new} of {len(new_ids)} new images have vectors in "
                       f"{version.collection} (minimum {cfg.min_new}): not checked")
        return
    ref_ids, run.n_reference_available = images.sample_ids(
        db, images.indexed(mine, Image.ingested_at < since), cfg.max_reference, seed)
    got_ref, ref = read_vectors(store, version.collection, ref_ids, progress=progress,
                                desc="reference vectors")
    run.n_reference = len(got_ref)
    if run.n_reference <= cfg.k:
        run.status = "too_few_reference"
        run.message = (f"{run.n_reference} reference images indexed before {run.since} "
                       f"(need more than k={cfg.k}): {run.n_new} new images not checked; "
                       "they become references for the next run")
        return
    det = detect_drift(ref, new, new_ids=got_new, reference_ids=got_ref, k=cfg.k,
                       percentile=cfg.percentile, min_cluster_size=cfg.min_cluster_size)
    _label_clusters(db, det.clusters)
    run.detection, run.status = det, "checked"
    run.message = (f"{det.n_new} new images against {det.n_reference} references: "
                   f"{det.n_novel} novel, {det.n_isolated} isolated cluster(s), "
                   f"{det.n_noise} scattered")


def run_drift(
    platform: Any,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    seed: int = 0,
    progress: bool = False,
    retrain_wait_s: float = 2.0,
) -> DriftRun:
    """Check the images ingested in ``[since, until)`` against those indexed before, record a
    ``drift_reports`` row and start retraining when isolated clusters are found.

    ``platform`` is a ``carsearch.platform.runtime.Platform``. By default the window runs
    from the end of the last report's window to now; the very first run, with no report to
    follow and no ``since``, records a baseline (nothing is checked). A run given ``since``
    does not move the default window. One run at a time across processes (a lease in the
    database): a run that finds another in progress is skipped, so one drift event starts
    at most one retrain.
    """
    holder = f"{process_name()}:{threading.get_ident()}"
    with leases.held(platform.db, DRIFT_LEASE, holder, DRIFT_LEASE_TTL_S) as other:
        if other is not None:
            return _skipped(platform, other)
        return _run(platform, since=since, until=until, seed=seed, progress=progress,
                    retrain_wait_s=retrain_wait_s)


DRIFT_LEASE = "drift-run"
DRIFT_LEASE_TTL_S = 900.0  # the longest a crashed run blocks the next one


def _skipped(platform: Any, other: str) -> DriftRun:
    """Another drift run holds the lease: this one does nothing (no report, no retrain)."""
    version = platform.registry.require_serving()
    log.info("drift run skipped: another run (%s) is in progress", other)
    METRICS.drift_runs.labels("skipped").inc()
    return DriftRun(status="skipped", message=f"skipped: another drift run ({other}) is in "
                    "progress", model_version=version.name, collection=version.collection,
                    since=None, until=datetime.now(UTC).isoformat(), advances=False, params={})


def _run(platform: Any, *, since: datetime | None, until: datetime | None, seed: int,
         progress: bool, retrain_wait_s: float) -> DriftRun:
    cfg: DriftSettings = platform.settings.drift
    set_threads(platform.settings.threads.faiss)
    version = platform.registry.require_serving()
    now = datetime.now(UTC)
    until = as_utc(until) if until is not None else now
    explicit = since is not None
    since = as_utc(since) if since is not None else reports.previous_until(platform.db)
    if since is not None and since >= until:
        raise ConfigError(f"the window is empty: since {_iso(since)} is not before "
                          f"{_iso(until)}")
    params = {"k": cfg.k, "percentile": cfg.percentile, "min_cluster_size": cfg.min_cluster_size,
              "min_new": cfg.min_new, "max_reference": cfg.max_reference,
              "max_new": cfg.max_new, "seed": seed}
    run = DriftRun(status="baseline", message="", model_version=version.name,
                   collection=version.collection, since=_iso(since), until=str(_iso(until)),
                   advances=not explicit, params=params)
    if since is None:
        _, run.n_reference_available = images.sample_ids(
            platform.db, images.indexed(Image.collection == version.image_collection,
                                        Image.ingested_at < until), 0)
        run.message = (f"baseline: no earlier drift report; the {run.n_reference_available} "
                       f"images indexed before {run.until} are the reference for the next run")
    else:
        _check(platform, run, version, since, until, seed, progress)
        run.advances = run.advances and run.status in _ADVANCING
    run.retrain = {"triggered": run.retrain_triggered, "started": False,
                   "state": "starting" if run.retrain_triggered else "not needed"}
    run.report_id = reports.record_drift(platform.db, run.to_dict(), version.id,
                                         n_images=run.n_new, n_isolated=run.n_isolated,
                                         retrain_triggered=run.retrain_triggered)
    if run.retrain_triggered:
        clusters = run.detection.clusters if run.detection else []
        run.label_tasks = labels.create_tasks(
            platform.db, run.report_id, version.image_collection,
            [labels.NewTask(c.all_ids or c.member_ids, c.nearest_class_name,
                            suggestion(c.nearest_class_name)) for c in clusters])
        near = ", ".join(str(c.nearest_class_name or c.nearest_reference_id) for c in clusters)
        log.warning("drift: %d isolated cluster(s) among %d new images (nearest known: %s); "
                    "retraining triggered", run.n_isolated, run.n_new, near)
        run.retrain = {"triggered": True, **_request(platform, run, version.image_collection),
                       **_retrain(platform, run, now, retrain_wait_s)}
        reports.update_drift(platform.db, run.report_id, run.to_dict())
    METRICS.drift_runs.labels(run.status).inc()
    log.info("%s", run.message)
    return run
