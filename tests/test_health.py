"""Health of long-running processes: supervised loops survive errors, a dead loop makes
the process unhealthy, /healthz /livez /metrics answer, and the Status tab lists loops.

Real parts: a compact model, Milvus Lite and the server, SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from carsearch.cli.monitor import health_command
from carsearch.monitoring.health import Health, HealthServer
from carsearch.platform.db import migrate
from carsearch.platform.db.reports import loop_statuses
from carsearch.platform.runtime import Platform
from carsearch.platform.scheduler import LoopState, run_every, supervise
from carsearch.platform.settings import Settings
from carsearch.platform.telemetry import METRICS


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def platform(tmp_path: Path, database: Any, milvus_uri: str, compact_model: Path):
    settings = Settings(data_dir=tmp_path / "data", database_url=database.url,
                        milvus_uri=milvus_uri)
    settings.ensure_dirs()
    p = Platform(settings)
    yield p
    p.close()


def _serve_a_version(p: Platform, compact_model: Path) -> None:
    from carsearch.lifecycle.reindex import promote_with_backfill

    p.registry.publish(compact_model, name="v1")
    promote_with_backfill(p, "v1", progress=False)


class RecordingStop(threading.Event):
    """A stop event whose waits return at once and are recorded (the backoff)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(float(timeout or 0.0))
        return self.is_set()


def test_a_supervised_loop_survives_any_exception_with_backoff() -> None:
    calls = 0

    def step() -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise (RuntimeError if calls % 2 else KeyError)(f"boom {calls}")

    state = LoopState("flaky")
    stop = RecordingStop()
    assert supervise(state, step, interval_s=5.0, stop=stop, max_rounds=5) == 5
    assert stop.waits == [1.0, 2.0, 4.0, 5.0]  # backoff 1, 2, 4 s, then the interval
    assert state.total_failures == 3 and state.failures == 0 and state.rounds == 2
    assert state.last_error == "RuntimeError: boom 3"
    assert state.state == "stopped" and state.healthy()


def test_a_loop_in_backoff_is_live_until_it_stalls() -> None:
    state = LoopState("slow", interval_s=10)
    state.failed(RuntimeError("db down"))
    assert state.state == "backoff" and state.healthy()
    state.last_ok_at = state.started_at = time.time() - state.stale_after_s() - 1
    assert not state.healthy()  # no round has finished for too long: stalled
    state.dead("thread ended")
    assert not state.healthy() and state.to_dict()["state"] == "dead"


def test_health_port_reports_loops_checks_and_metrics(
    platform: Platform, compact_model: Path
) -> None:
    health = Health(platform, role="test")
    server = HealthServer(health, 0).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        code, body = _get(base + "/healthz")
        assert code == 503  # no serving version yet
        answer = json.loads(body)
        assert answer["checks"]["database"]["ok"] and answer["checks"]["milvus"]["ok"]
        assert "no serving model version" in answer["checks"]["serving"]["error"]

        _serve_a_version(platform, compact_model)
        loop = health.loop("ingest-worker", 1.0)
        loop.ok()
        code, body = _get(base + "/healthz")
        assert code == 200, body
        answer = json.loads(body)
        assert answer["checks"]["serving"]["detail"] == "v1"
        assert [lp["name"] for lp in answer["loops"]] == ["ingest-worker"]

        platform.search.search_text("red pickup", k=3)
        with pytest.raises(Exception, match="empty query"):
            platform.search.search_text("   ")
        code, body = _get(base + "/metrics")
        text = body.decode()
        path = "milvus_lite" if platform.store.is_lite else "milvus_server"
        assert code == 200
        assert f'carsearch_search_latency_seconds_count{{kind="text",path="{path}"}}' in text
        assert 'carsearch_queries_total{outcome="bad_input"}' in text
        assert 'carsearch_ingest_queue_jobs{state="queued"} 0.0' in text
        assert 'carsearch_loop_up{loop="ingest-worker"} 1.0' in text

        loop.dead("the loop ended without being stopped")
        code, body = _get(base + "/livez")
        assert code == 503 and not json.loads(body)["ok"]
        assert _get(base + "/healthz")[0] == 503
        assert 'carsearch_loop_up{loop="ingest-worker"} 0.0' in _get(base + "/metrics")[1].decode()
        assert _get(base + "/anything")[0] == 404
    finally:
        server.stop()
    # Every state change reached the database: the Status tab of any process sees it.
    loops = loop_statuses(platform.db)
    assert [(lp["role"], lp["loop"], lp["state"]) for lp in loops] == [
        ("test", "ingest-worker", "dead")]
    from carsearch.ui.render import status_markdown

    md = status_markdown(platform)
    assert "### Background loops" in md and "**dead**" in md and "ingest-worker" in md


def _cli(settings: Settings) -> tuple[typer.Typer, CliRunner]:
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = settings

    app.command("health")(health_command)
    return app, CliRunner()


def test_health_cli_checks_the_deployment_directly(
    platform: Platform, compact_model: Path
) -> None:
    settings = platform.settings
    app, runner = _cli(settings)
    res = runner.invoke(app, ["health"])
    assert res.exit_code == 1 and "NOT READY" in res.stdout
    assert "no serving model version" in res.stdout
    _serve_a_version(platform, compact_model)
    platform.close()  # one client per Lite file and process: the command opens its own
    platform.__dict__.pop("store")
    res = runner.invoke(app, ["health", "--json"])
    assert res.exit_code == 0, res.stdout
    assert json.loads(res.stdout)["checks"]["serving"]["detail"] == "v1"


def test_health_cli_asks_a_process_port(platform: Platform, compact_model: Path) -> None:
    _serve_a_version(platform, compact_model)
    app, runner = _cli(platform.settings)
    health = Health(platform, role="worker")
    server = HealthServer(health, 0).start()
    try:
        res = runner.invoke(app, ["health", "--port", str(server.port)])
        assert res.exit_code == 0 and res.stdout.startswith("ready"), res.stdout
        health.loop("ingest-worker").dead("crashed")
        res = runner.invoke(app, ["health", "--port", str(server.port)])
        assert res.exit_code == 1 and "loop ingest-worker: dead (crashed)" in res.stdout
    finally:
        server.stop()
    from carsearch.platform.vectors.server import free_ports

    res = runner.invoke(app, ["health", "--port", str(free_ports(1)[0]), "--timeout", "1"])
    assert res.exit_code == 1 and "no answer from" in res.stdout


def test_run_every_goes_on_after_an_unexpected_error() -> None:
    seen: list[int] = []

    def job() -> None:
        seen.append(1)
        if len(seen) == 1:
            raise ZeroDivisionError("not a platform error")

    state = LoopState("audit")
    assert run_every(job, 60, max_runs=3, state=state, stop=RecordingStop()) == 3
    assert len(seen) == 3 and state.total_failures == 1 and state.state == "stopped"


def test_background_job_that_ends_on_its_own_is_dead(tmp_path: Path) -> None:
    from carsearch.platform.scheduler import BackgroundJobs

    settings = Settings(data_dir=tmp_path / "d")
    migrate.upgrade(settings.database_url)
    p = Platform(settings)
    try:
        jobs = BackgroundJobs(Health(p, role="page"))
        state = jobs.start("quits", lambda state: None, lambda: None)
        jobs.threads[-1].join(10)
        assert state.state == "dead" and "ended without being stopped" in (state.last_error or "")
        stopped = jobs.start("stops", lambda state: time.sleep(0.2), lambda: None)
        jobs.stop()
        assert stopped.state != "dead"
    finally:
        p.close()
    assert METRICS.text()  # the registry renders
