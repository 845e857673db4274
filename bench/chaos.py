"""The chaos run: "nothing lost, nothing doubled" under faults, in both shapes.

Production shape (PostgreSQL + a Milvus server, separate processes): an ingest worker
(`carsearch ingest run --inbox`) takes a steady stream of images (new ones, duplicates,
corrupt files, bad sidecars) while the run SIGKILLs it (at random moments and at the
named crash points), restarts the Milvus server, runs `reconcile`, promotes and rolls
back model versions, and runs the drift job twice at once, all beside the worker, while
a client searches the serving version.

One-machine shape (SQLite + Milvus Lite, one process holds the file): the page with the
worker inside (`carsearch serve --ingest`) takes the same stream; the run SIGKILLs it
(at random and at crash points) and, while it is down, runs reconcile, promotions,
rollbacks and the drift job; queries go through the page.

At the end the worker drains, one normal `reconcile` runs, and the run checks: the
serving collection's Milvus ids equal the database's indexed ids; every good delivered
file is indexed (and in the serving collection) or dead with a reason; every corrupt one
is quarantined with a reason; nothing is doubled (Milvus rows = distinct ids; one row per
content); nothing is stranded (no pending rows, no queued or running jobs, no orphan
vectors). Figures go to docs/RELIABILITY.md with the machine and the date.

    OMP_NUM_THREADS=1 .venv/bin/python bench/chaos.py --rounds 40 --lite-rounds 15 \\
        --milvus-restarts 2 --out docs/RELIABILITY.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

os.environ.setdefault("OMP_NUM_THREADS", "1")

CLI = [sys.executable, "-m", "carsearch.cli"]
CLASSES = ["Chevrolet Silverado 1500 Regular Cab 2012", "BMW M3 Coupe 2012",
           "Jeep Wrangler SUV 2012", "Ford F-150 Regular Cab 2007",
           "Volkswagen Golf Hatchback 1991"]
BAD_SIDECARS: list[Any] = [{"year": "unknown"}, {"make": "M" * 100}, {"colour": ["red"]},
                           {"source": "s" * 300}, "not an object", {"camera": "\x00"}]
CRASH_POINTS = ("mid_batch", "after_upsert", "after_rows")


# --- deliveries ---------------------------------------------------------------------------


@dataclass
class Ledger:
    """What was delivered: by content hash, whether the bytes were a usable image."""

    good: dict[str, str] = field(default_factory=dict)  # sha256 -> first file name
    corrupt: dict[str, str] = field(default_factory=dict)
    files: int = 0
    duplicates: int = 0
    bad_sidecars: int = 0


def _draw(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (96, 72), tuple(int(c) for c in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, 70, 2))
        d.rectangle([x, y, x + 24, y + 16], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    img.save(path, format="PNG")


def deliver(inbox: Path, ledger: Ledger, rng: random.Random, n: int, seq: list[int]) -> int:
    """Drop ``n`` files into the inbox (written under a dot-name, then renamed): mostly new
    labelled images, some duplicates, some corrupt, some with a bad sidecar. Returns how
    many were corrupt, duplicate or badly labelled (the input faults)."""
    import hashlib

    faults = 0
    for _ in range(n):
        seq[0] += 1
        name = f"img{seq[0]:06d}.png"
        tmp = inbox / f".{name}"
        roll = rng.random()
        kind = "dup" if roll < 0.1 and ledger.good else "corrupt" if roll < 0.2 else "good"
        sidecar: Any = {"class_name": rng.choice(CLASSES), "colour": "red"}
        if kind == "dup":  # the same bytes again
            src = inbox.parent / "delivered" / ledger.good[rng.choice(sorted(ledger.good))]
            tmp.write_bytes(src.read_bytes())
            ledger.duplicates += 1
        elif kind == "corrupt":  # empty, truncated or not an image at all
            tmp.write_bytes(rng.choice([b"", b"\x89PNG\r\n\x1a\n broken", os.urandom(300)]))
        else:
            _draw(tmp, seq[0])
            if roll < 0.3:
                sidecar = rng.choice(BAD_SIDECARS)
                ledger.bad_sidecars += 1
                faults += 1
        faults += kind != "good"
        data = tmp.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (inbox.parent / "delivered" / name).write_bytes(data)
        (ledger.corrupt if kind == "corrupt" else ledger.good).setdefault(digest, name)
        (inbox / f"{name}.json").write_text(json.dumps(sidecar), encoding="utf-8")
        tmp.rename(inbox / name)
        ledger.files += 1
    return faults


# --- processes ----------------------------------------------------------------------------


def free_port() -> int:
    from carsearch.platform.vectors.server import free_ports

    return free_ports(1)[0]


@dataclass
class Proc:
    """A carsearch process in its own process group, with a health port and a log."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    health_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        self.health_port = free_port()
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*CLI, *self.args, "--health-port", str(self.health_port)],
            env={**self.env, **(extra_env or {})}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz",
                                        timeout=3) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout_s: float = 240.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            if self.healthy():
                return True
            time.sleep(0.3)
        return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()


