"""The continuous ingest worker: inbox -> queue -> stages -> Milvus + database.

Order per batch: claim jobs, decode (quarantining bad files), embed with the serving
version, upsert vectors into Milvus, write the rows, mark the jobs done. A crash at any
point leaves jobs `running` with a stale heartbeat; another worker (or this one after a
restart) claims them again after the visibility timeout, and the replay lands on the
same content-derived ids, so nothing is lost and nothing doubles.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
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
from carsearch.platform import collections
from carsearch.platform.collections import DEFAULT_COLLECTION
from carsearch.platform.db import queue
from carsearch.platform.errors import ImageRejectedError
from carsearch.platform.images import sha256_file
from carsearch.platform.runtime import Platform
from carsearch.platform.scheduler import LoopState, install_stop_handlers, supervise
from carsearch.platform.telemetry import METRICS

log = logging.getLogger(__name__)

MAX_SIDECAR_BYTES = 65_536
CRASH_ENV = "CARSEARCH_CRASH_AT"
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
PAUSE_CAUSES = ("no_serving_version", "vector_store", "disk_full")
DISK_PROBE_BYTES = 65_536
WAIT_FOR_VERSION_S = 10.0


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at a named point when CARSEARCH_CRASH_AT=name.

    The crash-safety tests use it to kill a real worker subprocess exactly between two
    stages; unset (always, outside those tests) it does nothing.
    """
    if os.environ.get(CRASH_ENV) == name:
        log.warning("crash point %s reached: killing the process", name)
        os.kill(os.getpid(), signal.SIGKILL)


