"""The continuous ingest worker: inbox -> queue -> stages -> Milvus + database.

Order per batch: claim jobs, decode (quarantining bad files), embed with the serving
version, upsert vectors into Milvus, write the rows, mark the jobs done. A crash at any
point leaves jobs `running` with a stale heartbeat; another worker (or this one after a
restart) claims them again after the visibility timeout, and the replay lands on the
same content-derived ids, so nothing is lost and nothing doubles.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carsearch.ingest.pipeline import (
    IngestItem,
    IngestSummary,
    Prepared,
    platform_writer,
    prepare,
    quarantine,
    storable_problem,
    store_path,
)
from carsearch.monitoring.scheduler import LoopState, install_stop_handlers, supervise
from carsearch.platform import collections
from carsearch.platform.collections import DEFAULT_COLLECTION
from carsearch.platform.db import queue
from carsearch.platform.errors import ImageRejectedError
from carsearch.platform.images import sha256_file
from carsearch.platform.runtime import Platform
from carsearch.platform.telemetry import METRICS

log = logging.getLogger(__name__)

MAX_SIDECAR_BYTES = 65_536
CRASH_ENV = "CARSEARCH_CRASH_AT"


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at a named point when CARSEARCH_CRASH_AT=name.

    The crash-safety tests use it to kill a real worker subprocess exactly between two
    stages; unset (always, outside those tests) it does nothing.
    """
    if os.environ.get(CRASH_ENV) == name:
        log.warning("crash point %s reached: killing the process", name)
        os.kill(os.getpid(), signal.SIGKILL)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _read_sidecar(path: Path) -> tuple[dict[str, Any], Path | None]:
    for side in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if side.is_file() and side != path:
            try:
                if side.stat().st_size > MAX_SIDECAR_BYTES:
                    raise ValueError(f"larger than {MAX_SIDECAR_BYTES} bytes")
                meta = json.loads(side.read_text())
                if not isinstance(meta, dict):
                    raise ValueError("not a JSON object")
                problem = storable_problem(meta, MAX_SIDECAR_BYTES)
                if problem is not None:
                    raise ValueError(problem)
                return meta, side
            except (ValueError, OSError) as exc:
                log.warning("ignoring unreadable sidecar %s: %s", side, exc)
                return {"sidecar_error": str(exc)[:200]}, side
    return {}, None


def scan_inbox(platform: Platform, inbox: Path, collection: str = DEFAULT_COLLECTION) -> int:
    """Move new files from the inbox into the image store and queue a job for each (for
    ``collection``).

    The job is queued before the file moves: a crash in between leaves the file in the
    inbox (scanned again; the duplicate job is a no-op) rather than a file nobody owns.
    """
    if not inbox.is_dir():
        return 0
    store_dir = platform.settings.image_dir
    n = 0
    for path in sorted(p for p in inbox.iterdir() if p.is_file()):
        if path.name.startswith(".") or path.suffix.lower() == ".json":
            continue
        meta, sidecar = _read_sidecar(path)
        try:
            digest = sha256_file(path)
        except OSError as exc:  # vanished or unreadable: leave it for the next scan
            log.warning("cannot read %s: %s", path, exc)
            continue
        dest = store_path(store_dir, digest, path.suffix)
        source = str(meta.pop("source", "inbox"))
        queue.enqueue(platform.db, [{"path": str(dest), "source": source, "meta": meta,
                                     "original_name": path.name,
                                     "collection": collection}])
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            path.unlink()
        else:
            tmp = dest.with_name(dest.name + ".part")
            shutil.move(str(path), tmp)
            tmp.rename(dest)
        if sidecar is not None:
            sidecar.unlink(missing_ok=True)
        n += 1
    if n:
        log.info("queued %d new files from %s", n, inbox)
    return n


@dataclass
class WorkerStats:
    batches: int = 0
    summary: IngestSummary = field(default_factory=IngestSummary)
    failed_batches: int = 0


