"""The scale run on the production shape: ingest workers on PostgreSQL + a Milvus server.

    nice -n 15 .venv/bin/python bench/bench_scale.py --n 200000 --workers 1,2 \
        --out scale.json --markdown scale.md

What it does, end to end through the product's own queue and worker:

1. a fresh PostgreSQL database (``--pg`` server URL; the database is created and dropped)
   and a Milvus server of its own (``milvus-server``, as the suite starts it) unless
   ``--milvus-uri`` names one;
2. the compact model (random, 64 px) published and promoted;
3. ``--n`` generated JPEGs (``--size``, default 128x96: smooth random colour fields, each
   different) written straight into the image store by content hash, as the inbox scan
   leaves them, with class-name and colour labels in each job's payload; all queued;
4. ``carsearch ingest run`` worker processes: the first ``workers[0]`` of them at once, the
   next worker count when ``--switch-at`` of the jobs are done, and so on; images/s per
   worker count read from the queue's done count every few seconds (each new phase's
   first ``--warmup-s`` seconds, while its model loads, are left out);
5. a search burst while the last phase ingests (8 clients, ``--probe-queries`` each), then,
   after the collection is flushed and indexed, 8 concurrent clients through the search
   service (encode + Milvus + metadata + query log): p50/p95/p99 per search;
6. recall@k of the server's HNSW search against FAISS exact (IndexFlatIP over every stored
   vector, read back from Milvus) for the same query vectors; the ingest invariant (Milvus
   ids = the database's indexed rows) checked;
7. peak RSS of every process (worker, Milvus server, this process with the 8 clients).

``--deadline HH:MM`` (UTC) stops the ingest there and measures what was indexed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

from machine import cpu_name

log = logging.getLogger("bench_scale")

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "carsearch.cli"]
COLOURS = ["red", "blue", "black", "white", "silver", "green", "yellow", "grey"]
FALLBACK_CLASSES = ["Chevrolet Silverado 1500 Regular Cab 2012", "BMW M3 Coupe 2012",
                    "Jeep Wrangler SUV 2012", "Ford F-150 Regular Cab 2007",
                    "Audi S4 Sedan 2012", "Honda Odyssey Minivan 2012"]


# --- images ---------------------------------------------------------------------------------


def class_names() -> list[str]:
    from carsearch.training.base_model import stanford_class_names

    try:
        names = stanford_class_names()
    except Exception:  # no Stanford metadata here: a short list stands in
        names = []
    return names or FALLBACK_CLASSES


def jpeg_bytes(i: int, size: tuple[int, int]) -> bytes:
    """Image ``i``: a smooth random colour field (a 6x8 grid upscaled), as a JPEG."""
    from PIL import Image

    rng = np.random.default_rng(i)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    small.resize(size, Image.Resampling.BILINEAR).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _write_chunk(args: tuple[int, int, str, tuple[int, int]]) -> list[tuple[int, str]]:
    start, stop, image_dir, size = args
    from carsearch.ingest.pipeline import store_path

    out = []
    for i in range(start, stop):
        data = jpeg_bytes(i, size)
        digest = hashlib.sha256(data).hexdigest()
        dest = store_path(Path(image_dir), digest, ".jpg")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        out.append((i, str(dest)))
    return out


def generate(n: int, image_dir: Path, size: tuple[int, int], procs: int = 2
             ) -> list[tuple[int, str]]:
    chunks = [(s, min(n, s + 2000), str(image_dir), size) for s in range(0, n, 2000)]
    with Pool(procs) as pool:
        return [x for part in pool.imap(_write_chunk, chunks) for x in part]


def enqueue_all(db: Any, files: Sequence[tuple[int, str]], collection: str) -> None:
    from carsearch.platform.db import queue

    names = class_names()
    for s in range(0, len(files), 5000):
        queue.enqueue(db, [
            {"path": path, "source": "scale", "original_name": f"s{i}.jpg",
             "collection": collection,
             "meta": {"class_name": names[i % len(names)], "colour": COLOURS[i % 8]}}
            for i, path in files[s:s + 5000]])


# --- processes ------------------------------------------------------------------------------


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    got = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+)", text, re.M))
    return int(got.get("VmRSS", 0)), int(got.get("VmHWM", 0))


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pg_backend_cpu_s() -> float:
    """CPU seconds of every PostgreSQL backend process seen now (the server's own)."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "postgres":
                    total += cpu_seconds(int(d.name))
            except OSError:
                continue
    return total


def group_pids(pgid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(d.name))
    return pids


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes] | None = None
    pgid: int = 0
    peak_kib: dict[int, int] = field(default_factory=dict)  # pid -> VmHWM seen
    cpu_s: dict[int, float] = field(default_factory=dict)  # pid -> user+sys CPU seen

    def sample(self) -> int:
        """RSS of the whole process group now (KiB); remembers each pid's peak and CPU."""
        total = 0
        for pid in group_pids(self.pgid):
            rss, hwm = rss_kib(pid)
            total += rss
            self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), hwm)
            self.cpu_s[pid] = max(self.cpu_s.get(pid, 0.0), cpu_seconds(pid))
        return total

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_s.values())

    @property
    def peak_mib(self) -> float:
        """The peak RSS of the group's largest process."""
        return max(self.peak_kib.values(), default=0) / 1024