def cli(env: dict[str, str], *args: str, log: Path, timeout: float = 600.0) -> tuple[int, str]:
    p = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)
    with log.open("a") as fh:
        fh.write(f"$ carsearch {' '.join(args)}  -> {p.returncode}\n{p.stdout}{p.stderr}\n")
    return p.returncode, p.stdout


# --- the run ------------------------------------------------------------------------------


@dataclass
class ChaosResult:
    shape: str
    rounds: int
    seconds: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)
    files_delivered: int = 0
    good_images: int = 0
    corrupt_images: int = 0
    duplicates: int = 0
    bad_sidecars: int = 0
    indexed: int = 0
    quarantined: int = 0
    dead_jobs: int = 0
    lost: int = 0
    doubled: int = 0
    stranded: int = 0
    milvus_equals_db: bool = False
    final_reconcile: dict[str, Any] = field(default_factory=dict)
    queries: int = 0
    queries_ok: int = 0
    queries_during_outage: int = 0
    query_errors: dict[str, int] = field(default_factory=dict)
    dead_reasons: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())

    def fault(self, kind: str, n: int = 1) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_faults": self.total_faults}


class Searcher:
    """Queries the serving version on a thread while the run goes; counts outcomes. A
    failure while ``down()`` (a fault took the answering process away) is counted apart."""

    def __init__(self, query: Callable[[], None], down: Callable[[], bool]) -> None:
        self.query = query
        self.down = down
        self.ok = self.failed = self.during_outage = 0
        self.errors: dict[str, int] = {}  # the failures outside outages, by kind
        self.outage = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chaos-searcher", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.query()
                self.ok += 1
            except Exception as exc:
                if self.outage.is_set() or self.down():
                    self.during_outage += 1
                else:
                    self.failed += 1
                    kind = f"{type(exc).__name__}: {str(exc)[:80]}"
                    self.errors[kind] = self.errors.get(kind, 0) + 1
            self.stop.wait(0.25)


