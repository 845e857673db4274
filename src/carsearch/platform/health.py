"""Health of a long-running process: its background loops, readiness, and metrics.

Every long-running carsearch process (the page, the ingest worker, the scheduled drift
and ANN-audit jobs) runs its work as *loops*. A loop is started through
:func:`supervise`, which keeps it alive: an exception is logged with its trace, the loop
waits with exponential backoff (1, 2, 4 ... s, capped) and goes on; its state
(running, backoff, stopped, dead) lives in a :class:`LoopState`. A loop whose thread
ends without being asked to stop is *dead*, and one that has not finished a round for
``stale_after_s`` is *stalled*: either makes the process unhealthy, so nothing vanishes
quietly.

:class:`Health` gathers the loops of a process and answers two questions:

- *live*: every loop is running, waiting between rounds or backing off (none dead or
  stalled);
- *ready*: live, and the database, Milvus and a serving model version answer.

:class:`HealthServer` serves them on a small HTTP port (loopback by default):
``/healthz`` (200 when live and ready, 503 otherwise, JSON body), ``/livez``, and
``/metrics`` (Prometheus text format). ``carsearch health --port N`` asks such a port;
docker-compose healthchecks call it. Loop states are also written to the ``loop_status``
table, so the page's Status tab shows the loops of every process of a deployment.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from carsearch.platform.errors import CarsearchError

if TYPE_CHECKING:
    from carsearch.platform.runtime import Platform

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
_LIVE_STATES = {"starting", "running", "idle", "backoff"}


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class LoopState:
    """What one background loop is doing; changed only through its methods."""

    name: str
    interval_s: float = 0.0
    state: str = "starting"
    failures: int = 0  # consecutive
    total_failures: int = 0
    rounds: int = 0
    last_error: str | None = None
    started_at: float = field(default_factory=time.time)
    last_ok_at: float | None = None
    updated_at: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    on_change: Callable[[LoopState], None] | None = field(default=None, repr=False)

    def _set(self, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self, key, value)
            self.updated_at = time.time()
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:  # recording the state must never take the loop down
                log.debug("recording the state of loop %s failed", self.name, exc_info=True)

    def ok(self) -> None:
        self._set(state="running", failures=0, rounds=self.rounds + 1, last_ok_at=time.time())

    def idle(self) -> None:
        self._set(state="idle")

    def failed(self, exc: BaseException) -> float:
        """Record a failed round; returns how long to back off."""
        failures = self.failures + 1
        self._set(state="backoff", failures=failures, total_failures=self.total_failures + 1,
                  last_error=f"{type(exc).__name__}: {exc}"[:2000])
        return min(MAX_BACKOFF_S, 2.0 ** (failures - 1))

    def stopped(self) -> None:
        self._set(state="stopped")

    def dead(self, reason: str) -> None:
        self._set(state="dead", last_error=reason[:2000])

    def stale_after_s(self) -> float:
        """How long without a finished round before the loop counts as stalled."""
        return max(300.0, 3.0 * self.interval_s + MAX_BACKOFF_S)

    def healthy(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.state not in _LIVE_STATES:
            return self.state == "stopped"
        last = self.last_ok_at or self.started_at
        return self.state == "idle" or now - last <= self.stale_after_s()

    def to_dict(self) -> dict[str, Any]:
        def iso(ts: float | None) -> str | None:
            return datetime.fromtimestamp(ts, UTC).isoformat() if ts else None

        return {"name": self.name, "state": self.state, "healthy": self.healthy(),
                "failures": self.failures, "total_failures": self.total_failures,
                "rounds": self.rounds, "last_error": self.last_error,
                "started_at": iso(self.started_at), "last_ok_at": iso(self.last_ok_at),
                "interval_s": self.interval_s}


def supervise(
    state: LoopState,
    step: Callable[[], object],
    *,
    interval_s: float,
    stop: threading.Event,
    first_wait_s: float = 0.0,
    max_rounds: int | None = None,
) -> int:
    """Run ``step`` every ``interval_s`` seconds until ``stop`` is set (or ``max_rounds``).

    Any exception in a round is logged with its trace and answered with exponential
    backoff; the loop goes on. Returns the number of rounds that ran.
    """
    state.interval_s = interval_s
    rounds = 0
    if first_wait_s > 0:
        state.idle()
        stop.wait(first_wait_s)
    while not stop.is_set():
        try:
            step()
        except Exception as exc:
            wait = state.failed(exc)
            if isinstance(exc, CarsearchError):
                log.error("%s: %s (retrying in %.0f s)", state.name, exc, wait)
            else:
                log.exception("%s failed (retrying in %.0f s)", state.name, wait)
        else:
            state.ok()
            wait = interval_s
        rounds += 1
        if max_rounds is not None and rounds >= max_rounds:
            break
        stop.wait(wait)
    state.stopped()
    return rounds


def install_stop_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set ``stop`` (in the main thread; elsewhere nothing is installed).
    Returns a function that puts the previous handlers back."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def _handler(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after the current round", signum)
        stop.set()

    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def run_every(
    job: Callable[[], object],
    every_s: float,
    *,
    max_runs: int | None = None,
    stop: threading.Event | None = None,
    state: LoopState | None = None,
    first_wait_s: float = 0.0,
) -> int:
    """Run ``job`` now and then every ``every_s`` seconds until SIGINT/SIGTERM (or ``stop``
    is set, or ``max_runs`` runs), as a supervised loop: a failing run is logged and
    retried with backoff, and the loop goes on. Returns the number of runs."""
    if every_s <= 0:
        raise CarsearchError("the interval must be positive")
    stop = stop or threading.Event()
    restore = install_stop_handlers(stop)
    try:
        return supervise(state or LoopState("scheduled job", interval_s=every_s), job,
                         interval_s=every_s, stop=stop, first_wait_s=first_wait_s,
                         max_rounds=max_runs)
    finally:
        restore()


# --- metrics ------------------------------------------------------------------------------


class Metrics:
    """The Prometheus metrics a process updates as it works (one registry per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.search_latency = Histogram(
            "carsearch_search_latency_seconds",
            "Search service latency (encode, vector search, metadata), by query kind and "
            "by what answered it (mirror, milvus_lite, milvus_server)",
            ["kind", "path"], registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5),
        )
        self.queries = Counter(
            "carsearch_queries_total", "Searches by outcome (ok, empty, bad_input, error)",
            ["outcome"], registry=self.registry)
        self.ingested = Counter(
            "carsearch_ingest_images_total", "Images this process ingested, by outcome",
            ["outcome"], registry=self.registry)
        self.batches = Counter(
            "carsearch_ingest_batches_total", "Ingest batches this process ran, by outcome",
            ["outcome"], registry=self.registry)
        self.drift_runs = Counter(
            "carsearch_drift_runs_total", "Drift job runs in this process, by status",
            ["status"], registry=self.registry)

    def text(self) -> bytes:
        return bytes(generate_latest(self.registry))