def start_worker(n: int, env: dict[str, str], root: Path, batch: int) -> Proc:
    from carsearch.platform.vectors.server import free_ports

    port = free_ports(1)[0]
    out = (root / f"worker{n}.log").open("wb")
    p = subprocess.Popen(
        [*CLI, "ingest", "run", "--batch-size", str(batch), "--poll", "0.5",
         "--visibility-timeout", "300", "--health-port", str(port)],
        env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Proc(f"worker{n}", p, p.pid)


def stop(proc: Proc) -> None:
    if proc.popen is None or proc.popen.poll() is not None:
        return
    proc.sample()
    os.killpg(proc.pgid, signal.SIGTERM)
    try:
        proc.popen.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pgid, signal.SIGKILL)
        proc.popen.wait()


# --- PostgreSQL -----------------------------------------------------------------------------


@contextmanager
def pg_database(server_url: str, name: str = "") -> Iterator[str]:
    import sqlalchemy as sa

    name = name or f"carsearch_scale_{os.getpid()}"
    admin = sa.create_engine(server_url.rsplit("/", 1)[0] + "/postgres",
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- the ingest -----------------------------------------------------------------------------


@dataclass
class Phase:
    workers: int
    started_s: float
    ended_s: float = 0.0
    done_start: int = 0
    done_end: int = 0
    warmup_s: float = 0.0
    done_after_warmup: int = 0

    @property
    def images_per_s(self) -> float:
        dt = self.ended_s - self.started_s - self.warmup_s
        return (self.done_end - self.done_after_warmup) / dt if dt > 0 else float("nan")


@dataclass
class IngestRun:
    n: int
    phases: list[Phase] = field(default_factory=list)
    timeline: list[tuple[float, int, int, float]] = field(default_factory=list)
    # (s, done, dead, load average)
    done: int = 0
    dead: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


def search_load(platform: Any, queries: Sequence[str], clients: int, k: int
                ) -> dict[str, float]:
    """``clients`` threads through the search service, every query once: latency per call."""
    from carsearch.platform.search.service import SearchRequest

    lat: list[float] = []
    lock = threading.Lock()

    def one(q: str) -> None:
        t0 = time.perf_counter()
        platform.search.search(SearchRequest(q, k))
        dt = time.perf_counter() - t0
        with lock:
            lat.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, queries))
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"queries": len(lat), "clients": clients, "qps": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def make_queries(n: int, seed: int = 1) -> list[str]:
    names = class_names()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        name = names[int(rng.integers(len(names)))]
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        out.append(f"{colour} {name}" if rng.random() < 0.5 else name)
    return out