def _base_env(data: Path, db_url: str, milvus_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARSEARCH_")}
    env.update(CARSEARCH_DATA_DIR=str(data), CARSEARCH_DATABASE_URL=db_url,
               CARSEARCH_MILVUS_URI=milvus_uri, CARSEARCH_LOG_LEVEL="WARNING",
               CARSEARCH_THREADS__TORCH="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               GRADIO_ANALYTICS_ENABLED="False", CARSEARCH_DRIFT__MIN_NEW="5",
               CARSEARCH_DRIFT__K="3", CARSEARCH_DRIFT__MIN_CLUSTER_SIZE="3",
               CARSEARCH_DRIFT__RETRAIN_COMMAND=f"{sys.executable} -c pass",
               CARSEARCH_DRIFT__RETRAIN_COOLDOWN_H="0")
    return env


def _setup(env: dict[str, str], model: Path, log: Path) -> None:
    for args in (["db", "upgrade"], ["models", "publish", str(model), "--name", "v1",
                                      "--promote"],
                 ["models", "publish", str(model), "--name", "v2"]):
        code, _ = cli(env, *args, log=log)
        if code != 0:
            raise RuntimeError(f"setup failed: carsearch {' '.join(args)} (see {log})")


def _promote_or_roll_back(env: dict[str, str], log: Path, res: ChaosResult,
                          state: dict[str, str]) -> None:
    target = "v2" if state["serving"] == "v1" else "v1"
    args = ["models", "promote", target] if target == "v2" else ["models", "rollback"]
    code, _ = cli(env, *args, log=log)
    res.fault("promotion" if target == "v2" else "rollback")
    if code == 0:
        state["serving"] = target


def _drift_twice(env: dict[str, str], log: Path, res: ChaosResult) -> None:
    procs = [subprocess.Popen([*CLI, "drift", "run", "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        with log.open("ab") as fh:
            fh.write(b"$ carsearch drift run (twice at once)\n" + out + b"\n")
    res.fault("drift twice at once")


def run_server_shape(work: Path, model: Path, db_url: str, server: Any, *, rounds: int,
                     per_round: int, milvus_restarts: int, seed: int) -> ChaosResult:
    """The production shape; ``server`` is a started LocalMilvusServer (restarted here)."""
    rng = random.Random(seed)
    res = ChaosResult("PostgreSQL + Milvus server, separate processes", rounds)
    data, inbox, log = work / "data", work / "inbox", work / "chaos.log"
    inbox.mkdir(parents=True)
    (work / "delivered").mkdir()
    env = _base_env(data, db_url, server.uri)
    _setup(env, model, log)
    ledger, seq, state = Ledger(), [0], {"serving": "v1"}
    worker = Proc("worker", ["ingest", "run", "--inbox", str(inbox), "--poll", "0.2",
                             "--batch-size", "8", "--visibility-timeout", "3"],
                  env, work / "worker.log")
    worker.start()
    worker.wait_healthy()
    searcher = Searcher(_service_query(env), lambda: not server.running)
    searcher.thread.start()
    restart_rounds = set(rng.sample(range(1, max(2, rounds)), min(milvus_restarts,
                                                                    max(1, rounds - 1))))
    if milvus_restarts == 0:
        restart_rounds = set()
    t0 = time.monotonic()
    try:
        for r in range(rounds):
            res.fault("bad input", deliver(inbox, ledger, rng, per_round, seq))
            time.sleep(rng.uniform(0.2, 1.5))
            action = rng.random()
            if r in restart_rounds:
                searcher.outage.set()
                server.kill()
                res.fault("Milvus server killed and restarted")
                server.start()
                searcher.outage.clear()
            elif action < 0.45:  # SIGKILL the worker, at random or at a crash point
                worker.kill()
                point = rng.choice([None, *CRASH_POINTS])
                res.fault("worker SIGKILL" if point is None else f"worker crash at {point}")
                worker.start({"CARSEARCH_CRASH_AT": point} if point else None)
                if point is not None:  # it kills itself at that point: then restart plainly
                    _wait_dead(worker, 20)
                    worker.start()
                worker.wait_healthy()
            elif action < 0.65:
                cli(env, "reconcile", "--json", log=log)
                res.fault("reconcile during ingest")
            elif action < 0.85:
                _promote_or_roll_back(env, log, res, state)
            else:
                _drift_twice(env, log, res)
        _drain(env, worker, inbox)
    finally:
        searcher.stop.set()
        searcher.thread.join(30)
        worker.stop()
    _finish(env, log, ledger, res, searcher, t0)
    return res


def _wait_dead(proc: Proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    if proc.alive():  # the crash point was not reached (nothing to ingest): kill it
        proc.kill()


def _service_query(env: dict[str, str]) -> Callable[[], None]:
    """A search through the platform's search service against the server shape."""
    from carsearch.platform.runtime import Platform
    from carsearch.platform.settings import Settings

    settings = Settings(data_dir=Path(env["CARSEARCH_DATA_DIR"]),
                        database_url=env["CARSEARCH_DATABASE_URL"],
                        milvus_uri=env["CARSEARCH_MILVUS_URI"])
    platform = Platform(settings)

    def query() -> None:
        platform.search.search_text("red pickup truck", k=10)

    return query


def _drain(env: dict[str, str], worker: Proc, inbox: Path, timeout_s: float = 600.0) -> None:
    """Keep the worker running until the inbox is empty and no job is queued or running."""
    from carsearch.platform.db import Database, queue

    db = Database(env["CARSEARCH_DATABASE_URL"])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not worker.alive():
                worker.start()
                worker.wait_healthy()
            counts = queue.counts(db)
            waiting = [p for p in inbox.iterdir() if not p.name.startswith(".")]
            if not waiting and counts["queued"] == 0 and counts["running"] == 0:
                return
            time.sleep(0.5)
    finally:
        db.dispose()


def _finish(env: dict[str, str], log: Path, ledger: Ledger, res: ChaosResult,
            searcher: Searcher, t0: float) -> None:
    """The run's figures, one normal reconcile, then the checks."""
    res.seconds = time.monotonic() - t0
    res.queries, res.queries_ok = searcher.ok + searcher.failed, searcher.ok
    res.queries_during_outage, res.query_errors = searcher.during_outage, dict(searcher.errors)
    code, out = cli(env, "reconcile", "--json", "--stale-after", "0", log=log)
    res.final_reconcile = json.loads(out) if code == 0 else {"error": code}
    check(env, ledger, res)


def check(env: dict[str, str], ledger: Ledger, res: ChaosResult) -> None:
    from sqlalchemy import func, select

    from carsearch.platform.db import Image, ImageStatus, IngestJob, JobState
    from carsearch.platform.runtime import Platform
    from carsearch.platform.settings import Settings

    settings = Settings(data_dir=Path(env["CARSEARCH_DATA_DIR"]),
                        database_url=env["CARSEARCH_DATABASE_URL"],
                        milvus_uri=env["CARSEARCH_MILVUS_URI"], search_mirror="off")
    p = Platform(settings)
    try:
        version = p.registry.require_serving()
        in_milvus = p.store.ids(version.collection)
        count = p.store.count(version.collection)
        with p.db.session() as s:
            rows = {r.sha256: r for r in s.scalars(select(Image))}
            dead = list(s.scalars(select(IngestJob).where(IngestJob.state == JobState.dead)))
            waiting = s.scalar(select(func.count()).select_from(IngestJob).where(
                IngestJob.state.in_([JobState.queued, JobState.running])))
        indexed = {r.id for r in rows.values() if r.status == ImageStatus.indexed}
        dead_names = {Path(str(j.payload.get("original_name") or j.payload.get("path"))).name
                      for j in dead if j.last_error}
        res.files_delivered, res.duplicates = ledger.files, ledger.duplicates
        res.bad_sidecars = ledger.bad_sidecars
        res.good_images, res.corrupt_images = len(ledger.good), len(ledger.corrupt)
        res.indexed = len(indexed)
        res.quarantined = sum(r.status == ImageStatus.quarantined for r in rows.values())
        res.dead_jobs = len(dead)
        for j in dead:
            reason = " ".join(str(j.last_error or "no reason").split())[:100]
            res.dead_reasons[reason] = res.dead_reasons.get(reason, 0) + 1
        res.milvus_equals_db = in_milvus == indexed
        for digest, name in ledger.good.items():
            row = rows.get(digest)
            ok = row is not None and row.status == ImageStatus.indexed and row.id in in_milvus
            if not ok and name not in dead_names:
                res.lost += 1
                res.problems.append(f"lost: {name} ({row.status if row else 'no row'})")
        for digest, name in ledger.corrupt.items():
            row = rows.get(digest)
            if not (row is not None and row.status == ImageStatus.quarantined and row.error) \
                    and name not in dead_names:
                res.lost += 1
                res.problems.append(f"corrupt file without a reason: {name}")
        res.doubled = (count - len(in_milvus)) + (len(rows) - len({r.id for r in rows.values()}))
        pending = [r for r in rows.values() if r.status == ImageStatus.pending]
        orphans = in_milvus - indexed
        missing = indexed - in_milvus
        res.stranded = len(pending) + int(waiting or 0) + len(orphans) + len(missing)
        if res.stranded:
            res.problems.append(f"stranded: {len(pending)} pending, {waiting} waiting jobs, "
                                f"{len(orphans)} orphans, {len(missing)} missing")
    finally:
        p.close()


# --- the one-machine shape ----------------------------------------------------------------


def run_lite_shape(work: Path, model: Path, *, rounds: int, per_round: int,
                   seed: int) -> ChaosResult:
    rng = random.Random(seed + 1)
    res = ChaosResult("SQLite + Milvus Lite, one process (serve --ingest)", rounds)
    data, inbox, log = work / "data", work / "inbox", work / "chaos.log"
    inbox.mkdir(parents=True)
    (work / "delivered").mkdir()
    env = _base_env(data, f"sqlite:///{data / 'carsearch.db'}", str(data / "milvus.db"))
    data.mkdir(parents=True)
    _setup(env, model, log)
    ledger, seq, state = Ledger(), [0], {"serving": "v1"}
    port = free_port()
    page = Proc("page", ["serve", "--port", str(port), "--ingest", "--inbox", str(inbox)],
                env, work / "page.log")
    searcher = Searcher(_page_query(port), lambda: not page.alive() or not page.healthy())
    t0 = time.monotonic()
    try:
        for _ in range(rounds):
            point = rng.choice([None, None, *CRASH_POINTS])
            page.start({"CARSEARCH_CRASH_AT": point} if point else None)
            if not page.wait_healthy():
                if point is None:
                    res.problems.append("the page did not come up")
                page.kill()
                page.start()
                page.wait_healthy()
            res.fault("bad input", deliver(inbox, ledger, rng, per_round, seq))
            if not searcher.thread.is_alive():
                searcher.thread.start()
            time.sleep(rng.uniform(1.0, 3.0))
            searcher.outage.set()
            page.kill()
            res.fault("page+worker SIGKILL" if point is None else f"crash at {point}")
            action = rng.random()
            if action < 0.4:
                cli(env, "reconcile", "--json", log=log)
                res.fault("reconcile between crashes")
            elif action < 0.75:
                _promote_or_roll_back(env, log, res, state)
            else:
                cli(env, "drift", "run", "--json", log=log)
                res.fault("drift run between crashes")
            searcher.outage.clear()
        page.start()
        page.wait_healthy()
        _drain(env, page, inbox)
    finally:
        searcher.stop.set()
        if searcher.thread.is_alive():
            searcher.thread.join(30)
        page.stop()
    _finish(env, log, ledger, res, searcher, t0)
    return res


def _page_query(port: int) -> Callable[[], None]:
    url = f"http://127.0.0.1:{port}/"
    holder: dict[str, Any] = {}

    def query() -> None:
        from gradio_client import Client

        if "client" not in holder:
            holder["client"] = Client(url, verbose=False)
        try:
            holder["client"].predict("red pickup", 10, [], [], [], [], "any", "any",
                                     api_name="/search")
        except Exception:
            holder.pop("client", None)  # the page restarted: connect again next time
            raise

    return query


# --- report -------------------------------------------------------------------------------


def markdown(results: list[ChaosResult], machine: str) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reliability: the chaos run",
        "",
        "`bench/chaos.py` drives both shapes with a stream of images (new, duplicate, "
        "corrupt, badly labelled) while it injects faults, then checks the ingest "
        "invariant (README, \"Crash safety\"). `tests/test_chaos.py` runs a bounded form "
        "in CI.",
        "",
        f"Machine: {machine}; {when}. Commands: "
        "`OMP_NUM_THREADS=1 .venv/bin/python bench/chaos.py ...` (its docstring).",
        "",
        "| shape | rounds | minutes | faults injected | files | distinct good images | "
        "corrupt | indexed | quarantined | dead jobs | lost | doubled | stranded | Milvus ids = "
        "indexed ids | queries ok |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        rate = f"{r.queries_ok}/{r.queries} ({100 * r.queries_ok / max(1, r.queries):.1f} %)"
        lines.append(
            f"| {r.shape} | {r.rounds} | {r.seconds / 60:.1f} | {r.total_faults} | "
            f"{r.files_delivered} | {r.good_images} | {r.corrupt_images} | {r.indexed} | "
            f"{r.quarantined} | {r.dead_jobs} | {r.lost} | {r.doubled} | {r.stranded} | "
            f"{'yes' if r.milvus_equals_db else 'NO'} | {rate} |")
    for r in results:
        lines += ["", f"## {r.shape}", "", "| fault | count |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(r.faults.items())]
        lines += ["", f"Queries while a fault had taken down what answers them (the page, "
                  f"or the Milvus server; not counted above): {r.queries_during_outage}. "
                  f"The final reconcile: `{json.dumps(r.final_reconcile)}`."]
        if r.dead_reasons:
            lines += ["", "Dead jobs, by reason (each file's outcome is still checked above):",
                      *[f"- {k}: {n}" for k, n in sorted(r.dead_reasons.items())]]
        if r.query_errors:
            lines += ["", "Failed queries outside those outages, by kind:",
                      *[f"- {k}: {n}" for k, n in sorted(r.query_errors.items())]]
        if r.problems:
            lines += ["", "Problems:", *[f"- {p}" for p in r.problems[:20]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40, help="rounds of the server shape")
    ap.add_argument("--lite-rounds", type=int, default=15, help="rounds of the Lite shape")
    ap.add_argument("--per-round", type=int, default=6, help="files delivered per round")
    ap.add_argument("--milvus-restarts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                    help="maintenance URL of the PostgreSQL server (a database is made)")
    ap.add_argument("--out", type=Path, help="write the markdown here (docs/RELIABILITY.md)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    from carsearch.platform.vectors.server import LocalMilvusServer
    from machine import cpu_name

    results: list[ChaosResult] = []
    with tempfile.TemporaryDirectory(prefix="carsearch-chaos-") as tmp:
        work = Path(tmp)
        model = build_model(work / "model")
        if args.lite_rounds:
            results.append(run_lite_shape(work / "lite", model, rounds=args.lite_rounds,
                                          per_round=args.per_round, seed=args.seed))
            print(markdown(results[-1:], "-"), flush=True)
        if args.rounds:
            with pg_database(args.pg) as url, LocalMilvusServer(work / "milvus") as server:
                results.append(run_server_shape(
                    work / "server", model, url, server, rounds=args.rounds,
                    per_round=args.per_round, milvus_restarts=args.milvus_restarts,
                    seed=args.seed))
    text = markdown(results, f"{cpu_name()}, {os.cpu_count()} logical CPUs")
    print(text)
    if args.out:
        args.out.write_text(text + kept_sections(args.out), encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=2, default=str))


def kept_sections(out: Path) -> str:
    """What of an existing report this run does not write: its Security section."""
    old = out.read_text(encoding="utf-8") if out.is_file() else ""
    at = old.find("\n# Security")
    return "\n" + old[at:].lstrip("\n") if at >= 0 else ""


def build_model(out: Path) -> Path:
    from carsearch.training.base_model import build_compact_base

    build_compact_base(out, seed=0)
    return out


class pg_database:
    """A fresh PostgreSQL database for the run, dropped at the end."""

    def __init__(self, server_url: str) -> None:
        import uuid

        self.server_url = server_url
        self.name = f"carsearch_chaos_{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> str:
        import sqlalchemy as sa

        engine = sa.create_engine(self.server_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{self.name}"'))
        engine.dispose()
        return self.server_url.rsplit("/", 1)[0] + "/" + self.name

    def __exit__(self, *exc: object) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(self.server_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        engine.dispose()


if __name__ == "__main__":
    main()
