"""The production shape, for real: separate OS processes on PostgreSQL and a Milvus server.

What docker-compose runs, started here as docs/DEPLOYMENT.md's "production shape on one machine
without Docker" says: the search page (`carsearch serve`), the ingest worker (`carsearch
ingest run --inbox`), and the drift and ANN-audit jobs on short schedules, each with its
health port. Labelled images are dropped into the inbox while a client searches the page
through `gradio_client`; the new images must become searchable, every process must stay
healthy, and at the end the serving collection's Milvus ids must equal the database's
indexed ids.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from carsearch.platform.db import Database, DriftReport
from carsearch.platform.vectors.server import free_ports

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from ui_world import draw_car  # noqa: E402

pytestmark = [pytest.mark.postgres, pytest.mark.milvus_server, pytest.mark.slow]

CLI = [sys.executable, "-m", "carsearch.cli"]
NO_FILTERS = ([], [], [], [], "any", "any")
CLASSES = [("Chevrolet Silverado 1500 Regular Cab 2012", (200, 20, 20)),
           ("BMW M3 Coupe 2012", (15, 15, 15)),
           ("Jeep Wrangler SUV 2012", (20, 150, 40)),
           ("Ford F-150 Regular Cab 2007", (20, 40, 200))]


@dataclass
class Deployment:
    env: dict[str, str]
    root: Path
    inbox: Path
    page_url: str = ""
    health: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def cli(self, *args: str) -> str:
        p = subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        return p.stdout

    def start(self, name: str, *args: str) -> None:
        port = free_ports(1)[0]
        self.health[name] = port
        log = (self.root / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [*CLI, *args, "--health-port", str(port)], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def healthz(self, name: str) -> tuple[int, dict[str, object]]:
        url = f"http://127.0.0.1:{self.health[name]}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def metrics(self, name: str) -> str:
        url = f"http://127.0.0.1:{self.health[name]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def wait_healthy(self, name: str, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            proc = self.procs[name]
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{self.log(name)}"
            try:
                code, last = self.healthz(name)
                if code == 200:
                    return
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last = exc
            time.sleep(0.5)
        raise AssertionError(f"{name} not healthy: {last}\n{self.log(name)}")

    def stop_all(self) -> dict[str, int]:
        codes = {}
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes[name] = proc.wait()
        return codes


def drop(inbox: Path, n0: int, n: int) -> None:
    """Labelled images, written under a dot-name and renamed, with sidecar labels."""
    for i in range(n0, n0 + n):
        cls, colour = CLASSES[i % len(CLASSES)]
        (inbox / f"car{i}.png.json").write_text(json.dumps(
            {"class_name": cls, "colour": "red", "source": "gate-7"}))
        draw_car(inbox / f".car{i}.png", 1000 + i, colour)
        (inbox / f".car{i}.png").rename(inbox / f"car{i}.png")


@pytest.fixture
def deployment(tmp_path: Path, pg_database: str, milvus_server, compact_model: Path
               ) -> Iterator[Deployment]:
    from fixtures.common import empty_server
    from fixtures.common import reset_pg as _reset_pg

    _reset_pg(pg_database)
    empty_server(milvus_server.uri)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARSEARCH_")}
    env.update(CARSEARCH_DATA_DIR=str(tmp_path / "data"), CARSEARCH_DATABASE_URL=pg_database,
               CARSEARCH_MILVUS_URI=milvus_server.uri, CARSEARCH_LOG_LEVEL="INFO",
               CARSEARCH_THREADS__TORCH="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               GRADIO_ANALYTICS_ENABLED="False", CARSEARCH_DRIFT__MIN_NEW="4",
               CARSEARCH_DRIFT__K="3", CARSEARCH_DRIFT__MIN_CLUSTER_SIZE="3")
    d = Deployment(env, tmp_path, tmp_path / "inbox")
    d.inbox.mkdir()
    yield d
    d.stop_all()


def test_separate_processes_on_postgresql_and_a_milvus_server(deployment: Deployment,
                                                               compact_model: Path) -> None:
    d = deployment
    d.cli("db", "upgrade")
    d.cli("models", "publish", str(compact_model), "--name", "v1", "--promote")
    drop(d.inbox, 0, 8)  # a first lot, there before the worker starts
    page_port = free_ports(1)[0]
    d.start("page", "serve", "--port", str(page_port))
    d.start("ingest", "ingest", "run", "--inbox", str(d.inbox), "--poll", "0.2",
            "--batch-size", "4")
    d.start("drift", "drift", "run", "--every", "2")
    d.start("audit", "evaluate", "ann", "--every", "3", "--n", "10", "--k", "10")
    for name in ("page", "ingest", "drift", "audit"):
        d.wait_healthy(name)
    client = Client(f"http://127.0.0.1:{page_port}/", verbose=False)

    searches = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def search_meanwhile() -> None:
        while not stop.is_set():
            try:
                _, status, *_ = client.predict("vehicle photo", 50, *NO_FILTERS,
                                                     api_name="/search")
                searches["ok" if "Error" not in str(status) else "failed"] += 1
            except Exception:
                searches["failed"] += 1
            time.sleep(0.2)

    searcher = threading.Thread(target=search_meanwhile, daemon=True)
    searcher.start()
    try:
        for lot in range(3):  # more arrive while the page is searched
            drop(d.inbox, 8 + 4 * lot, 4)
            time.sleep(1.0)
        total = 8 + 12
        deadline = time.monotonic() + 180
        found = 0
        while time.monotonic() < deadline and found < total:
            gallery, *_ = client.predict("vehicle photo", 50, *NO_FILTERS, api_name="/search")
            found = len(gallery)
            time.sleep(0.5)
        assert found == total, (found, d.log("ingest"))
    finally:
        stop.set()
        searcher.join(30)
    assert searches["ok"] > 0 and searches["failed"] == 0, searches

    # Every process stayed healthy; the page's metrics saw searches on the server.
    for name in ("page", "ingest", "drift", "audit"):
        code, body = d.healthz(name)
        assert code == 200, (name, body, d.log(name))
    page_metrics = d.metrics("page")
    assert 'carsearch_search_latency_seconds_count{kind="text",path="milvus_server"}' \
        in page_metrics
    assert "carsearch_ingest_images_total" in d.metrics("ingest")
    assert 'carsearch_ingest_queue_jobs{state="done"} 20.0' in page_metrics

    db = Database(d.env["CARSEARCH_DATABASE_URL"])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the audit and drift jobs ran on their own
            with db.session() as s:
                audits = s.scalar(sa.text("SELECT count(*) FROM ann_reports"))
                drifts = s.query(DriftReport).count()
            if audits and drifts >= 2:
                break
            time.sleep(1)
        assert audits and drifts >= 2, (d.log("audit"), d.log("drift"))
        assert "carsearch_ann_recall_at_10" in d.metrics("audit")
    finally:
        db.dispose()

    codes = d.stop_all()  # SIGTERM: the worker and the jobs finish their round and exit 0
    assert (codes["ingest"], codes["drift"], codes["audit"]) == (0, 0, 0), codes
    rep = json.loads(d.cli("reconcile", "--dry-run", "--json"))
    assert rep["milvus"] == rep["database"] == 20 and rep["missing"] == rep["orphans"] == 0
    assert rep["alias"] == "carsearch_v1"