def run_ingest(args: argparse.Namespace, env: dict[str, str], root: Path, db: Any,
               procs: list[Proc], probe: Any) -> IngestRun:
    from carsearch.platform.db import queue

    counts = [int(x) for x in args.workers.split(",")]
    switch = [float(x) for x in args.switch_at.split(",")] if args.switch_at else []
    switch = (switch + [1.0] * len(counts))[: len(counts) - 1]
    run = IngestRun(args.n)
    deadline = _deadline(args.deadline)
    t0 = time.monotonic()
    probed = False

    def begin_phase(w: int) -> None:
        now = time.monotonic() - t0
        done = queue.counts(db)["done"]
        if run.phases:
            run.phases[-1].ended_s, run.phases[-1].done_end = now, done
        while len([p for p in procs if p.name.startswith("worker")]) < w:
            procs.append(start_worker(len(procs), env, root, args.batch))
        run.phases.append(Phase(w, now, done_start=done, warmup_s=args.warmup_s,
                                done_after_warmup=done))
        log.info("phase: %d worker(s) from %.0f s (%d done)", w, now, done)

    begin_phase(counts[0])
    warm_marked = False
    while True:
        time.sleep(args.poll_s)
        now = time.monotonic() - t0
        c = queue.counts(db)
        run.done, run.dead = c["done"], c["dead"]
        run.timeline.append((round(now, 1), run.done, run.dead, os.getloadavg()[0]))
        for p in procs:
            p.sample()
        ph = run.phases[-1]
        if not warm_marked and now >= ph.started_s + ph.warmup_s:
            ph.done_after_warmup, warm_marked = run.done, True
        for p in procs:
            if p.popen is not None and p.popen.poll() is not None:
                raise SystemExit(f"{p.name} exited {p.popen.returncode}: see {root}/{p.name}.log")
        if run.done + run.dead >= args.n:
            break
        if deadline is not None and time.time() >= deadline:
            log.warning("deadline reached at %d done: stopping the ingest", run.done)
            run.stopped_early = True
            break
        k = len(run.phases)
        if k < len(counts) and run.done >= switch[k - 1] * args.n:
            begin_phase(counts[k])
            warm_marked = False
        if (not probed and len(run.phases) == len(counts) and warm_marked
                and run.done >= args.probe_at * args.n):
            probed = True
            probe(run.done)
    ph = run.phases[-1]
    ph.ended_s, ph.done_end = time.monotonic() - t0, run.done
    if not warm_marked:
        ph.warmup_s, ph.done_after_warmup = 0.0, ph.done_start
    run.seconds = ph.ended_s
    return run


def _deadline(text: str | None) -> float | None:
    if not text:
        return None
    hh, mm = (int(x) for x in text.split(":"))
    now = datetime.now(UTC)
    return now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()


# --- recall ---------------------------------------------------------------------------------


