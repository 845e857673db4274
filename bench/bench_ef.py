"""HNSW's search ef, and the interim index's nprobe, against recall@10 on a trained
model's text queries (Milvus server).

    python bench/bench_ef.py --model RUN/model --cache /work/cache/feat \\
        --sizes 8144,100000 --efs 32,64,96,128,192,256,512 --json ef.json
    python bench/bench_ef.py --model RUN/model --cache /work/cache/feat \\
        --interim 50000 --nprobes 16,32,64,128,off --json interim.json

Vectors: every Stanford Cars photo (train and test, 8,144) as the trained model embeds
its box crop (the cached backbone features through the model's image projection).
Sizes above 8,144 add synthetic rows: a real photo's cached features under dropout
(`--copy-dropout`, the recipe's 0.3 feature dropout, rescaled) through the same
projection: stand-ins for more photos of the same cars, not real photos. Queries: the
196 class names and bench_pretrained's held-out phrasings (3 a class, strings no
training saw) through the model's text tower (the product's Encoder), and 200 stored
real image vectors. Ground truth: FAISS IndexFlatIP over the vectors read back from
Milvus (bench_scale's `recall_vs_exact`, with its tie-aware recall).

`--sizes`: for each size a Milvus 2.3.5 server of its own (`LocalMilvusServer`), the
platform's index (HNSW M 16 / efConstruction 200), the rows upserted, flushed, the index
waited for, then the collection released and loaded, so every segment is sealed and
searched through its HNSW (bench_scale's finding: right after the index wait part of
the data is still searched exactly). Recall@10 per ef, and the p50 of one text query at
a time per ef.

`--lite-ef-construction 200,100`: `--lite-rows` rows into a Milvus Lite file per
efConstruction (CPU seconds of the upsert, flush and index build: this process's and
its children's, Milvus Lite's server among them, reaped when the store closes),
recall@10 per ef: the check a lower efConstruction for Lite (the restore's lever,
docs/BENCHMARKS.md) needs.

`--interim N`: N rows left in growing segments (no flush; below the seal size) on a
server started with `queryNode.segcore.interimIndex.nprobe` at each of `--nprobes`
(`off`: the interim index disabled, a brute-force scan of growing rows), searched at the
platform's ef: what a query sees of rows not yet sealed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_pretrained import heldout_phrasings
from bench_scale import recall_vs_exact
from carsearch.data.stanford import load_stanford
from carsearch.platform.models.encoder import Encoder
from carsearch.platform.vectors.milvus import IndexSpec, MilvusStore
from carsearch.platform.vectors.protocol import VectorRow
from carsearch.platform.vectors.server import LocalMilvusServer
from carsearch.training.stage1 import features_for, image_embeddings_from_features
from carsearch.training.train_data import generated_queries
from carsearch.training.trainer import load_base
from machine import machine_line

log = logging.getLogger("bench_ef")
REPO = Path(__file__).resolve().parents[1]
NAME = "bench_ef"


def cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def embed(model: Path, root: Path, cache: Path, n: int, copy_dropout: float,
          seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """(image vectors: the real photos, then synthetic rows up to n; query sets)."""
    dataset = load_stanford(root)
    train, test = dataset.split("train"), dataset.split("test")
    items = train + test
    net, processor = load_base(str(model))
    net.eval()
    feats = features_for(net, processor, dataset, items, cache, progress=False)
    parts = [image_embeddings_from_features(net, feats)]
    rng = np.random.default_rng(seed)
    extra = max(0, n - len(items))
    for lo in range(0, extra, 10_000):
        pick = rng.integers(0, len(items), min(10_000, extra - lo))
        keep = rng.random((len(pick), feats.shape[1])) >= copy_dropout
        copies = (feats[pick] * keep / (1.0 - copy_dropout)).astype(np.float32)
        parts.append(image_embeddings_from_features(net, copies))
    vectors = np.concatenate(parts)[:n].astype(np.float32)
    seen = {x.label.class_name.lower() for x in train}
    seen |= {q.lower() for qs in generated_queries(train, 0).values() for q in qs}
    heldout = [q for q, _ in heldout_phrasings(test, seen)]
    names = sorted({x.label.class_name for x in items})
    encoder = Encoder(model)
    real = min(len(items), n)
    qsets = {"text: class names": encoder.encode_text(names),
             "text: held-out phrasings": encoder.encode_text(heldout),
             "image: stored photos": vectors[rng.choice(real, 200, replace=False)]}
    info = {"real_rows": real, "synthetic_rows": n - real, "dim": int(vectors.shape[1]),
            "queries": {k: len(v) for k, v in qsets.items()}}
    return vectors, qsets, info


def load_rows(store: MilvusStore, vectors: np.ndarray) -> float:
    store.ensure_collection(NAME, vectors.shape[1])
    t = time.perf_counter()
    for lo in range(0, len(vectors), 5_000):
        chunk = vectors[lo:lo + 5_000]
        store.upsert(NAME, list(range(lo + 1, lo + len(chunk) + 1)), chunk,
                     [VectorRow(source="bench")] * len(chunk))
    return time.perf_counter() - t


def latency(store: MilvusStore, queries: np.ndarray, ef: int, n: int = 100) -> float:
    """p50 ms of one query at a time (the search page's shape), after two warm-ups, at
    the platform's search consistency (Session): a Strong search on the 2.3 server waits
    for the next time tick (about 400 ms here, whatever ef), which would hide ef's cost."""

    def one(q: np.ndarray) -> None:
        store.client.search(NAME, data=[q.tolist()], limit=10, consistency_level="Session",
                            search_params={"metric_type": "IP", "params": {"ef": ef}})

    qs = queries[:n]
    for q in qs[:2]:
        one(q)
    ms = []
    for q in qs:
        t = time.perf_counter()
        one(q)
        ms.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(ms, 50))