METRICS = Metrics()


class _DeploymentCollector(Collector):
    """Figures read from the database at scrape time, so every process reports the same:
    queue depth and lag, dead jobs, the latest drift report and ANN audit, the loops."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._loops()
        platform = self.health.platform
        if platform is None:
            return
        try:
            yield from _database_figures(platform)
        except Exception as exc:  # a scrape must answer even when the database does not
            log.warning("metrics: database figures unavailable: %s", exc)

    def _loops(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("carsearch_loop_up", "1 while a background loop is healthy",
                               labels=["loop"])
        fails = GaugeMetricFamily("carsearch_loop_failures",
                                  "Failed rounds of a background loop since it started",
                                  labels=["loop"])
        for loop in self.health.loops():
            up.add_metric([loop.name], 1.0 if loop.healthy() else 0.0)
            fails.add_metric([loop.name], float(loop.total_failures))
        yield up
        yield fails


def _database_figures(platform: Platform) -> Iterator[GaugeMetricFamily]:
    from carsearch.ingest import queue
    from carsearch.platform.ann_audit import latest_ann_report
    from carsearch.platform.status import latest_drift

    st = queue.status(platform.db)
    depth = GaugeMetricFamily("carsearch_ingest_queue_jobs", "Ingest jobs by state",
                              labels=["state"])
    for state in ("queued", "running", "done", "failed", "dead"):
        depth.add_metric([state], float(st.get(state, 0)))
    yield depth
    yield GaugeMetricFamily("carsearch_ingest_lag_seconds",
                            "Age of the oldest waiting ingest job", value=float(st["lag_s"]))
    yield GaugeMetricFamily("carsearch_ingest_dead_jobs", "Dead-lettered ingest jobs",
                            value=float(st.get("dead", 0)))
    yield GaugeMetricFamily("carsearch_ingest_throughput_per_second",
                            "Ingest jobs done per second over the last five minutes",
                            value=float(st["throughput_per_s"]))
    drift = latest_drift(platform.db)
    if drift is not None:
        yield GaugeMetricFamily("carsearch_drift_isolated_clusters",
                                "Isolated clusters in the newest drift report",
                                value=float(drift["n_isolated"]))
    ann = latest_ann_report(platform.db)
    if ann is not None and ann.get("recall_at_10") is not None:
        yield GaugeMetricFamily("carsearch_ann_recall_at_10",
                                "Milvus recall@10 against exact search, newest ANN audit",
                                value=float(ann["recall_at_10"]))


# --- the process's health -----------------------------------------------------------------


class Health:
    """The loops of one process and its readiness checks."""

    def __init__(self, platform: Platform | None = None, *, role: str = "process") -> None:
        self.platform = platform
        self.role = role
        self._loops: dict[str, LoopState] = {}
        self._lock = threading.Lock()
        _set_collector_target(self)

    def loop(self, name: str, interval_s: float = 0.0) -> LoopState:
        """The state of a new loop of this process (recorded in ``loop_status``)."""
        state = LoopState(name, interval_s=interval_s, on_change=self._record)
        with self._lock:
            self._loops[name] = state
        self._record(state)
        return state

    def loops(self) -> list[LoopState]:
        with self._lock:
            return list(self._loops.values())

    def _record(self, state: LoopState) -> None:
        if self.platform is None:
            return
        from carsearch.platform.status import record_loop

        record_loop(self.platform.db, process_name(), self.role, state.to_dict())

    def live(self) -> tuple[bool, dict[str, Any]]:
        loops = [s.to_dict() for s in self.loops()]
        return all(s["healthy"] for s in loops), {"loops": loops}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Live, and the database, Milvus and the serving version answer."""
        live, out = self.live()
        checks: dict[str, Any] = {}
        if self.platform is not None:
            checks = readiness(self.platform)
        ok = live and all(c["ok"] for c in checks.values())
        return ok, {"ok": ok, "live": live, "role": self.role, "process": process_name(),
                    **out, "checks": checks}


