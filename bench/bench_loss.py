"""Pairwise sigmoid (SigLIP) against softmax (CLIP's InfoNCE) loss at small batches.

    python bench/bench_loss.py --pairs 10240 --seeds 0,1,2 --json /tmp/bench_loss.json
    python bench/bench_loss.py --table /tmp/bench_loss.json      # the markdown table

Stage 1 of the compact pretrained base (training/stage1.py: the image tower frozen, its
features cached; the text tower, the image projection and the temperature train) with
`--loss sigmoid` and `--loss softmax`, at micro-batches of 16, 32, 64 and 128, each
without accumulation and with gradient accumulation to an effective 256, every run
seeing the same number of (image, text) pairs (`--pairs`: optimizer steps =
pairs / (batch x accumulation)) from the same seeds. Same data, lr, warmup share and
cosine schedule for every run; `--batches 256` adds the real batch of 256, which is what
a cached-feature (GradCache-style) accumulation of the softmax would compute exactly.

Training data: the Stanford Cars train split less the data set's validation carve;
scored: the first `--eval-per-class` test photos of every class (the test split informs
no decision here). Queries: the class names, and held-out phrasings (bench_pretrained's:
an offline generator seed and typo rate training never uses). Class-level relevance.
Each run is also scored on the data set's validation carve of train (405 photos, no run
trains on it: "validation mAP", class-name queries): that, not the test figures, picks
each loss's best configuration. The figures are the EVALUATION'S VIEW (cached box-crop
features through the trained projection, text through the trained tower), not the served
view (ingest, index, search service). For each configuration: the per-query metrics
averaged over the seeds, their mean and a 95 % bootstrap interval over queries, the
seeds' spread, and train seconds (wall and CPU).

`--class-texts` (default off here) adds every class name as a text column of every
micro-batch, as the product's stage-1 recipe does: that gives the softmax's image-to-text
normaliser 196 columns at any batch size, which is exactly the batch-size dependence the
comparison is about, and it costs a pass of 196 texts per micro-batch.

`--accumulate plain,cached` runs every accumulated configuration both ways: plain (the
mean of the micro-batches' own losses) and cached (`Stage1Config.accumulate="cached"`,
training/grad_cache.py: the exact gradient of the effective batch's loss, so the
softmax's normaliser spans all 256). `--configs` names configurations instead of the
grid (`softmax:16x16:cached`, `sigmoid:32x1:names`: loss, micro-batch x accumulation,
then any of `cached` and `names` for the class-name columns); `--pairs` may list several
budgets (`7680,15360,30720`), each run at every one. `--keep` keeps the trained models
(under --work/runs) for the served check. `--feature-dropout` (default 0, as both passes'
tables were made: they predate the recipe's 0.3) sets stage 1's dropout on the features.

    python bench/bench_loss.py --configs sigmoid:32x1,softmax:64x1 --pairs 7680,30720 \
        --seeds 0,1,2 --json best.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_pretrained import heldout_phrasings, subset
from carsearch.data.stanford import load_stanford
from carsearch.training.feature_cache import CacheStats
from carsearch.training.pretrained_base import PretrainedSpec, build_pretrained_base
from carsearch.training.query_metrics import bootstrap
from carsearch.training.stage1 import (
    Stage1Config,
    evaluate_cached,
    features_for,
    train_stage1,
)
from carsearch.training.train_data import generated_queries
from carsearch.training.trainer import load_base
from machine import machine_line

log = logging.getLogger("bench_loss")
METRICS = {"R@1": ("class_names", "recall@1"), "mAP": ("class_names", "AP"),
           "held-out R@5": ("heldout", "recall@5")}
SELECT = ("val/class_names", "AP")  # what picks a loss's best configuration


def memoise_stage1_setup() -> None:
    """Every run of the grid reads the same data set, cached features and generated
    queries (per seed): computed once here, not in each of the grid's runs (the setup,
    not the training loop, which `train_seconds` times, is what this saves)."""
    import carsearch.training.stage1 as s1

    datasets: dict[Any, Any] = {}
    feats: dict[Any, np.ndarray] = {}
    texts: dict[Any, list[list[str]]] = {}
    load, features, per_image = s1.load_stanford, s1.features_for, s1._texts_per_image

    def load_memo(root: Path, *a: Any, **k: Any) -> Any:
        if (root, a) not in datasets:
            datasets[root, a] = load(root, *a, **k)
        return datasets[root, a]

    def features_memo(net: Any, processor: Any, dataset: Any, items: Any, cache_dir: Path,
                      **k: Any) -> np.ndarray:
        ident = (tuple(x.image_id for x in items), cache_dir)
        if ident not in feats:
            feats[ident] = features(net, processor, dataset, items, cache_dir, **k)
        return feats[ident]

    def texts_memo(items: Any, seed: int, path: Path | None) -> list[list[str]]:
        ident = (tuple(x.image_id for x in items), seed, path)
        if ident not in texts:
            texts[ident] = per_image(items, seed, path)
        return texts[ident]

    s1.load_stanford = load_memo  # type: ignore[assignment]
    s1.features_for = features_memo  # type: ignore[assignment]
    s1._texts_per_image = texts_memo  # type: ignore[assignment]


def configs(batches: list[int], effective: int, losses: list[str],
            accumulate: list[str] | None = None, class_texts: bool = False
            ) -> list[dict[str, Any]]:
    out = []
    for loss in losses:
        for b in batches:
            out.append(_config(loss, b, 1, "plain", class_texts))
            if b < effective:
                for mode in accumulate or ["plain"]:
                    out.append(_config(loss, b, effective // b, mode, class_texts))
    return out


def _config(loss: str, batch: int, accum: int, accumulate: str, class_texts: bool
            ) -> dict[str, Any]:
    return {"loss": loss, "batch": batch, "accum": accum,
            "accumulate": accumulate if accum > 1 else "plain", "class_texts": class_texts}


def parse_configs(spec: str) -> list[dict[str, Any]]:
    """`softmax:16x16:cached,sigmoid:32x1:names` -> configurations."""
    out = []
    for item in spec.split(","):
        loss, shape, *flags = item.strip().split(":")
        batch, accum = (int(x) for x in shape.split("x"))
        unknown = set(flags) - {"cached", "names"}
        if unknown or loss not in ("sigmoid", "softmax"):
            raise SystemExit(f"bad configuration {item!r}")
        out.append(_config(loss, batch, accum, "cached" if "cached" in flags else "plain",
                           "names" in flags))
    return out


def key(c: dict[str, Any]) -> str:
    """The configuration's name (pairs included when the run records them)."""
    name = f"{c['loss']}-b{c['batch']}-a{c['accum']}"
    if c.get("accumulate", "plain") == "cached":
        name += "-cached"
    if c.get("class_texts"):
        name += "-names"
    if c.get("pairs"):
        name += f"-p{c['pairs']}"
    if c.get("lr"):
        name += f"-lr{c['lr']:g}"
    if c.get("feature_dropout"):
        name += f"-fd{c['feature_dropout']:g}"
    return name


