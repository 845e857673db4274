"""The demo's training recipe, chosen on the demo catalogue's validation split.

    python bench/bench_demo_recipe.py --data demo-data/catalogue \\
        --queries demo-data/queries.jsonl --base demo-data/base/compact-pretrained \\
        --steps 300 --lr 5e-4 --views 0,0.5,1

Stage 1 of the compact pretrained base (`training/stage1.py`: text side and projections
on cached image features) with the given recipe, then its scores on the catalogue's
validation carve (10 % of each class's train images; the test split is never read):
the class names (relevant: that class) and one held-out phrasing per class (relevant:
every image whose labels satisfy what it names, colour included), with the validation
images framed as a boxed photo is served (its box) and as a box-less one is (the whole
frame). Mean and 95 % bootstrap interval over queries of R@1, R@5, R@10, mAP and MRR.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carsearch.data.stanford import load_stanford
from carsearch.platform.metrics import query_scores
from carsearch.platform.search.evaluation import summarise
from carsearch.training.evaluate import class_name_queries, held_out_queries, label_fields
from carsearch.training.recipe import PROJECTIONS, STAGE1_PROJECTION
from carsearch.training.stage1 import (
    Stage1Config,
    features_for,
    image_embeddings_from_features,
    text_embeddings,
    train_stage1,
)
from carsearch.training.trainer import load_base

log = logging.getLogger("bench_demo_recipe")


def scores(net: Any, processor: Any, features: np.ndarray, fields: list[dict[str, Any]],
           queries: list[Any]) -> dict[str, Any]:
    images = image_embeddings_from_features(net, features)
    texts = text_embeddings(net, processor, [q.text for q in queries])
    ranked, n_rel = [], []
    for q, t in zip(queries, texts, strict=True):
        relevant = np.array([q.matches(f) for f in fields])
        order = np.argsort(-(images @ t), kind="stable")
        ranked.append(relevant[order].tolist())
        n_rel.append(int(relevant.sum()))
    s = summarise(query_scores(ranked, n_rel, len(fields), (1, 5, 10)), n_boot=1000)
    return {k: s[k] for k in ("recall@1", "recall@5", "recall@10", "mAP", "MRR", "ci95",
                              "n_queries", "n_items")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--queries", type=Path, default=None)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_demo_recipe"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--caption-prob", type=float, default=0.5)
    p.add_argument("--views", type=str, default="0")
    p.add_argument("--frame-prob", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--projection", choices=PROJECTIONS, default=STAGE1_PROJECTION,
                   help="stage 1's image projection (ridge: fitted, then fixed)")
    p.add_argument("--feature-dropout", type=float, default=0.0,
                   help="dropout on the cached features (the demo's: 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    views = tuple(float(v) for v in args.views.split(","))
    cache = args.work / "feature-cache"
    start = time.perf_counter()
    result = train_stage1(Stage1Config(
        data=args.data, base=str(args.base), out=args.work / "stage1", cache_dir=cache,
        queries=args.queries, steps=args.steps, batch_size=args.batch, lr=args.lr,
        caption_prob=args.caption_prob, views=views, frame_prob=args.frame_prob,
        seed=args.seed, progress=False, projection=args.projection,
        feature_dropout=args.feature_dropout))
    trained_s = time.perf_counter() - start
    dataset = load_stanford(args.data)
    val = dataset.subset("validation")
    fields = [label_fields(x) for x in val]
    query_sets = {"class names": class_name_queries([x.label.class_name for x in val]),
                  "held-out phrasings": held_out_queries(val)}
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                              "seconds": round(trained_s, 1),
                              "stage1_step_ms": round(result.step_ms, 1),
                              "loss": [round(result.losses[0], 3), round(result.losses[-1], 3)],
                              "validation": {}}
    for name, model_dir in (("zero_shot", args.base), ("stage1", result.model_dir)):
        net, processor = load_base(str(model_dir))
        net.eval()
        for framing, view in (("box", 0.0), ("whole", 1.0)):
            feats = features_for(net, processor, dataset, val, cache, progress=False,
                                 view=view)
            for set_name, queries in query_sets.items():
                report["validation"][f"{name} / {framing} / {set_name}"] = scores(
                    net, processor, feats, fields, queries)
    for key, m in report["validation"].items():
        print(f"{key:<48} R@1 {m['recall@1']:.3f} R@5 {m['recall@5']:.3f} "
              f"R@10 {m['recall@10']:.3f} mAP {m['mAP']:.3f} MRR {m['MRR']:.3f}")
    print(f"stage 1: {report['seconds']} s ({report['stage1_step_ms']} ms/step), "
          f"loss {report['loss']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
