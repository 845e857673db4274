"""The drift job: cluster-density checks on new embeddings; isolated clusters trigger retraining.

Detection (``detect_drift``, pure numpy/FAISS on unit vectors, cosine = inner product):

1. Density of a point = the mean similarity to its ``k`` nearest *reference* neighbours.
2. The threshold is a low percentile of the reference set's own leave-one-out density, so
   "novel" means "sparser than all but ``percentile``% of the catalogue already is".
3. Novel new points are linked when one is among the other's ``k`` nearest novel points,
   their similarity reaches the same threshold (as close as catalogue neighbours normally
   are) and exceeds each one's similarity to its nearest reference (closer to each other
   than to anything indexed). The last rule keeps apart the sparse fringes of a known class
   that the reference sample covers thinly. Connected components are candidate clusters.
4. A component of at least ``min_cluster_size`` points is an *isolated cluster*: a group of
   new images dense among themselves and far from everything indexed before, which is what
   a vehicle the model has not seen looks like. Scattered novel points (and smaller
   components) are noise: odd photos, not a new vehicle.

The job (``run_drift``) picks the images ingested in a window (by default since the last
report), samples references from the images indexed before it, reads both sets of vectors
from the serving version's Milvus collection, detects, records a ``drift_reports`` row and,
when isolated clusters are found, starts the configured retrain command (at most once per
cooldown).
"""

from __future__ import annotations

import hashlib
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

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sqlalchemy import func, select
from tqdm.auto import tqdm

from carsearch.platform.db import Database, DriftReport, Image, ImageStatus, ModelVersion
from carsearch.platform.errors import ConfigError
from carsearch.platform.exact import set_threads
from carsearch.platform.settings import DriftSettings

__all__ = [
    "DriftDetection",
    "DriftRun",
    "IsolatedCluster",
    "detect_drift",
    "knn_density",
    "run_drift",
]

log = logging.getLogger(__name__)

EXAMPLES = 10  # member image ids kept per cluster in the report
_READ_BATCH = 1000
_INT63 = (1 << 63) - 1


# --- detection ------------------------------------------------------------------------------


@dataclass
class IsolatedCluster:
    """A group of new images dense among themselves and far from the reference set."""

    size: int
    member_ids: list[int]  # up to EXAMPLES, the most central first
    mean_density: float  # members' mean kNN similarity to the references (under threshold)
    cohesion: float  # members' mean similarity to the cluster's centroid
    nearest_reference_id: int | None  # the reference image nearest to the centroid
    nearest_similarity: float | None
    nearest_class_name: str | None = None  # filled in by the job from the images table
    nearest_make: str | None = None


@dataclass
class DriftDetection:
    """What ``detect_drift`` found, with the thresholds it used."""

    k: int  # neighbours actually used (k capped by the reference size)
    percentile: float
    min_cluster_size: int
    threshold: float  # density under which a new point is novel; also the link level
    n_reference: int
    n_new: int
    n_novel: int
    n_noise: int  # novel points outside every isolated cluster
    reference_density: dict[str, float]
    new_density: dict[str, float]
    clusters: list[IsolatedCluster] = field(default_factory=list)

    @property
    def n_isolated(self) -> int:
        return len(self.clusters)

    @property
    def novel_fraction(self) -> float:
        return self.n_novel / self.n_new if self.n_new else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_isolated"] = self.n_isolated
        d["novel_fraction"] = self.novel_fraction
        d["expected_novel_fraction"] = self.percentile / 100.0
        return d


def _unit_matrix(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {arr.shape}")
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contain NaN or infinity")
    if len(arr) and not np.allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-3):
        raise ValueError(f"{name} must be L2-normalised")
    return arr