_COLLECTOR: list[_DeploymentCollector] = []


def _set_collector_target(health: Health) -> None:
    """One deployment collector per process registry, following the newest Health."""
    if not _COLLECTOR:
        collector = _DeploymentCollector(health)
        METRICS.registry.register(collector)
        _COLLECTOR.append(collector)
    _COLLECTOR[0].health = health


def _check(fn: Callable[[], object]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        detail = fn()
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"ok": True, "detail": detail, "ms": round((time.perf_counter() - t0) * 1000, 2)}


def readiness(platform: Platform) -> dict[str, dict[str, Any]]:
    """Database, Milvus and serving-version checks, each ``{"ok": bool, ...}``."""
    from sqlalchemy import text

    def database() -> str:
        with platform.db.session() as s:
            s.execute(text("SELECT 1"))
        return platform.db.engine.dialect.name

    def milvus() -> str:
        platform.store.list_collections()
        return "lite" if platform.store.is_lite else "server"

    def serving() -> str:
        version = platform.registry.require_serving()
        if not platform.store.has_collection(version.collection):
            raise CarsearchError(f"collection {version.collection} is missing in Milvus")
        return version.name

    checks = {"database": _check(database), "milvus": _check(milvus)}
    if checks["database"]["ok"] and checks["milvus"]["ok"]:
        checks["serving"] = _check(serving)
    else:
        checks["serving"] = {"ok": False, "error": "database or Milvus unavailable"}
    return checks


class HealthServer:
    """``/healthz``, ``/livez`` and ``/metrics`` on a small HTTP port, on a thread."""

    def __init__(self, health: Health, port: int, host: str = "127.0.0.1") -> None:
        self.health = health
        handler = _handler(health)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health-http",
                                       daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> HealthServer:
        self.thread.start()
        log.info("health and metrics on http://%s:%d (/healthz, /livez, /metrics)",
                 self.httpd.server_address[0], self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, METRICS.text(), "text/plain; version=0.0.4; charset=utf-8")
            elif path in ("/healthz", "/readyz"):
                ok, body = health.ready()
                self._json(200 if ok else 503, body)
            elif path == "/livez":
                ok, body = health.live()
                self._json(200 if ok else 503, {"ok": ok, **body})
            else:
                self._json(404, {"error": "not found: /healthz, /livez, /metrics"})

        def _json(self, code: int, body: dict[str, Any]) -> None:
            self._send(code, json.dumps(body, default=str).encode(), "application/json")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("health http: " + format, *args)

    return Handler
