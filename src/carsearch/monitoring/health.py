"""Health of a long-running process: liveness, readiness and ``/metrics``.

:class:`Health` gathers the loops (platform.scheduler) of one process and answers two
questions:

- *live*: every loop is running, waiting between rounds or backing off (none dead or
  stalled);
- *ready*: live, and the database, Milvus and a serving model version answer.

:class:`HealthServer` serves them on a small HTTP port (loopback by default):
``/healthz`` (200 when live and ready, 503 otherwise, JSON body), ``/livez``, and
``/metrics`` (Prometheus text: platform.telemetry's registry plus figures read from the
database at scrape time). ``carsearch health --port N`` asks such a port; docker-compose
healthchecks call it. Loop states are also written to the ``loop_status`` table, so the
page's Status tab shows the loops of every process of a deployment.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from carsearch.platform.errors import CarsearchError
from carsearch.platform.scheduler import LoopState, process_name
from carsearch.platform.telemetry import METRICS

if TYPE_CHECKING:
    from carsearch.platform.runtime import Platform

log = logging.getLogger(__name__)

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
    from carsearch.platform.db import queue
    from carsearch.platform.db.reports import latest_ann_report, latest_drift

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
    yield _retrain_requests(platform)
    ann = latest_ann_report(platform.db)
    if ann is not None and ann.get("recall_at_10") is not None:
        yield GaugeMetricFamily("carsearch_ann_recall_at_10",
                                "Milvus recall@10 against exact search, newest ANN audit",
                                value=float(ann["recall_at_10"]))


RETRAIN_STATES = ("waiting", "ready", "running", "promoted", "candidate", "failed",
                  "interrupted")


def _retrain_requests(platform: Platform) -> GaugeMetricFamily:
    """Retrain requests by state (what the "retrain failed" and "drift event waiting"
    alerts of deploy/prometheus/alerts.yml read)."""
    from carsearch.platform.db import retrains

    found = retrains.counts(platform.db)
    family = GaugeMetricFamily("carsearch_retrain_requests", "Retrain requests by state",
                               labels=["state"])
    for state in sorted(set(RETRAIN_STATES) | set(found)):
        family.add_metric([state], float(found.get(state, 0)))
    return family


# --- the process's health -----------------------------------------------------------------


class Health:
    """The loops of one process and its readiness checks."""

    def __init__(self, platform: Platform | None = None, *, role: str = "process") -> None:
        self.platform = platform
        self.role = role
        self._loops: dict[str, LoopState] = {}
        self._checks: dict[str, Callable[[], object]] = {}
        self._lock = threading.Lock()
        _set_collector_target(self)

    def add_check(self, name: str, check: Callable[[], object]) -> None:
        """A readiness check of this process: returns a detail, or raises when not ready
        (the page adds "page": its HTTP server answers)."""
        self._checks[name] = check

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
        from carsearch.platform.db.reports import record_loop

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
        checks.update({name: _check(fn) for name, fn in self._checks.items()})
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
        return "lite" if platform.admin.is_lite else "server"

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