class IngestWorker:
    """Claims jobs from the queue and runs the ingest stages on them, batch by batch."""

    def __init__(
        self,
        platform: Platform,
        *,
        worker_id: str | None = None,
        inbox: Path | None = None,
        batch_size: int = 32,
        visibility_timeout: float = 60.0,
        poll_interval: float = 1.0,
        inbox_collection: str = DEFAULT_COLLECTION,
    ) -> None:
        self.p = platform
        self.inbox_collection = inbox_collection
        self.worker_id = worker_id or default_worker_id()
        self.inbox = inbox
        self.batch_size = batch_size
        self.visibility_timeout = visibility_timeout
        self.poll_interval = poll_interval
        self.stats = WorkerStats()
        self.stop_event = threading.Event()
        # Test hook: called at the named points of a batch ("after_upsert", "after_rows"),
        # where the race tests run a promotion or a reconcile.
        self.on_point: Callable[[str], None] | None = None
        self._kinds: dict[str, collections.Kind] = {}

    # -- loop ------------------------------------------------------------------------
    def run_once(self) -> WorkerStats:
        """Scan the inbox, then drain every ready job, then return.

        Milvus is asked first: while it is down the round fails (and the loop backs off)
        before any job is claimed, so an outage does not use up the jobs' attempts.
        """
        if self.inbox is not None:
            scan_inbox(self.p, self.inbox, self.inbox_collection)
        self.p.store.list_collections()
        indexed_before = self.stats.summary.indexed
        while not self.stop_event.is_set():
            jobs = queue.claim(self.p.db, self.worker_id, self.batch_size,
                               visibility_timeout=self.visibility_timeout)
            if not jobs:
                break
            self.process(jobs)
        if self.stats.summary.indexed > indexed_before and self.p.store.needs_flush:
            # Drained: seal the growing segment so searches stay fast (Milvus Lite
            # searches unflushed rows by brute force, far slower; a server seals itself).
            for version in self.p.registry.all_serving():
                if self.p.store.has_collection(version.collection):
                    self.p.store.flush(version.collection)
        return self.stats

    def run_forever(self, state: LoopState | None = None) -> WorkerStats:
        """Work until SIGTERM or SIGINT (or ``stop_event``), then finish the current batch
        and return. A supervised loop: a failing round (the database gone, say) is
        logged and retried with backoff; ``state`` shows how it goes."""
        restore = install_stop_handlers(self.stop_event)
        log.info("worker %s started", self.worker_id)
        try:
            supervise(state or LoopState("ingest-worker"), self.run_once,
                      interval_s=self.poll_interval, stop=self.stop_event)
        finally:
            restore()
        log.info("worker %s stopped", self.worker_id)
        return self.stats

    # -- one batch ---------------------------------------------------------------------
    def process(self, jobs: Sequence[queue.ClaimedJob]) -> None:
        db = self.p.db
        s = self.stats.summary
        self.stats.batches += 1
        good: list[tuple[queue.ClaimedJob, Prepared]] = []
        for n, job in enumerate(jobs):
            if n == 1:
                crash_point("mid_batch")
            payload = job.payload
            item = IngestItem(Path(payload["path"]), str(payload.get("source") or "queue"),
                              dict(payload.get("meta") or {}),
                              str(payload.get("collection") or DEFAULT_COLLECTION))
            s.seen += 1
            try:
                vehicle_labels = self._kind(item.collection).vehicle_labels
            except collections.CollectionError as exc:
                queue.fail(db, self.worker_id, [job.id], str(exc))  # retried, then dead
                continue
            try:
                good.append((job, prepare(item, self.p.settings.max_image_pixels,
                                          vehicle_labels=vehicle_labels)))
            except ImageRejectedError as exc:
                if exc.reason == "file not found" or exc.reason.startswith("unreadable"):
                    # not arrived yet, or a share briefly gone: retried, then dead
                    queue.fail(db, self.worker_id, [job.id], f"{item.path}: {exc.reason}")
                    continue
                quarantine(db, item, exc.reason)
                queue.complete(db, self.worker_id, [job.id], note=f"quarantined: {exc.reason}")
                METRICS.ingested.labels("quarantined").inc()
                s.quarantined += 1
                s.reasons[exc.reason] = s.reasons.get(exc.reason, 0) + 1
        by_collection: dict[str, list[tuple[queue.ClaimedJob, Prepared]]] = {}
        for job, p in good:
            by_collection.setdefault(p.item.collection, []).append((job, p))
        for name, part in by_collection.items():
            ids = [j.id for j, _ in part]
            with self._heartbeating(ids):
                self._store_batch(part, ids, name)

    def _kind(self, name: str) -> collections.Kind:
        kind = self._kinds.get(name)
        if kind is None:
            kind = self._kinds[name] = collections.kind_of(self.p.db, name)
        return kind

    @contextmanager
    def _heartbeating(self, ids: list[int]) -> Iterator[None]:
        """Heartbeat the batch's jobs now and every third of the visibility timeout until
        the batch is over, so a slow batch (a large model, a slow Milvus) is not reclaimed
        by another worker while it is still running."""
        done = threading.Event()

        def beat() -> None:
            while True:
                try:
                    queue.heartbeat(self.p.db, self.worker_id, ids)
                except Exception:  # a missed beat is retried; the batch decides the outcome
                    log.warning("heartbeat failed", exc_info=True)
                if done.wait(self.visibility_timeout / 3):
                    return

        t = threading.Thread(target=beat, name="ingest-heartbeat", daemon=True)
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()

    def _hook(self, point: str) -> None:
        crash_point(point)
        if self.on_point is not None:
            self.on_point(point)

    def _store_batch(self, good: list[tuple[queue.ClaimedJob, Prepared]], ids: list[int],
                     collection: str = DEFAULT_COLLECTION) -> None:
        db, s = self.p.db, self.stats.summary
        batch = [p for _, p in good]
        s.fields_rejected += sum(len(p.meta.rejected) for p in batch)
        try:
            # The store opens here: an unreachable Milvus fails the batch, not the worker.
            n = platform_writer(self.p, self._hook, collection).write(batch)
        except Exception as exc:  # the worker must outlive any one batch
            log.exception("batch of %d failed; jobs go back with backoff", len(ids))
            queue.fail(db, self.worker_id, ids, f"{type(exc).__name__}: {exc}")
            self.stats.failed_batches += 1
            METRICS.batches.labels("failed").inc()
            return
        queue.complete(db, self.worker_id, ids)
        METRICS.batches.labels("ok").inc()
        METRICS.ingested.labels("indexed").inc(n)
        s.indexed += n