def sealed(vectors: np.ndarray, qsets: dict[str, np.ndarray], efs: list[int],
           work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": len(vectors), "load_start": os.getloadavg()[0]}
    c0 = cpu_s()
    with LocalMilvusServer(work / f"sealed-{len(vectors)}") as server:
        store = MilvusStore(server.uri, index=IndexSpec.default_for(False),
                            consistency="Strong")
        try:
            out["insert_s"] = load_rows(store, vectors)
            t = time.perf_counter()
            store.flush(NAME)
            store.wait_for_index(NAME, len(vectors), timeout_s=1800)
            store.client.release_collection(NAME)
            store.client.load_collection(NAME)
            out["index_s"] = time.perf_counter() - t
            out["recall"] = recall_vs_exact(store, NAME, qsets, 10, efs)
            text = np.concatenate([v for k, v in qsets.items() if k.startswith("text")])
            out["p50_ms"] = {ef: latency(store, text, ef) for ef in efs}
        finally:
            store.close()
    out["load_end"] = os.getloadavg()[0]
    out["bench_cpu_s"] = cpu_s() - c0  # this process only: the server is not a child
    return out


def lite(vectors: np.ndarray, qsets: dict[str, np.ndarray], efs: list[int],
         ef_constructions: list[int], work: Path) -> list[dict[str, Any]]:
    out = []
    for efc in ef_constructions:
        row: dict[str, Any] = {"rows": len(vectors), "efConstruction": efc,
                               "load_start": os.getloadavg()[0]}
        path = str(work / f"lite-{efc}.db")
        spec = IndexSpec("HNSW", {"M": 16, "efConstruction": efc}, {"ef": 64})
        c0, t0 = cpu_s(), time.perf_counter()  # Lite's server process is a child
        store = MilvusStore(path, index=spec)
        try:
            load_rows(store, vectors)
            store.flush(NAME)
        finally:
            store.close()  # Milvus Lite's close waits for the index build
        row["build_cpu_s"] = cpu_s() - c0
        row["build_wall_s"] = time.perf_counter() - t0
        store = MilvusStore(path, index=spec)
        try:
            row["recall"] = recall_vs_exact(store, NAME, qsets, 10, efs)
        finally:
            store.close()
        row["load_end"] = os.getloadavg()[0]
        out.append(row)
        log.info("lite efConstruction %d: %.1f CPU s; %s", efc, row["build_cpu_s"],
                 {k: {e: round(_at(v["ef"], e)["recall"], 3) for e in efs}
                  for k, v in row["recall"]["sets"].items()})
    return out


def interim(vectors: np.ndarray, qsets: dict[str, np.ndarray], nprobes: list[str],
            ef: int, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": len(vectors), "ef": ef, "configs": {}}
    for nprobe in nprobes:
        config: dict[str, str | int | float | bool] = (
            {"queryNode.segcore.interimIndex.enableIndex": False} if nprobe == "off"
            else {"queryNode.segcore.interimIndex.nprobe": int(nprobe)})
        row: dict[str, Any] = {"extra_config": config, "load_start": os.getloadavg()[0]}
        with LocalMilvusServer(work / f"interim-{nprobe}", extra_config=config) as server:
            store = MilvusStore(server.uri, index=IndexSpec.default_for(False),
                                consistency="Strong")
            try:
                row["insert_s"] = load_rows(store, vectors)
                time.sleep(5)  # the growing segments' interim index (built as rows arrive)
                row["index"] = store.index_info(NAME)
                row["indexed_rows"] = store.indexed_rows(NAME)
                row["recall"] = recall_vs_exact(store, NAME, qsets, 10, [ef])
                text = np.concatenate([v for k, v in qsets.items() if k.startswith("text")])
                row["p50_ms"] = latency(store, text, ef)
                row["indexed_rows_after"] = store.indexed_rows(NAME)
            finally:
                store.close()
        row["load_end"] = os.getloadavg()[0]
        out["configs"][nprobe] = row
        log.info("interim %s: %s", nprobe, {k: v["ef"] for k, v in
                                            row["recall"]["sets"].items()})
    return out


def _at(by_ef: dict[Any, Any], ef: int) -> Any:
    """One ef's entry, whether the keys are ints (this run) or strings (a JSON's)."""
    return by_ef[ef] if ef in by_ef else by_ef[str(ef)]


def _recall_rows(sets: dict[str, Any], efs: list[Any]) -> list[str]:
    """A recall table's header and one row per query set, a column per ef."""
    rows = ["| queries | " + " | ".join(f"ef {e}" for e in efs) + " |",
            "|---|" + "---:|" * len(efs)]
    for label, s in sets.items():
        rows.append(f"| {label} ({s['queries']}) | " + " | ".join(
            f"{_at(s['ef'], e)['recall']:.3f}" for e in efs) + " |")
    return rows


def table(report: dict[str, Any]) -> str:
    lines = []
    for size in report.get("sealed", []):
        efs = list(size["p50_ms"])
        lines.append(f"\n{size['rows']:,} rows (sealed, HNSW), load "
                     f"{size['load_start']:.1f}-{size['load_end']:.1f}\n")
        lines += _recall_rows(size["recall"]["sets"], efs)
        lines.append("| p50 ms, one text query | " + " | ".join(
            f"{size['p50_ms'][e]:.1f}" for e in efs) + " |")
    for row in report.get("lite", []):
        efs = list(next(iter(row["recall"]["sets"].values()))["ef"])
        lines.append(f"\nMilvus Lite, {row['rows']:,} rows, efConstruction "
                     f"{row['efConstruction']}: upsert + flush + build {row['build_cpu_s']:.1f} "
                     f"CPU s ({row['build_wall_s']:.1f} s wall, load {row['load_start']:.1f})\n")
        lines += _recall_rows(row["recall"]["sets"], efs)
    if report.get("interim"):
        r = report["interim"]
        lines.append(f"\n{r['rows']:,} rows in growing segments (interim index), ef "
                     f"{r['ef']}\n")
        labels = list(next(iter(r["configs"].values()))["recall"]["sets"])
        lines.append("| interim nprobe | " + " | ".join(labels) + " | p50 ms | load |")
        lines.append("|---|" + "---:|" * (len(labels) + 2))
        for name, row in r["configs"].items():
            sets = row["recall"]["sets"]
            lines.append(f"| {name} | " + " | ".join(
                f"{_at(sets[k]['ef'], r['ef'])['recall']:.3f}" for k in labels)
                + f" | {row['p50_ms']:.1f} | {row['load_start']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=False)
    p.add_argument("--root", type=Path, default=REPO.parent / "shared" / "stanford_cars")
    p.add_argument("--cache", type=Path, default=Path("/tmp/bench_ef/featcache"))
    p.add_argument("--sizes", type=str, default="")
    p.add_argument("--efs", type=str, default="32,64,96,128,192,256,512")
    p.add_argument("--interim", type=int, default=0, help="rows left growing")
    p.add_argument("--nprobes", type=str, default="16,32,64,128,off")
    p.add_argument("--interim-ef", type=int, default=64)
    p.add_argument("--copy-dropout", type=float, default=0.3)
    p.add_argument("--lite-ef-construction", type=str, default="",
                   help="also --lite-rows on Milvus Lite at these efConstruction")
    p.add_argument("--lite-rows", type=int, default=100_000)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--table", type=Path, default=None, help="only print a JSON's tables")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if args.model is None:
        p.error("--model is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    largest = max([*sizes, args.interim, args.lite_rows if args.lite_ef_construction else 0])
    vectors, qsets, info = embed(args.model, args.root, args.cache, largest, args.copy_dropout)
    report: dict[str, Any] = {"model": str(args.model), "date": time.strftime(
        "%Y-%m-%d %H:%M:%S"), "machine": machine_line(), "vectors": info,
        "copy_dropout": args.copy_dropout, "index": IndexSpec.default_for(False).params,
        "sealed": []}
    work = Path(tempfile.mkdtemp(prefix="bench-ef-"))
    try:
        efs = [int(x) for x in args.efs.split(",")]
        for n in sizes:
            report["sealed"].append(sealed(vectors[:n], qsets, efs, work))
            log.info("%d rows: %s", n, {k: {e: round(v["ef"][e]["recall"], 3) for e in efs}
                                        for k, v in report["sealed"][-1]["recall"]["sets"]
                                        .items()})
            if args.json:
                args.json.write_text(json.dumps(report, indent=1) + "\n")
        if args.lite_ef_construction:
            report["lite"] = lite(vectors[:args.lite_rows], qsets, efs, [
                int(x) for x in args.lite_ef_construction.split(",")], work)
            if args.json:
                args.json.write_text(json.dumps(report, indent=1) + "\n")
        if args.interim:
            report["interim"] = interim(vectors[:args.interim], qsets,
                                        args.nprobes.split(","), args.interim_ef, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