# Images decoded and embedded at a time inside a claimed batch: the worker's peak memory
# is this many reduced images (at most DECODE_MAX_SIDE a side), whatever the batch size.
DECODE_CHUNK = 8


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _read_sidecar(side: Path) -> dict[str, Any]:
    """A sidecar's metadata, or ``{"sidecar_error": why}``: an unreadable sidecar costs its
    labels, never its image or the scan (a 40 KB file of 20,000 nested lists included)."""
    try:
        if side.is_symlink():
            raise ValueError("a symbolic link: refused (the inbox takes files, not links)")
        if side.stat().st_size > MAX_SIDECAR_BYTES:
            raise ValueError(f"larger than {MAX_SIDECAR_BYTES} bytes")
        meta = json.loads(side.read_bytes())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        problem = storable_problem(meta, MAX_SIDECAR_BYTES)
        if problem is not None:
            raise ValueError(problem)
        return meta
    except (ValueError, OSError, RecursionError, MemoryError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        log.warning("ignoring unreadable sidecar %s: %s", side, why)
        return {"sidecar_error": why[:200]}


def sidecar_names(name: str) -> tuple[str, ...]:
    """The sidecar names an inbox file ``name`` may have: NAME.ext.json, then NAME.json."""
    stem = Path(name).stem
    return tuple(dict.fromkeys(n for n in (name + ".json", stem + ".json") if n != name))


def _arrival(st: os.stat_result) -> float:
    """When a file arrived in the inbox: a rename into it changes the ctime."""
    return max(st.st_mtime, st.st_ctime)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


@dataclass
class ScanResult:
    """What one inbox scan did. ``waiting``: files younger than the settle time (an image
    waiting for its sidecar, or a sidecar for its image), due in ``next_due_s``; ``left``:
    files left in the inbox, with why; ``disk_full``: the image store refused a move."""

    queued: int = 0
    waiting: int = 0
    next_due_s: float | None = None
    refused: int = 0
    orphans_removed: int = 0
    left: dict[str, str] = field(default_factory=dict)
    disk_full: str | None = None

    def _wait(self, due_s: float) -> None:
        self.waiting += 1
        self.next_due_s = due_s if self.next_due_s is None else min(self.next_due_s, due_s)


def scan_inbox(platform: Platform, inbox: Path, collection: str = DEFAULT_COLLECTION, *,
               settle_s: float | None = None,
               clock: Callable[[], float] = time.time) -> ScanResult:
    """Move new files from the inbox into the image store and queue a job for each (for
    ``collection``).

    An image is taken with its sidecar at once; an image without one waits until it has
    been in the inbox for the settle time (CARSEARCH_INGEST__SETTLE_S), so a sidecar
    written just after it still counts. A sidecar that arrived more than the settle time
    before an image is not that image's; a sidecar with no image after the settle time is
    removed, with a log line. A symbolic link is refused: quarantined with that reason and
    removed from the inbox; its target is never read.

    Each file is handled alone: whatever goes wrong with one (an unreadable file, a full
    image store) leaves that file in the inbox with a logged reason, and the scan goes on.
    The job is queued before the file moves: a crash in between leaves the file in the
    inbox (scanned again; the duplicate job is a no-op); a move that fails withdraws its
    job, so a file that cannot move never queues a job per round.
    """
    res = ScanResult()
    if not inbox.is_dir():
        return res
    settle = platform.settings.ingest.settle_s if settle_s is None else settle_s
    entries: dict[str, os.stat_result] = {}
    for entry in os.scandir(inbox):
        if entry.name.startswith("."):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:  # gone meanwhile
            continue
        if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            entries[entry.name] = st
    sidecars = {n for n in entries if n.lower().endswith(".json")}
    spoken_for: set[str] = set()
    now = clock()
    for name in sorted(entries.keys() - sidecars):
        st = entries[name]
        side = next((n for n in sidecar_names(name) if n in sidecars), None)
        if side is not None and _arrival(entries[side]) < _arrival(st) - settle:
            side = None  # there before this image by more than the settle time: an orphan
        age = now - _arrival(st)
        if side is None and age < settle:
            res._wait(settle - age)
            continue
        if side is not None:
            spoken_for.add(side)
        try:
            _take(platform, inbox / name, inbox / side if side else None, collection, res)
        except Exception as exc:  # this file alone: it stays, with the reason logged
            why = f"{type(exc).__name__}: {exc}"[:300]
            if is_disk_full(exc):
                res.disk_full = f"the image store is full ({platform.settings.image_dir}): {why}"
            res.left[name] = why
            log.warning("leaving %s in the inbox: %s", inbox / name, why)
    for name in sorted(sidecars - spoken_for):
        age = now - _arrival(entries[name])
        if age < settle:
            res._wait(settle - age)
            continue
        try:
            (inbox / name).unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove orphan sidecar %s: %s", inbox / name, exc)
            continue
        res.orphans_removed += 1
        log.warning("removed orphan sidecar %s: no image came within %g s of it",
                    inbox / name, settle)
    if res.queued:
        log.info("queued %d new files from %s", res.queued, inbox)
    return res


def _take(platform: Platform, path: Path, sidecar: Path | None, collection: str,
          res: ScanResult) -> None:
    if path.is_symlink():
        reason = "a symbolic link: refused (the inbox takes files, not links)"
        quarantine(platform.db, IngestItem(path, "inbox", collection=collection), reason,
                   follow_links=False)
        path.unlink()
        res.refused += 1
        return
    meta = _read_sidecar(sidecar) if sidecar is not None else {}
    digest = sha256_file(path)
    dest = store_path(platform.settings.image_dir, digest, path.suffix)
    source = str(meta.pop("source", "inbox"))
    ids = queue.enqueue(platform.db, [{"path": str(dest), "source": source, "meta": meta,
                                       "original_name": path.name,
                                       "collection": collection}])
    try:
        _move_into_store(path, dest)
    except BaseException:
        queue.withdraw(platform.db, ids)
        raise
    if sidecar is not None:
        sidecar.unlink(missing_ok=True)
    res.queued += 1


def _move_into_store(path: Path, dest: Path) -> None:
    """Move an inbox file to its place in the image store (under a temporary name, then
    renamed). A move that fails leaves the inbox file as it was and no partial copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and not dest.is_symlink():
        path.unlink()
        return
    tmp = dest.with_name(dest.name + ".part")
    try:
        shutil.move(str(path), tmp)
    except BaseException:
        if path.exists():  # the copy failed part-way: the original is still whole
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


@dataclass(frozen=True)
class Pause:
    """Why the worker holds back claiming: a lasting failure outside the jobs."""

    cause: str  # one of PAUSE_CAUSES
    reason: str
    since: float


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
        decode_chunk: int = DECODE_CHUNK,
    ) -> None:
        self.p = platform
        self.decode_chunk = max(1, decode_chunk)
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
        self.pause: Pause | None = None
        self.last_scan = ScanResult()
        # The loop's state (health, loop_status): a pause is shown there. run_forever sets it.
        self.loop_state: LoopState | None = None
        self._next_prune = 0.0  # monotonic time of the next prune of old done rows
        self.pruned = 0

    # -- pauses ----------------------------------------------------------------------
    def _pause(self, cause: str, reason: str) -> None:
        """Hold back claiming for a lasting failure outside the jobs; says why in the
        loop's state (health, ``ingest status``) and the carsearch_ingest_paused gauge."""
        if self.pause is None or self.pause.reason != reason:
            log.warning("ingest paused (%s): %s", cause, reason)
            self.pause = Pause(cause, reason, time.time())
        for c in PAUSE_CAUSES:
            METRICS.ingest_paused.labels(c).set(1.0 if c == cause else 0.0)
        if self.loop_state is not None:
            self.loop_state.pause(f"{cause}: {reason}")

    def _resume(self) -> None:
        if self.pause is not None:
            log.info("ingest resumed: %s cleared", self.pause.cause)
            self.pause = None
        for c in PAUSE_CAUSES:
            METRICS.ingest_paused.labels(c).set(0.0)
        if self.loop_state is not None:
            self.loop_state.resume()

    def _lasting_failure(self, exc: BaseException | None,
                         collection: str | None = None) -> tuple[str, str] | None:
        """The lasting failure behind a failed batch, if there is one: (cause, reason).
        A failure counts as lasting only where a probe confirms it (the serving version
        is still missing, the vector store does not answer, the image store is full), so
        a job that fails on its own merits still spends its attempts."""
        if exc is not None and is_disk_full(exc):
            return "disk_full", f"the image store is full ({self.p.settings.image_dir}): {exc}"
        if collection is not None and self.p.registry.serving(collection) is None:
            return "no_serving_version", (
                f"no serving model version for {collection} yet: publish one and promote "
                "it (carsearch models publish DIR --promote)")
        try:
            self.p.store.list_collections()
        except Exception as probe:
            return "vector_store", f"the vector store does not answer: {probe}"[:500]
        return None

    def _disk_ok(self) -> bool:
        """Can the image store take a file again? (A small file written and removed.)"""
        image_dir = self.p.settings.image_dir
        probe = image_dir / f".space-probe-{os.getpid()}"
        try:
            image_dir.mkdir(parents=True, exist_ok=True)
            with probe.open("wb") as fh:
                fh.write(b"\0" * DISK_PROBE_BYTES)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if is_disk_full(exc):
                return False
            raise
        finally:
            probe.unlink(missing_ok=True)
        return True

    # -- loop ------------------------------------------------------------------------
    def run_once(self) -> WorkerStats:
        """Scan the inbox, then drain every ready job, then return.

        A lasting failure outside the jobs pauses claiming instead of spending the jobs'
        attempts: the image store full (the scan waits too), no serving version yet (the
        inbox is still taken in, its jobs wait), Milvus down (asked before any claim:
        the round fails and the loop backs off). The next round that finds it cleared
        resumes claiming.
        """
        if self.pause is not None and self.pause.cause == "disk_full":
            if not self._disk_ok():
                self._pause("disk_full", self.pause.reason)
                return self.stats
            self._resume()
        if self.inbox is not None:
            self.last_scan = scan_inbox(self.p, self.inbox, self.inbox_collection)
            if self.last_scan.disk_full:
                self._pause("disk_full", self.last_scan.disk_full)
                return self.stats
        try:
            self.p.store.list_collections()
        except Exception as exc:
            self._pause("vector_store", f"the vector store does not answer: {exc}"[:500])
            raise
        if not self.p.registry.all_serving():
            waiting = queue.counts(self.p.db)["queued"]
            self._pause("no_serving_version", (
                f"no serving model version yet ({waiting} jobs wait): publish one and "
                "promote it (carsearch models publish DIR --promote)"))
            return self.stats
        self._resume()
        indexed_before = self.stats.summary.indexed
        self.prune_done()
        while not self.stop_event.is_set() and self.pause is None:
            jobs = queue.claim(self.p.db, self.worker_id, self.batch_size,
                               visibility_timeout=self.visibility_timeout)
            if not jobs:
                break
            self.process(jobs)
            self.prune_done()
        if self.stats.summary.indexed > indexed_before:
            # Drained: let the store seal what was written so searches stay fast (Milvus
            # Lite searches unflushed rows by brute force, far slower; a server seals
            # itself).
            for version in self.p.registry.all_serving():
                if self.p.store.has_collection(version.collection):
                    self.p.store.settle(version.collection)
        return self.stats

    def prune_done(self, *, force: bool = False) -> int:
        """Delete the queue's done rows older than the retention
        (``ingest.done_retention_days``; 0 keeps them), at most every
        ``ingest.prune_interval_s``. A failure is logged and tried again next interval:
        pruning never stops the ingest. Returns how many rows went."""
        cfg = self.p.settings.ingest
        now = time.monotonic()
        if cfg.done_retention_days <= 0 or (not force and now < self._next_prune):
            return 0
        self._next_prune = now + cfg.prune_interval_s
        try:
            gone = queue.prune_done(self.p.db, timedelta(days=cfg.done_retention_days))
        except Exception as exc:
            log.warning("pruning done queue rows failed (tried again in %g s): %s",
                        cfg.prune_interval_s, exc)
            return 0
        self.pruned += gone
        return gone

    def run_forever(self, state: LoopState | None = None) -> WorkerStats:
        """Work until SIGTERM or SIGINT (or ``stop_event``), then finish the current batch
        and return. A supervised loop: a failing round (the database gone, say) is
        logged and retried with backoff; ``state`` shows how it goes (a pause included)."""
        restore = install_stop_handlers(self.stop_event)
        log.info("worker %s started", self.worker_id)
        self.loop_state = state or LoopState("ingest-worker")
        try:
            supervise(self.loop_state, self.run_once,
                      interval_s=self.poll_interval, stop=self.stop_event)
        finally:
            restore()
        log.info("worker %s stopped", self.worker_id)
        return self.stats

    # -- one batch ---------------------------------------------------------------------
    def process(self, jobs: Sequence[queue.ClaimedJob]) -> None:
        """Run one claimed batch. Whatever goes wrong with one job (a payload of the
        wrong shape, a path that cannot be looked at) costs that job alone: it fails
        with its reason (retried, then dead) and the rest of the batch goes on.

        Jobs are decoded and stored ``decode_chunk`` at a time: at most that many decoded
        images are alive at once, whatever the batch size. The whole batch is heart-beaten
        until it is over, so jobs waiting for a later chunk are not reclaimed."""
        self.stats.batches += 1
        serving: dict[str, bool] = {}
        chunk: list[tuple[queue.ClaimedJob, Prepared]] = []
        with self._heartbeating([j.id for j in jobs]):
            for n, job in enumerate(jobs):
                if n == 1:
                    crash_point("mid_batch")
                self.stats.summary.seen += 1
                if self.pause is not None:  # an earlier chunk met a lasting failure
                    queue.release(self.p.db, self.worker_id, [job.id], self.pause.reason)
                    continue
                try:
                    prepared = self._prepare_job(job, serving)
                except Exception as exc:  # this job alone
                    log.warning("job %d failed: %s: %s", job.id, type(exc).__name__, exc)
                    queue.fail(self.p.db, self.worker_id, [job.id],
                               f"{type(exc).__name__}: {exc}")
                    continue
                if prepared is not None:
                    chunk.append((job, prepared))
                if len(chunk) >= self.decode_chunk:
                    self._store_chunk(chunk)
                    chunk = []  # the decoded images go before the next chunk is decoded
            self._store_chunk(chunk)

    def _store_chunk(self, chunk: list[tuple[queue.ClaimedJob, Prepared]]) -> None:
        by_collection: dict[str, list[tuple[queue.ClaimedJob, Prepared]]] = {}
        for job, p in chunk:
            by_collection.setdefault(p.item.collection, []).append((job, p))
        chunk.clear()
        for name, part in by_collection.items():
            ids = [j.id for j, _ in part]
            if self.pause is not None:  # a lasting failure seen in this batch
                queue.release(self.p.db, self.worker_id, ids, self.pause.reason)
                continue
            self._store_batch(part, ids, name)

    def _prepare_job(self, job: queue.ClaimedJob, serving: dict[str, bool]) -> Prepared | None:
        """Decode and check one job's image; a job that cannot go on is settled here
        (quarantined, failed or released) and None comes back."""
        db, s = self.p.db, self.stats.summary
        problem = queue.payload_problem(job.payload)
        if problem is not None:
            queue.fail(db, self.worker_id, [job.id], problem)
            return None
        payload = job.payload
        item = IngestItem(Path(payload["path"]), str(payload.get("source") or "queue"),
                          dict(payload.get("meta") or {}),
                          str(payload.get("collection") or DEFAULT_COLLECTION))
        try:
            vehicle_labels = self._kind(item.collection).vehicle_labels
        except collections.CollectionError as exc:
            queue.fail(db, self.worker_id, [job.id], str(exc))  # retried, then dead
            return None
        if item.collection not in serving:
            serving[item.collection] = self.p.registry.serving(item.collection) is not None
        if not serving[item.collection]:
            # The collection exists but serves no version yet: the job waits, unspent.
            reason = (f"no serving model version for {item.collection} yet: publish one "
                      "and promote it")
            queue.release(db, self.worker_id, [job.id], reason, WAIT_FOR_VERSION_S)
            return None
        try:
            return prepare(item, self.p.settings.max_image_pixels,
                           vehicle_labels=vehicle_labels)
        except ImageRejectedError as exc:
            if exc.reason == "file not found" or exc.reason.startswith("unreadable"):
                # not arrived yet, or a share briefly gone: retried, then dead
                queue.fail(db, self.worker_id, [job.id], f"{item.path}: {exc.reason}")
                return None
            quarantine(db, item, exc.reason)
            queue.complete(db, self.worker_id, [job.id], note=f"quarantined: {exc.reason}")
            METRICS.ingested.labels("quarantined").inc()
            s.quarantined += 1
            s.reasons[exc.reason] = s.reasons.get(exc.reason, 0) + 1
            return None

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
                     collection: str = DEFAULT_COLLECTION, split: bool = True) -> None:
        db, s = self.p.db, self.stats.summary
        batch = [p for _, p in good]
        s.fields_rejected += sum(len(p.meta.rejected) for p in batch)
        try:
            # The store opens here: an unreachable Milvus fails the batch, not the worker.
            n = platform_writer(self.p, self._hook, collection).write(batch)
        except Exception as exc:  # the worker must outlive any one batch
            lasting = self._lasting_failure(exc, collection)
            if lasting is not None:  # not the jobs' fault: they wait, unspent
                self._pause(*lasting)
                queue.release(db, self.worker_id, ids, lasting[1])
                METRICS.batches.labels("paused").inc()
                return
            if len(good) > 1 and split:
                # One job's file may be at fault: try each alone, so it costs that job only.
                log.warning("batch of %d failed (%s: %s); trying its jobs one by one",
                            len(ids), type(exc).__name__, exc)
                for pair in good:
                    self._store_batch([pair], [pair[0].id], collection, split=False)
                return
            log.exception("batch of %d failed; jobs go back with backoff", len(ids))
            queue.fail(db, self.worker_id, ids, f"{type(exc).__name__}: {exc}")
            self.stats.failed_batches += 1
            METRICS.batches.labels("failed").inc()
            return
        queue.complete(db, self.worker_id, ids)
        METRICS.batches.labels("ok").inc()
        METRICS.ingested.labels("indexed").inc(n)
        s.indexed += n