def _flat_index(vectors: np.ndarray) -> Any:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def knn_density(
    reference: np.ndarray, queries: np.ndarray | None, k: int, *, index: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(density, nearest_similarity, nearest_row)`` of each query: its mean similarity to
    its ``k`` nearest references, the similarity to the nearest one and that one's row.
    ``queries=None`` means the references themselves, each left out of its own neighbours
    (leave-one-out density)."""
    index = index if index is not None else _flat_index(reference)
    if queries is not None:
        sims, rows = index.search(queries, k)
    else:
        n = len(reference)
        sims, rows = index.search(reference, k + 1)
        keep = rows != np.arange(n)[:, None]
        # Exact duplicates can push a point's own row out of its k + 1: then drop the last.
        keep[keep.all(axis=1), -1] = False
        sims, rows = sims[keep].reshape(n, k), rows[keep].reshape(n, k)
    return sims.mean(axis=1, dtype=np.float64), sims[:, 0].astype(np.float64), rows[:, 0]


def _stats(x: np.ndarray) -> dict[str, float]:
    if not len(x):
        return {}
    p5, p50 = np.percentile(x, [5, 50])
    return {"min": float(x.min()), "p5": float(p5), "p50": float(p50), "mean": float(x.mean())}


def _components(novel: np.ndarray, nearest_ref: np.ndarray, k: int, level: float) -> np.ndarray:
    """Component labels of the novel points' kNN graph. Two points are linked when one is
    among the other's ``k`` nearest, their similarity reaches ``level`` and they are closer
    to each other than either is to its nearest reference (isolated *together*)."""
    m = len(novel)
    kk = min(k, m - 1)
    sims, rows = _flat_index(novel).search(novel, kk + 1)
    src = np.repeat(np.arange(m), kk + 1)
    dst, w = rows.ravel(), sims.ravel()
    ok = (dst >= 0) & (dst != src) & (w >= level)
    ok &= (w > nearest_ref[src]) & (w > nearest_ref[np.where(dst >= 0, dst, 0)])
    graph = coo_matrix((np.ones(int(ok.sum())), (src[ok], dst[ok])), shape=(m, m))
    _, labels = connected_components(graph, directed=True, connection="weak")
    return np.asarray(labels)


def _cluster(
    members: np.ndarray, vectors: np.ndarray, ids: np.ndarray, density: np.ndarray,
    ref_index: Any, ref_ids: np.ndarray | None,
) -> IsolatedCluster:
    x = vectors[members]
    centroid = x.mean(axis=0)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    to_centre = x @ centroid
    order = np.argsort(-to_centre, kind="stable")[:EXAMPLES]
    sim, row = ref_index.search(centroid[None, :].astype(np.float32), 1)
    r = int(row[0, 0])
    return IsolatedCluster(
        size=len(members),
        member_ids=[int(ids[members[i]]) for i in order],
        mean_density=float(density[members].mean()),
        cohesion=float(to_centre.mean()),
        nearest_reference_id=(int(ref_ids[r]) if ref_ids is not None else r) if r >= 0 else None,
        nearest_similarity=float(sim[0, 0]) if r >= 0 else None,
    )


def detect_drift(
    reference: np.ndarray,
    new: np.ndarray,
    *,
    new_ids: Sequence[int] | np.ndarray | None = None,
    reference_ids: Sequence[int] | np.ndarray | None = None,
    k: int = 10,
    percentile: float = 5.0,
    min_cluster_size: int = 5,
) -> DriftDetection:
    """Find isolated clusters of ``new`` unit vectors relative to ``reference`` (see the
    module docstring). Ids default to row numbers. Needs more than one reference vector."""
    ref = _unit_matrix(reference, "reference vectors")
    cur = _unit_matrix(new, "new vectors")
    if len(ref) < 2:
        raise ValueError("drift detection needs at least two reference vectors")
    if cur.shape[1] != ref.shape[1]:
        raise ValueError(f"new vectors have dimension {cur.shape[1]}, references {ref.shape[1]}")
    if k < 1 or min_cluster_size < 2 or not 0.0 < percentile < 100.0:
        raise ValueError("need k >= 1, min_cluster_size >= 2 and 0 < percentile < 100")
    ids = np.arange(len(cur)) if new_ids is None else np.asarray(new_ids, dtype=np.int64)
    rids = None if reference_ids is None else np.asarray(reference_ids, dtype=np.int64)
    if len(ids) != len(cur) or (rids is not None and len(rids) != len(ref)):
        raise ValueError("ids and vectors differ in length")
    k_used = min(k, len(ref) - 1)
    ref_index = _flat_index(ref)
    ref_density, _, _ = knn_density(ref, None, k_used, index=ref_index)
    threshold = float(np.percentile(ref_density, percentile))
    if len(cur):
        new_density, nearest, _ = knn_density(ref, cur, k_used, index=ref_index)
    else:
        new_density, nearest = np.empty(0), np.empty(0)
    novel = np.flatnonzero(new_density < threshold)
    clusters: list[IsolatedCluster] = []
    if len(novel) >= min_cluster_size:
        labels = _components(cur[novel], nearest[novel], max(k_used, min_cluster_size),
                             threshold)
        for label in np.unique(labels):
            members = novel[labels == label]
            if len(members) >= min_cluster_size:
                clusters.append(_cluster(members, cur, ids, new_density, ref_index, rids))
    clusters.sort(key=lambda c: (-c.size, c.mean_density))
    return DriftDetection(
        k=k_used,
        percentile=float(percentile),
        min_cluster_size=min_cluster_size,
        threshold=threshold,
        n_reference=len(ref),
        n_new=len(cur),
        n_novel=len(novel),
        n_noise=len(novel) - sum(c.size for c in clusters),
        reference_density=_stats(ref_density),
        new_density=_stats(new_density),
        clusters=clusters,
    )


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


def _utc(dt: datetime) -> datetime:
    """Aware UTC; naive values (SQLite gives them back so) are taken as UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _iso(dt: datetime | None) -> str | None:
    return _utc(dt).isoformat() if dt is not None else None


def previous_until(db: Database, page: int = 500) -> datetime | None:
    """Where the default window starts: the end of the newest report that advanced it."""
    offset = 0
    while True:
        with db.session() as s:
            rows = list(s.scalars(select(DriftReport.report).order_by(DriftReport.id.desc())
                                  .offset(offset).limit(page)))
        for rep in rows:
            if (rep or {}).get("advances") and rep.get("until"):
                return _utc(datetime.fromisoformat(rep["until"]))
        if len(rows) < page:
            return None
        offset += page


def _pivot(seed: int) -> int:
    if seed == 0:
        return 0
    return int(hashlib.sha256(f"carsearch-drift-{seed}".encode()).hexdigest()[:16], 16) & _INT63


def sample_ids(db: Database, where: list[Any], n: int, seed: int = 0) -> tuple[list[int], int]:
    """``(ids, total)``: up to ``n`` image ids matching ``where``, and how many match.

    Image ids are the first 63 bits of the images' sha256, so a run of consecutive ids from a
    seeded starting point (wrapping round) is a uniform, deterministic sample that the
    primary-key index serves without reading every row.
    """
    pivot = _pivot(seed)
    base = select(Image.id).where(*where).order_by(Image.id)
    with db.session() as s:
        total = int(s.scalar(select(func.count()).select_from(Image).where(*where)) or 0)
        ids = [int(i) for i in s.scalars(base.where(Image.id >= pivot).limit(n))]
        if len(ids) < n and pivot:
            ids += [int(i) for i in s.scalars(base.where(Image.id < pivot).limit(n - len(ids)))]
    return ids, total


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
            got, mat = store.vectors(collection, chunk)
            found.append(got)
            mats.append(mat)
            bar.update(len(chunk))
    if not found:
        return np.empty(0, np.int64), np.empty((0, store.dimension(collection)), np.float32)
    return np.concatenate(found), np.concatenate(mats)


def _label_clusters(db: Database, clusters: list[IsolatedCluster]) -> None:
    wanted = {c.nearest_reference_id for c in clusters if c.nearest_reference_id is not None}
    if not wanted:
        return
    with db.session() as s:
        rows = s.execute(select(Image.id, Image.class_name, Image.make)
                         .where(Image.id.in_(wanted))).all()
    labels = {int(i): (cls, make) for i, cls, make in rows}
    for c in clusters:
        c.nearest_class_name, c.nearest_make = labels.get(c.nearest_reference_id or -1,
                                                          (None, None))


# --- retraining -----------------------------------------------------------------------------


def last_retrain_start(db: Database, after: datetime) -> tuple[int, str] | None:
    """``(report id, created_at)`` of the newest report after ``after`` that started the
    retrain command, or None."""
    with db.session() as s:
        rows = s.execute(select(DriftReport.id, DriftReport.created_at, DriftReport.report)
                         .where(DriftReport.created_at >= after)
                         .order_by(DriftReport.id.desc())).all()
    for rid, created, rep in rows:
        if ((rep or {}).get("retrain") or {}).get("started"):
            return int(rid), str(_iso(created))
    return None


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
    prior = last_retrain_start(platform.db, now - timedelta(hours=cfg.retrain_cooldown_h))
    if prior is not None and cfg.retrain_cooldown_h > 0:
        return {"command": args, "started": False,
                "state": f"cooldown: started by report {prior[0]} at {prior[1]} "
                         f"(cooldown {cfg.retrain_cooldown_h:g} h)"}
    env = {**os.environ, "CARSEARCH_DRIFT_REPORT_ID": str(run.report_id),
           "CARSEARCH_DRIFT_MODEL_VERSION": run.model_version}
    log_path = platform.settings.data_dir / "drift" / f"retrain-{run.report_id}.log"
    return start_retrain(args, log_path=log_path, env=env, wait_s=wait_s)


# --- the whole run --------------------------------------------------------------------------


def _record(db: Database, run: DriftRun, version_id: int) -> int:
    with db.session() as s:
        row = DriftReport(model_version_id=version_id, n_images=run.n_new,
                          n_isolated=run.n_isolated, retrain_triggered=run.retrain_triggered,
                          report=run.to_dict())
        s.add(row)
        s.flush()
        run.report_id = int(row.id)
    return run.report_id


def _update(db: Database, run: DriftRun) -> None:
    with db.session() as s:
        row = s.get(DriftReport, run.report_id)
        if row is not None:
            row.report = run.to_dict()


def _indexed(*where: Any) -> list[Any]:
    return [Image.status == ImageStatus.indexed, *where]


def _check(platform: Any, run: DriftRun, version: ModelVersion, since: datetime,
           until: datetime, seed: int, progress: bool) -> None:
    """Fill ``run`` with the window's images, the references and the detection."""
    cfg: DriftSettings = platform.settings.drift
    db, store = platform.db, platform.store
    window = _indexed(Image.ingested_at >= since, Image.ingested_at < until)
    new_ids, run.n_new_in_window = sample_ids(db, window, cfg.max_new, seed)
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
    ref_ids, run.n_reference_available = sample_ids(
        db, _indexed(Image.ingested_at < since), cfg.max_reference, seed)
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
    does not move the default window.
    """
    cfg: DriftSettings = platform.settings.drift
    set_threads(platform.settings.threads.faiss)
    version = platform.registry.require_serving()
    now = datetime.now(UTC)
    until = _utc(until) if until is not None else now
    explicit = since is not None
    since = _utc(since) if since is not None else previous_until(platform.db)
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
        _, run.n_reference_available = sample_ids(
            platform.db, _indexed(Image.ingested_at < until), 0)
        run.message = (f"baseline: no earlier drift report; the {run.n_reference_available} "
                       f"images indexed before {run.until} are the reference for the next run")
    else:
        _check(platform, run, version, since, until, seed, progress)
        run.advances = run.advances and run.status in _ADVANCING
    run.retrain = {"triggered": run.retrain_triggered, "started": False,
                   "state": "starting" if run.retrain_triggered else "not needed"}
    _record(platform.db, run, version.id)
    if run.retrain_triggered:
        clusters = run.detection.clusters if run.detection else []
        near = ", ".join(str(c.nearest_class_name or c.nearest_reference_id) for c in clusters)
        log.warning("drift: %d isolated cluster(s) among %d new images (nearest known: %s); "
                    "retraining triggered", run.n_isolated, run.n_new, near)
        run.retrain = {"triggered": True, **_retrain(platform, run, now, retrain_wait_s)}
        _update(platform.db, run)
    log.info("%s", run.message)
    return run
