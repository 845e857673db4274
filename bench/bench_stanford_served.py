"""The Stanford Cars test split served: a trained model published, the test photos
ingested by the worker, the queries sent through the search service.

    python bench/bench_stanford_served.py --model RUN/model --encoder onnx \\
        --cache /work/cache/feat --json served.json [--limit 0] [--work DIR]

Everything goes through the product's own commands (`python -m carsearch.cli` here, the
`carsearch` of an install), in a fresh data directory (SQLite file, Milvus Lite file):

1. `carsearch db upgrade`; `carsearch models publish MODEL --name stanford --promote`
   (hash-checked by the registry, its image policy recorded with it);
2. `scripts/demo_inbox.py` delivers the 4,072 test photos (odd/even benchmark split) into
   an inbox, each with a sidecar of its labels and box; `carsearch ingest once --encoder
   E` embeds them (the version's image policy: the box crop) into Milvus Lite and the
   database;
3. `carsearch evaluate --served --queries F --json` for each query set: the 196 class
   names, and bench_pretrained's held-out phrasings (3 a class, strings no training saw;
   relevant: the class they were written for), through the search service with nothing
   read from the text, scored on the database's labels (R@1/5/10, mAP over the top
   min(n, MAX_K = 1000) hits normalised by every relevant photo, 95 % bootstrap
   intervals over queries).

Beside it, the evaluation's view of the same model on the same photos (cached backbone
features through the model's projection, every photo ranked: bench_pretrained's
`score`), so the two views can be compared query set by query set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench_pretrained import heldout_phrasings, score
from carsearch.data.stanford import load_stanford
from carsearch.training.stage1 import features_for
from carsearch.training.train_data import generated_queries
from carsearch.training.trainer import load_base

log = logging.getLogger("bench_stanford_served")
REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from carsearch.cli import main; main()"]


def carsearch(env: dict[str, str], *args: str) -> str:
    """Run one `carsearch` command; its stdout (it must succeed)."""
    t = time.perf_counter()
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"carsearch {' '.join(args)} failed ({done.returncode}):\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    log.info("carsearch %s: %.1f s", " ".join(args[:2]), time.perf_counter() - t)
    return done.stdout


def child_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def served_set(env: dict[str, str], path: Path) -> dict[str, Any]:
    out = json.loads(carsearch(env, "evaluate", "--served", "--queries", str(path),
                               "--json"))
    (summary,) = out["query_sets"].values()
    return {"version": out["version"], "n_images": out["n_images"], "k": out["k"],
            "filters": out["filters"],
            **{m: [round(summary[m], 4), *(round(x, 4) for x in summary["ci95"][m])]
               for m in ("recall@1", "recall@5", "recall@10", "mAP", "MRR")},
            "n_queries": summary["n_queries"], "chance": summary["chance"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--root", type=Path, default=REPO.parent / "shared" / "stanford_cars")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_stanford_served"))
    p.add_argument("--cache", type=Path, default=None,
                   help="feature cache for the evaluation's view (default: under --work)")
    p.add_argument("--encoder", choices=("torch", "onnx"), default="onnx")
    p.add_argument("--limit", type=int, default=0, help="only the first N test photos")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    data = args.work / "data"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    env = {**os.environ, "CARSEARCH_DATA_DIR": str(data), "CARSEARCH_LOG_LEVEL": "WARNING",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CARSEARCH_DATABASE_URL", None)  # the data directory's SQLite file
    report: dict[str, Any] = {"model": str(args.model), "encoder": args.encoder,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "load_start": os.getloadavg()[0]}
    t0, cpu0 = time.perf_counter(), child_cpu()

    carsearch(env, "db", "upgrade")
    carsearch(env, "models", "publish", str(args.model), "--name", "stanford", "--promote")
    inbox = data / "inbox"
    deliver = [sys.executable, str(REPO / "scripts" / "demo_inbox.py"), "--root",
               str(args.root), "--inbox", str(inbox), "--source", "stanford"]
    if args.limit:
        deliver += ["--limit", str(args.limit)]
    subprocess.run(deliver, env=env, check=True, capture_output=True)
    t1, cpu1 = time.perf_counter(), child_cpu()
    carsearch(env, "ingest", "once", "--inbox", str(inbox), "--encoder", args.encoder,
              "--batch-size", str(args.batch_size))
    report["ingest"] = {"wall_s": round(time.perf_counter() - t1, 1),
                        "cpu_s": round(child_cpu() - cpu1, 1),
                        "load_end": os.getloadavg()[0]}
    status = json.loads(carsearch(env, "ingest", "status", "--json"))
    report["ingest"]["status"] = status

    dataset = load_stanford(args.root)
    test = dataset.split("test")[: args.limit or None]
    train = dataset.split("train")
    seen = {x.label.class_name.lower() for x in train}
    seen |= {q.lower() for qs in generated_queries(train, 0).values() for q in qs}
    heldout = heldout_phrasings(test, seen)
    names = sorted({x.label.class_name for x in test})
    sets = {"class names": [(n, n) for n in names], "held-out phrasings": heldout}
    report["served"] = {}
    for set_name, queries in sets.items():
        path = args.work / f"queries-{set_name.replace(' ', '-')}.jsonl"
        path.write_text("".join(json.dumps({"query": q, "relevant": [c]}) + "\n"
                                for q, c in queries))
        t = time.perf_counter()
        report["served"][set_name] = {**served_set(env, path),
                                      "wall_s": round(time.perf_counter() - t, 1)}
        log.info("served %s: %s", set_name, report["served"][set_name])
    report["served_cpu_s_total"] = round(child_cpu() - cpu0, 1)
    report["served_wall_s_total"] = round(time.perf_counter() - t0, 1)

    # the evaluation's view of the same model on the same photos
    net, processor = load_base(str(args.model))
    net.eval()
    feats = features_for(net, processor, dataset, test, args.cache or args.work / "featcache",
                         progress=False)
    offline = score(net, processor, feats, test, heldout)
    report["evaluation_view"] = {"class names": offline["class_names"],
                                 "held-out phrasings": offline["heldout"]}
    report["load_end"] = os.getloadavg()[0]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print("\n| queries | view | R@1 | R@5 | mAP |\n|---|---|---|---|---|")
    for set_name in sets:
        s = report["served"][set_name]
        o = report["evaluation_view"][set_name]
        print(f"| {set_name} | served | {s['recall@1'][0]:.3f} [{s['recall@1'][1]:.3f}, "
              f"{s['recall@1'][2]:.3f}] | {s['recall@5'][0]:.3f} | {s['mAP'][0]:.3f} "
              f"[{s['mAP'][1]:.3f}, {s['mAP'][2]:.3f}] |")
        print(f"| {set_name} | evaluation | {o['recall@1'][0]:.3f} [{o['recall@1'][1]:.3f}, "
              f"{o['recall@1'][2]:.3f}] | {o['recall@5'][0]:.3f} | {o['AP'][0]:.3f} "
              f"[{o['AP'][1]:.3f}, {o['AP'][2]:.3f}] |")


if __name__ == "__main__":
    main()