def load_report(path: Path | None) -> dict[str, Any]:
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    return {"runs": {}}


def per_query_metrics(net: Any, processor: Any, features: np.ndarray, classes: list[str],
                      heldout: list[tuple[str, str]]) -> dict[str, list[float]]:
    names = [(n, n) for n in sorted(set(classes))]
    cn = evaluate_cached(net, processor, features, classes, names)
    ho = evaluate_cached(net, processor, features, classes, heldout)
    return {"class_names/recall@1": cn["recall@1"].tolist(),
            "class_names/recall@5": cn["recall@5"].tolist(),
            "class_names/AP": cn["AP"].tolist(),
            "heldout/recall@5": ho["recall@5"].tolist()}


def summarise(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per configuration: seed-averaged per-query metrics, bootstrapped over queries."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in report["runs"].values():
        groups.setdefault(key(run["config"]), []).append(run)
    rows = []
    for name, runs in groups.items():
        row: dict[str, Any] = {"config": runs[0]["config"], "seeds": sorted(
            r["seed"] for r in runs), "steps": runs[0]["steps"],
            "train_s": [r["train_seconds"] for r in runs],
            "cpu_s": [r.get("cpu_seconds", float("nan")) for r in runs],
            "load": [r["load_during"] for r in runs]}
        if all(f"{SELECT[0]}/{SELECT[1]}" in r["per_query"] for r in runs):
            row["val mAP"] = float(np.mean([np.mean(r["per_query"]["/".join(SELECT)])
                                            for r in runs]))
        for label, (group, metric) in METRICS.items():
            per_seed = np.array([r["per_query"][f"{group}/{metric}"] for r in runs])
            mean, lo, hi = bootstrap({"m": per_seed.mean(axis=0)})["m"]
            row[label] = {"mean": mean, "ci": [lo, hi],
                          "seed_means": per_seed.mean(axis=1).tolist()}
        rows.append(row | {"name": name})
    order = {"sigmoid": 0, "softmax": 1}
    rows.sort(key=lambda r: (order[r["config"]["loss"]], r["config"].get("pairs", 0),
                             bool(r["config"].get("class_texts")), r["config"]["batch"],
                             r["config"]["accum"], r["config"].get("accumulate", "plain")))
    return rows


def table(report: dict[str, Any]) -> str:
    lines = ["| loss | micro-batch x accum (effective) | accumulation | class names | pairs "
             "| optimizer steps | seeds | R@1 [95 % CI] | mAP [95 % CI] | held-out R@5 "
             "[95 % CI] | R@1 per seed | validation mAP | train s per run (median; CPU s; "
             "load) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summarise(report):
        c = r["config"]
        mode = c.get("accumulate", "plain") if c["accum"] > 1 else "-"
        names = "yes" if c.get("class_texts") else "no"
        pairs = c.get("pairs", report.get("pairs", ""))

        def cell(label: str, r: dict[str, Any] = r) -> str:
            m = r[label]
            return f"{m['mean']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"

        seeds = ", ".join(f"{x:.3f}" for x in r["R@1"]["seed_means"])
        lines.append(
            f"| {c['loss']} | {c['batch']} x {c['accum']} ({c['batch'] * c['accum']}) | "
            f"{mode} | {names} | {pairs} | "
            f"{r['steps']} | {len(r['seeds'])} | {cell('R@1')} | {cell('mAP')} | "
            f"{cell('held-out R@5')} | {seeds} | {r.get('val mAP', float('nan')):.3f} | "
            f"{float(np.median(r['train_s'])):.0f} "
            f"({float(np.median(r['cpu_s'])):.0f}; {float(np.median(r['load'])):.1f}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2]
                   / "shared" / "stanford_cars")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_loss"))
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--pairs", type=str, default="10240",
                   help="pairs seen by every run (a list: each budget in turn)")
    p.add_argument("--batches", type=str, default="16,32,64,128")
    p.add_argument("--effective", type=int, default=256)
    p.add_argument("--losses", type=str, default="sigmoid,softmax")
    p.add_argument("--seeds", type=str, default="0,1,2")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--class-texts", action="store_true")
    p.add_argument("--feature-dropout", type=float, default=0.0,
                   help="stage 1's dropout on the cached features (0 here: both passes' "
                        "tables were made before the recipe's 0.3 existed)")
    p.add_argument("--accumulate", type=str, default="plain",
                   help="plain, cached or both (plain,cached) for the accumulated rows")
    p.add_argument("--configs", type=str, default="",
                   help="named configurations instead of the grid (see above)")
    p.add_argument("--base", type=Path, default=None,
                   help="the compact pretrained base (default: built under --work)")
    p.add_argument("--keep", action="store_true", help="keep the trained models")
    p.add_argument("--eval-per-class", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 on a shared, loaded machine)")
    p.add_argument("--json", type=Path, default=None, help="results, written after each run; "
                   "runs already in it are skipped")
    p.add_argument("--table", type=Path, default=None, help="only print the table of a JSON")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    cache = args.cache or args.work / "featcache"
    spec = PretrainedSpec()
    base = args.base or args.work / f"base-s{spec.image_size}-l{spec.text_layers}"
    if not (base / "config.json").is_file():
        build_pretrained_base(base, spec=spec)
    dataset = load_stanford(args.root)
    train_items = dataset.subset("train")
    scored = subset(dataset.split("test"), args.eval_per_class)
    seen = {x.label.class_name.lower() for x in train_items}
    seen |= {q.lower() for qs in generated_queries(train_items, 0).values() for q in qs}
    heldout = heldout_phrasings(scored, seen)
    net, processor = load_base(str(base))
    net.eval()
    stats = CacheStats()
    features = features_for(net, processor, dataset, scored, cache, stats=stats)
    features_for(net, processor, dataset, train_items, cache, stats=stats)  # warm
    classes = [x.label.class_name for x in scored]
    # the data set's validation carve (no run trains on it): what picks the best runs
    val_items = dataset.subset("validation")
    val_features = (features_for(net, processor, dataset, val_items, cache, stats=stats)
                    if val_items else np.zeros((0, 0), np.float32))
    val_classes = [x.label.class_name for x in val_items]
    memoise_stage1_setup()
    report = load_report(args.json)
    budgets = [int(x) for x in args.pairs.split(",")]
    report.update({"date": time.strftime("%Y-%m-%d"), "pairs": budgets, "lr": args.lr,
                   "base": str(base), "n_train": len(train_items),
                   "n_scored": len(scored), "n_class_queries": len(set(classes)),
                   "n_heldout_queries": len(heldout), "threads": args.threads,
                   "machine": machine_line(), "view": "evaluation (cached features)"})
    zero = per_query_metrics(net, processor, features, classes, heldout)
    report["zero_shot"] = {k: float(np.mean(v)) for k, v in zero.items()}
    grid = parse_configs(args.configs) if args.configs else configs(
        [int(x) for x in args.batches.split(",")], args.effective, args.losses.split(","),
        args.accumulate.split(","), args.class_texts)
    grid = [c | {"pairs": n, "lr": args.lr}
            | ({"feature_dropout": args.feature_dropout} if args.feature_dropout else {})
            for n in budgets for c in grid]
    for seed in (int(x) for x in args.seeds.split(",")):  # every config once, then again
        for c in grid:
            name = f"{key(c)}-s{seed}"
            if name in report["runs"]:
                continue
            steps = c["pairs"] // (c["batch"] * c["accum"])
            out = args.work / "runs" / name
            load0 = os.getloadavg()[0]
            t = time.perf_counter()
            result = train_stage1(Stage1Config(
                data=args.root, base=str(base), out=out, cache_dir=cache, steps=steps,
                batch_size=c["batch"], grad_accum=c["accum"], loss=c["loss"], lr=args.lr,
                accumulate=c["accumulate"], seed=seed, class_texts=c["class_texts"],
                feature_dropout=c.get("feature_dropout", 0.0),
                progress=False))
            wall = time.perf_counter() - t
            trained, proc = load_base(str(result.model_dir))
            trained.eval()
            pq = per_query_metrics(trained, proc, features, classes, heldout)
            if val_items:
                pq |= {f"val/{k}": v for k, v in per_query_metrics(
                    trained, proc, val_features, val_classes, heldout).items()}
            report["runs"][name] = {
                "config": c, "seed": seed, "steps": steps, "train_seconds": result.seconds,
                "cpu_seconds": result.cpu_seconds,
                "wall_seconds": wall, "load_during": (load0 + os.getloadavg()[0]) / 2,
                "first_loss": result.losses[0], "final_loss": result.losses[-1],
                "logit_scale": float(trained.logit_scale.detach().reshape(())),
                "per_query": pq}
            log.info("%s: R@1 %.3f mAP %.3f held-out R@5 %.3f (%.0f s, load %.1f)", name,
                     np.mean(pq["class_names/recall@1"]), np.mean(pq["class_names/AP"]),
                     np.mean(pq["heldout/recall@5"]), result.seconds, load0)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
            if args.json:
                tmp = args.json.with_suffix(".tmp")
                tmp.write_text(json.dumps(report) + "\n")
                tmp.replace(args.json)
    print(table(report))


if __name__ == "__main__":
    main()
