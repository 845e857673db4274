"""Alerts and the dashboard: the rules of deploy/prometheus/alerts.yml pass `promtool check
rules` and their unit tests (`promtool test rules`), every rule has a test that fires it and
one that keeps it quiet, the rules and the Grafana dashboard use only metrics the carsearch
processes export, and a real Prometheus (Debian's `prometheus` binary, on a free loopback
port with a temporary data dir) scrapes a real `carsearch ingest run --health-port` process
and sees the metrics of the dashboard that such a process exports.

promtool and prometheus come from Debian's `prometheus` package (`make test` installs it
as root). Where they are missing these tests skip, except under CI (CI=true), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from fixtures.common import REPO
from fixtures.common import in_ci as _in_ci

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "carsearch.json"
EXPORTERS = [REPO / "src" / "carsearch" / "platform" / "telemetry.py",
             REPO / "src" / "carsearch" / "monitoring" / "health.py"]
METRIC = re.compile(r"\bcarsearch_[a-z0-9_]+\b")
SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is missing (apt-get install prometheus; `make test` does it as root)"
        if _in_ci():
            pytest.fail(msg + ": CI must run the alert rule tests")
        pytest.skip(msg)
    return path


def _exported() -> set[str]:
    """Every metric name the processes' code defines (as quoted strings)."""
    names: set[str] = set()
    for path in EXPORTERS:
        names |= set(re.findall(r"\"(carsearch_[a-z0-9_]+)\"", path.read_text()))
    return names


def _base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules() -> None:
    p = subprocess.run([_tool("promtool"), "check", "rules", str(ALERTS)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in p.stdout


def test_promtool_unit_tests_pass() -> None:
    p = subprocess.run([_tool("promtool"), "test", "rules", str(ALERT_TESTS)],
                       capture_output=True, text=True, timeout=120, cwd=ALERT_TESTS.parent)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def test_every_rule_has_a_firing_and_a_quiet_test() -> None:
    cases = [c for t in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
             for c in t["alert_rule_test"]]
    for rule in _rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']} never fires in a test"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']} never kept quiet"


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    exported = _exported()
    assert {"carsearch_ingest_queue_jobs", "carsearch_queries_total",
            "carsearch_retrain_requests"} <= exported
    used_rules = {_base(m) for r in _rules() for m in METRIC.findall(r["expr"])}
    used_dash = {_base(m) for e in _dashboard_exprs() for m in METRIC.findall(e)}
    assert used_rules - exported == set()
    assert used_dash - exported == set()
    # ...and the dashboard shows every exported metric.
    assert exported - used_dash == set()


# --- a real Prometheus scraping a real process ---------------------------------------------
def _free_port() -> int:
    from carsearch.platform.vectors.server import free_ports

    return free_ports(1)[0]


def _query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_ingest_worker(tmp_path: Path, make_database,
                                                     published_model) -> None:
    """The worker ingests one image (so its labelled counters exist), a drift report and
    an ANN audit sit in the database; Prometheus scrapes the worker's /metrics every
    second and must see every dashboard metric that a worker exports. The page's search
    metrics and the drift job's run counter come from other processes (checked above
    against the code only)."""
    prometheus = _tool("prometheus")
    from carsearch.platform.db import AnnReport, DriftReport
    from ingest_world import make_image, world

    url = make_database("sqlite").url
    p = world(tmp_path, url, published_model, str(tmp_path / "m.db"))
    with p.db.session() as s:
        s.add(DriftReport(n_images=10, n_isolated=2, report={}))
        s.add(AnnReport(index_type="HNSW", n_queries=5, n_vectors=10, recall_at_10=0.99))
    p.close()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    make_image(inbox / "a.png", 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARSEARCH_")}
    env.update(CARSEARCH_DATA_DIR=str(tmp_path / "data"), CARSEARCH_LOG_LEVEL="WARNING",
               CARSEARCH_DATABASE_URL=url,
               CARSEARCH_MILVUS_URI=str(tmp_path / "m.db"), OMP_NUM_THREADS="1")
    health, web = _free_port(), _free_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "carsearch.cli", "ingest", "run", "--inbox", str(inbox),
         "--poll", "0.2", "--health-port", str(health)], env=env, start_new_session=True,
        stdout=(tmp_path / "worker.log").open("wb"), stderr=subprocess.STDOUT)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "carsearch-ingest",
                            "static_configs": [{"targets": [f"127.0.0.1:{health}"]}]}]}))
    prom = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"], start_new_session=True,
        stdout=(tmp_path / "prometheus.log").open("wb"), stderr=subprocess.STDOUT)
    wanted = {"carsearch_loop_up", "carsearch_loop_failures", "carsearch_ingest_queue_jobs",
              "carsearch_ingest_lag_seconds", "carsearch_ingest_dead_jobs",
              "carsearch_ingest_throughput_per_second", "carsearch_ingest_images_total",
              "carsearch_ingest_batches_total", "carsearch_ann_recall_at_10",
              "carsearch_drift_isolated_clusters", "carsearch_retrain_requests",
              # per-stage timing histograms (queried by a series they export)
              "carsearch_ingest_stage_seconds_count", "carsearch_search_stage_seconds_count"}
    assert {_base(w) for w in wanted} <= {_base(m) for e in _dashboard_exprs()
                                          for m in METRIC.findall(e)}
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (wanted <= seen and "up" in seen):
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            time.sleep(1)
            try:
                for name in (wanted | {"up"}) - seen:
                    expr = name if name == "up" else f'{name}{{job="carsearch-ingest"}}'
                    if _query(web, expr):
                        seen.add(name)
            except OSError:
                continue  # Prometheus still starting
        assert wanted - seen == set(), (tmp_path / "worker.log").read_text()[-3000:]
        up = _query(web, 'up{job="carsearch-ingest"}')
        assert up and up[0]["value"][1] == "1"
        ok = _query(web, 'carsearch_ingest_images_total{outcome="indexed"}')
        assert ok and float(ok[0]["value"][1]) >= 1
        for stage in ("read", "decode", "embed", "write"):  # observed before it counted
            got = _query(web, f'carsearch_ingest_stage_seconds_count{{stage="{stage}"}}')
            assert got and float(got[0]["value"][1]) >= 1, stage
    finally:
        _stop(prom)
        _stop(worker)