def read_back(store: Any, collection: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Every (id, vector) stored in ``collection``, read back from Milvus."""
    ids, vecs = [], []
    t0 = time.perf_counter()
    for page in store.scan(collection, ["id", "vector"]):
        ids.extend(int(r["id"]) for r in page)
        vecs.extend(r["vector"] for r in page)
    return (np.array(ids, dtype=np.int64), np.asarray(vecs, dtype=np.float32),
            time.perf_counter() - t0)


def ann_ids(store: Any, collection: str, qvecs: np.ndarray, k: int, ef: int
            ) -> list[list[tuple[int, float]]]:
    """The server's HNSW top-k at one ``ef`` (the client's own search, no filter)."""
    res = store.client.search(collection, data=[v.tolist() for v in qvecs], limit=k,
                              search_params={"metric_type": "IP", "params": {"ef": ef}},
                              consistency_level="Strong")
    return [[(int(h["id"]), float(h["distance"])) for h in q] for q in res]


def recall_vs_exact(store: Any, collection: str, qsets: dict[str, np.ndarray], k: int,
                    efs: Sequence[int] = (64, 128, 256, 512)) -> dict[str, Any]:
    """Recall@k of the server's HNSW against FAISS exact (IndexFlatIP over every stored
    vector) per query set and ef; also a tie-aware recall (a returned hit counts when its
    exact inner product is at least the exact k-th one's, less 1e-5), the spread of the
    exact top-k scores (how close the k-th is to the (k+1)-th) and how many stored
    vectors are exact duplicates of another."""
    import faiss

    ids, vecs, read_s = read_back(store, collection)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    pos = {int(i): n for n, i in enumerate(ids)}
    uniq = len(np.unique(vecs.round(6), axis=0))
    out: dict[str, Any] = {"k": k, "vectors": len(ids), "scan_s": read_s,
                           "distinct_vectors": uniq, "sets": {}}
    for label, qvecs in qsets.items():
        q = qvecs.astype(np.float32)
        dist, exact = index.search(q, k + 1)
        kth = dist[:, k - 1]
        gap = dist[:, k - 1] - dist[:, k]
        row: dict[str, Any] = {"queries": len(q),
                               "kth_score_median": float(np.median(kth)),
                               "top1_minus_kth_median": float(np.median(dist[:, 0] - kth)),
                               "kth_minus_next_median": float(np.median(gap)),
                               "ef": {}}
        for ef in efs:
            hits = ann_ids(store, collection, q, k, ef)
            plain, tie = [], []
            for r, hs in enumerate(hits):
                truth = set(ids[exact[r, :k]].tolist())
                got = [h for h, _ in hs]
                plain.append(len(set(got) & truth) / k)
                scores = [float(vecs[pos[h]] @ q[r]) for h in got if h in pos]
                tie.append(sum(sc >= kth[r] - 1e-5 for sc in scores) / k)
            row["ef"][ef] = {"recall": float(np.mean(plain)), "recall_ties": float(np.mean(tie))}
        out["sets"][label] = row
    return out


def describe_vector_index(store: Any, collection: str) -> dict[str, Any]:
    """The vector index as the server describes it (rows indexed, pending, state)."""
    for name in store.client.list_indexes(collection):
        desc = store.client.describe_index(collection, name)
        if desc.get("field_name") == "vector":
            return {k: v for k, v in desc.items() if k != "params"}
    return {}


# --- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--workers", default="1,2", help="worker counts, one phase each")
    ap.add_argument("--switch-at", default="0.25",
                    help="fractions of --n done at which the next phase starts")
    ap.add_argument("--size", default="128x96")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--queries", type=int, default=400, help="queries in the final search")
    ap.add_argument("--probe-queries", type=int, default=160,
                    help="queries in the search burst during the last ingest phase")
    ap.add_argument("--probe-at", type=float, default=0.6)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--warmup-s", type=float, default=30.0)
    ap.add_argument("--poll-s", type=float, default=5.0)
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--pg-db", default="",
                    help="the database to create and drop (default carsearch_scale_<pid>)")
    ap.add_argument("--milvus-uri", default="")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--deadline", default=None, help="HH:MM UTC: stop the ingest there")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("carsearch", "pymilvus", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = run(a)
    text = json.dumps(report, indent=1, default=str)
    if a.out:
        a.out.write_text(text)
    print(markdown(report))


def run(a: argparse.Namespace) -> dict[str, Any]:
    from carsearch.platform.runtime import Platform
    from carsearch.platform.settings import Settings
    from carsearch.platform.vectors.server import LocalMilvusServer
    from carsearch.training.base_model import build_compact_base

    size = tuple(int(x) for x in a.size.split("x"))
    assert len(size) == 2
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=a.workdir, prefix="bench-scale-") as tmp, \
            pg_database(a.pg, a.pg_db) as url:
        root = Path(tmp)
        procs: list[Proc] = []
        server = None
        try:
            uri = a.milvus_uri
            if not uri:
                server = LocalMilvusServer(root / "milvus")
                uri = server.start()
                assert server.proc is not None
                procs.append(Proc("milvus-server", server.proc, server.proc.pid))
            env = {k: v for k, v in os.environ.items() if not k.startswith("CARSEARCH_")}
            env.update(CARSEARCH_DATA_DIR=str(root / "data"), CARSEARCH_DATABASE_URL=url,
                       CARSEARCH_MILVUS_URI=uri, CARSEARCH_THREADS__TORCH="1",
                       OMP_NUM_THREADS="1", CARSEARCH_LOG_LEVEL="WARNING",
                       PYTHONUNBUFFERED="1")
            subprocess.run([*CLI, "db", "upgrade"], env=env, check=True,
                           capture_output=True)
            model = root / "compact"
            build_compact_base(model, seed=0)
            subprocess.run([*CLI, "models", "publish", str(model), "--name", "scale",
                            "--promote"], env=env, check=True, capture_output=True)
            settings = Settings(data_dir=root / "data", database_url=url, milvus_uri=uri,
                                search_mirror="off")
            platform = Platform(settings)
            version = platform.registry.require_serving()
            t0 = time.perf_counter()
            files = generate(a.n, settings.image_dir, size)  # type: ignore[arg-type]
            gen_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            enqueue_all(platform.db, files, version.image_collection)
            enq_s = time.perf_counter() - t0
            log.info("%d JPEGs written in %.0f s, queued in %.0f s", a.n, gen_s, enq_s)
            platform.search.warm(wait=True)
            probe_result: dict[str, Any] = {}

            def probe(done: int) -> None:
                log.info("search burst during ingest at %d done", done)
                probe_result.update(search_load(platform, make_queries(a.probe_queries, 2),
                                                a.clients, a.k), indexed_then=done)

            pg_cpu_start = pg_backend_cpu_s()
            ingest = run_ingest(a, env, root, platform.db, procs, probe)
            pg_cpu_end = pg_backend_cpu_s()
            if a.out:  # what the ingest measured, in case a later step fails
                a.out.with_suffix(".ingest.json").write_text(json.dumps(
                    asdict(ingest) | {"cpu_s": {p.name: p.total_cpu_s for p in procs},
                                      "pg_cpu_s": pg_cpu_end - pg_cpu_start}, default=str))
            for p in procs:
                if p.name.startswith("worker"):
                    stop(p)
            coll = version.collection
            t0 = time.perf_counter()
            platform.store.flush(coll)
            from bench_server import wait_for_index

            wait_for_index(platform.store, coll, ingest.done)  # type: ignore[arg-type]
            settle_s = time.perf_counter() - t0
            milvus_n = platform.store.count(coll)
            import sqlalchemy as sa

            from carsearch.platform.db import Image, ImageStatus

            with platform.db.session() as s:
                db_n = s.scalar(sa.select(sa.func.count()).select_from(Image).where(
                    Image.status == ImageStatus.indexed))
            index_state = describe_vector_index(platform.store, coll)
            enc = platform.search.encoder_for(version)
            rng = np.random.default_rng(4)
            ids_now, vecs_now, _ = read_back(platform.store, coll)
            qsets = {"text": np.asarray(enc.encode_text(make_queries(200, 3))),
                     "image": vecs_now[rng.choice(len(vecs_now), 200, replace=False)]}
            del ids_now, vecs_now
            recall = recall_vs_exact(platform.store, coll, qsets, a.k)
            search = search_load(platform, make_queries(a.queries), a.clients, a.k)
            # The same after a release and load: the query node then holds the sealed,
            # indexed segments whatever it served from before (bench_server's settle).
            t0 = time.perf_counter()
            platform.store.client.release_collection(coll)
            platform.store.client.load_collection(coll)
            reload_s = time.perf_counter() - t0
            recall_reloaded = recall_vs_exact(platform.store, coll, qsets, a.k)
            search_reloaded = search_load(platform, make_queries(a.queries), a.clients, a.k)
            for p in procs:
                p.sample()
            platform.close()
        finally:
            for p in procs:
                if p.name.startswith("worker"):
                    stop(p)
            if server is not None:
                for p in procs:
                    if p.name == "milvus-server":
                        p.sample()
                server.stop()
    return {
        "machine": cpu_name(), "cpus": os.cpu_count(),
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "load_start": load_start, "load_end": os.getloadavg()[0],
        "nice": os.nice(0), "n": a.n, "size": a.size, "batch": a.batch,
        "model": f"compact (random, 64 px, dim {version.dim})",
        "generate_s": gen_s, "enqueue_s": enq_s, "settle_s": settle_s,
        "ingest": asdict(ingest) | {"phases": [asdict(p) | {"images_per_s": p.images_per_s}
                                               for p in ingest.phases]},
        "milvus_count": milvus_n, "db_indexed": db_n,
        "search_during_ingest": probe_result, "search": search, "recall": recall,
        "index_state": index_state, "reload_s": reload_s,
        "recall_reloaded": recall_reloaded, "search_reloaded": search_reloaded,
        "cpu_s": {p.name: round(p.total_cpu_s, 1) for p in procs}
        | {"postgres (all backends, delta)": round(pg_cpu_end - pg_cpu_start, 1),
           "bench": round(time.process_time(), 1)},
        "peak_rss_mib": {p.name: round(p.peak_mib, 1) for p in procs}
        | {"bench (8 clients, FAISS)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
    }


def markdown(r: dict[str, Any]) -> str:
    ing = r["ingest"]
    lines = [
        f"Machine: {r['machine']}, {r['cpus']} logical CPUs; {r['date']}; nice {r['nice']}; "
        f"load average {r['load_start']:.1f} at start, {r['load_end']:.1f} at end. "
        f"{r['n']:,} generated {r['size']} JPEGs, {r['model']}, batch {r['batch']}; "
        f"written in {r['generate_s']:.0f} s, queued in {r['enqueue_s']:.0f} s.", "",
        "| workers | from (s) | to (s) | images done in phase | images/s (after warm-up) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in ing["phases"]:
        lines.append(f"| {p['workers']} | {p['started_s']:.0f} | {p['ended_s']:.0f} | "
                     f"{p['done_end'] - p['done_start']:,} | {p['images_per_s']:.1f} |")
    early = " (stopped at the deadline)" if ing["stopped_early"] else ""
    lines += ["", f"Ingested {ing['done']:,} of {r['n']:,} ({ing['dead']} dead) in "
              f"{ing['seconds']:.0f} s{early}"
              f"; Milvus holds {r['milvus_count']:,}, the database {r['db_indexed']:,} indexed "
              f"rows; flush + index {r['settle_s']:.0f} s.", "",
              "| search | clients | queries | QPS | p50 ms | p95 ms | p99 ms |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for label, s in (("during ingest", r["search_during_ingest"]), ("after ingest", r["search"])):
        if s:
            lines.append(f"| {label} | {s['clients']} | {s['queries']} | {s['qps']:.1f} | "
                         f"{s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['p99_ms']:.1f} |")
    for label, s in (("after reload", r.get("search_reloaded")),):
        if s:
            lines.append(f"| {label} | {s['clients']} | {s['queries']} | {s['qps']:.1f} | "
                         f"{s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['p99_ms']:.1f} |")
    lines += ["", f"Index: {r.get('index_state')}; release + load {r.get('reload_s', 0):.0f} s.",
              "", "| recall@k vs FAISS exact | queries | ef | recall | recall (ties) |",
              "|---|---:|---:|---:|---:|"]
    for when in ("recall", "recall_reloaded"):
        rc = r.get(when)
        if not rc:
            continue
        for label, row in rc["sets"].items():
            for ef, v in row["ef"].items():
                lines.append(f"| {when}, {label} | {row['queries']} | {ef} | "
                             f"{v['recall']:.4f} | {v['recall_ties']:.4f} |")
    rc = r["recall"]
    lines += ["", f"{rc['vectors']:,} vectors ({rc['distinct_vectors']:,} distinct), "
              f"k {rc['k']}.", "",
              "| process | peak RSS MiB |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in r["peak_rss_mib"].items()]
    lines += ["", "CPU seconds (user + sys): " + ", ".join(
        f"{k} {v:,.0f}" for k, v in r.get("cpu_s", {}).items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
