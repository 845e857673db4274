"""The compact pretrained base on the Stanford Cars benchmark split: what each stage adds.

    python bench/bench_pretrained.py --mode both --steps 400 --lr 5e-4
    python bench/bench_pretrained.py --speed 128,160,224      # encoder images/s

- `--mode val`: 20 % of the train images (a fixed hash of the image id) are held out
  and scored; only the rest trains. Recipe decisions are made here.
- `--mode test`: all train images train; the test split (even file numbers) is scored.
- `--mode both`: trains as `val` does and scores the validation and the test split
  from the same model (the test split informs nothing).

Queries: every class name of the scored split, and held-out phrasings: 3 per class from
the offline generator with a seed and typo rate training never uses (seed 9001, typo rate
0.3, colour left out), any string that training also saw removed. Class-level relevance.
Reported: the mean and a 95 % bootstrap interval over queries of R@1, R@5 and AP.

Image features are cached by content hash (training/feature_cache.py) under --cache.
Stage 2 (LoRA on both towers, the trainer) changes the image tower, so its images are
embedded again; `--stage2-eval-limit` scores stage 1 and stage 2 on the same subset of the
scored images (5 per class by default) to keep that affordable on two cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carsearch.data.augment import OfflineGenerator, RuleJudge
from carsearch.data.stanford import LabelledImage, load_stanford
from carsearch.training.feature_cache import CacheStats
from carsearch.training.pretrained_base import PretrainedSpec, build_pretrained_base
from carsearch.training.query_metrics import bootstrap, per_query
from carsearch.training.stage1 import (
    Stage1Config,
    evaluate_cached,
    features_for,
    split_train,
    text_embeddings,
    train_stage1,
)
from carsearch.training.train_data import generated_queries
from carsearch.training.trainer import load_base

log = logging.getLogger("bench_pretrained")
HELDOUT_SEED, HELDOUT_TYPO, HELDOUT_PER_CLASS = 9001, 0.3, 3


def heldout_phrasings(items: list[LabelledImage], exclude: set[str]) -> list[tuple[str, str]]:
    generator, judge = OfflineGenerator(seed=HELDOUT_SEED, typo_rate=HELDOUT_TYPO), RuleJudge()
    labels = {x.label.class_name: replace(x.label, colour=None) for x in items}
    out: list[tuple[str, str]] = []
    for name in sorted(labels):
        label = labels[name]
        found = generator.generate(label, 4 * HELDOUT_PER_CLASS, key=f"heldout:{name}")
        kept = [v.query for v in judge.judge(label, found)
                if v.accepted and v.query.lower() not in exclude][:HELDOUT_PER_CLASS]
        out += [(q, name) for q in kept]
    return out


def summary(values: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: [round(x, 4) for x in v] for k, v in bootstrap(values).items()}


def score(net: Any, processor: Any, features: np.ndarray, items: list[LabelledImage],
          heldout: list[tuple[str, str]]) -> dict[str, Any]:
    classes = [x.label.class_name for x in items]
    names = [(n, n) for n in sorted(set(classes))]
    return {"class_names": summary(evaluate_cached(net, processor, features, classes, names)),
            "heldout": summary(evaluate_cached(net, processor, features, classes, heldout)),
            "n_class_queries": len(names), "n_heldout_queries": len(heldout),
            "n_images": len(items)}


def score_full_model(model_dir: Path, dataset: Any, items: list[LabelledImage],
                     heldout: list[tuple[str, str]]) -> dict[str, Any]:
    """Score a model whose image tower changed: embed the images through it."""
    from carsearch.platform.models.encoder import Encoder

    enc = Encoder(model_dir, batch_size=32)
    images = enc.encode_images([dataset.open_image(x) for x in items])
    net, processor = enc._load().model, enc._load().processor
    classes = [x.label.class_name for x in items]
    index = {n: i for i, n in enumerate(sorted(set(classes)))}
    out: dict[str, Any] = {"n_images": len(items)}
    for name, queries in (("class_names", [(n, n) for n in sorted(index)]),
                          ("heldout", heldout)):
        texts = text_embeddings(net, processor, [q for q, _ in queries])
        out[name] = summary(per_query(texts @ images.T, [index[c] for _, c in queries],
                                      [index[c] for c in classes]))
    return out


def subset(items: list[LabelledImage], per_class: int) -> list[LabelledImage]:
    seen: dict[str, int] = {}
    out = []
    for x in items:
        if seen.get(x.label.class_name, 0) < per_class:
            seen[x.label.class_name] = seen.get(x.label.class_name, 0) + 1
            out.append(x)
    return out


def centroid_probe(train: np.ndarray, train_classes: list[str], test: np.ndarray,
                   test_classes: list[str]) -> dict[str, Any]:
    """A probe of the frozen features, not a text model: each class's query is the
    centroid of its standardised train features; test photos ranked by cosine to it."""
    mean, std = train.mean(0), train.std(0) + 1e-6

    def unit(x: np.ndarray) -> np.ndarray:
        z = (x - mean) / std
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    names = sorted(set(test_classes))
    index = {n: i for i, n in enumerate(names)}
    tr, labels = unit(train), np.array([index.get(c, -1) for c in train_classes])
    cents = np.stack([tr[labels == i].mean(0) for i in range(len(names))])
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    return summary(per_query(cents @ unit(test).T, list(range(len(names))),
                             [index[c] for c in test_classes]))


def speed(args: argparse.Namespace, sizes: list[int], n: int = 64) -> dict[str, Any]:
    """Images/s and texts/s of the Encoder (batch 32, inference mode, channels-last)."""
    import statistics

    from carsearch.platform.models.encoder import Encoder

    dataset = load_stanford(args.root, split="test")
    photos = [dataset.open_image(x) for x in dataset.images[:n]]
    texts = [x.label.class_name for x in dataset.images[:n]]
    out: dict[str, Any] = {}
    for size in sizes:
        base = args.work / f"speed-base-{size}"
        if not (base / "config.json").is_file():
            build_pretrained_base(base, spec=PretrainedSpec(image_size=size))
        enc = Encoder(base, batch_size=32, torch_threads=args.threads)
        enc.encode_images(photos[:8])  # warm-up
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            enc.encode_images(photos)
            runs.append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        enc.encode_text(texts * 4)
        out[str(size)] = {"images_per_s_median": round(statistics.median(runs), 1),
                          "images_per_s_runs": [round(r, 1) for r in runs],
                          "texts_per_s": round(4 * n / (time.perf_counter() - t), 1)}
        log.info("speed %d px: %s", size, out[str(size)])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2]
                   / "shared" / "stanford_cars")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_pretrained"))
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--mode", choices=("val", "test", "both"), default="val")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--caption-prob", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--text-layers", type=int, default=1)
    p.add_argument("--stage2-steps", type=int, default=0)
    p.add_argument("--stage1-model", type=Path, default=None,
                   help="a stage-1 model of an earlier run: skip stage 1")
    p.add_argument("--stage2-batch", type=int, default=32)
    p.add_argument("--stage2-lr", type=float, default=2e-4)
    p.add_argument("--stage2-eval-per-class", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--probe", action="store_true",
                   help="only the class-centroid probe of the cached features at --size")
    p.add_argument("--speed", type=str, default="",
                   help="only measure encoder speed at these sizes (comma separated)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.speed:
        result = speed(args, [int(x) for x in args.speed.split(",")])
        print(json.dumps({"threads": args.threads, "date": time.strftime("%Y-%m-%d"),
                          "speed": result}, indent=2))
        return
    cache = args.cache or args.work / "featcache"
    tag = f"s{args.size}-l{args.text_layers}"
    run_tag = f"{tag}-lr{args.lr:g}-st{args.steps}-wd{args.weight_decay:g}-cp{args.caption_prob:g}"
    base = args.work / f"base-{tag}"
    if not (base / "config.json").is_file():
        build_pretrained_base(base, spec=PretrainedSpec(image_size=args.size,
                                                        text_layers=args.text_layers))
    val_share = 0.0 if args.mode == "test" else 0.2
    dataset = load_stanford(args.root)
    if args.probe:
        net, processor = load_base(str(base))
        train_all, test_all = dataset.split("train"), dataset.split("test")
        tr = features_for(net, processor, dataset, train_all, cache)
        te = features_for(net, processor, dataset, test_all, cache)
        probe = centroid_probe(tr, [x.label.class_name for x in train_all], te,
                               [x.label.class_name for x in test_all])
        print(json.dumps({"size": args.size, "probe": probe}, indent=2))
        return
    train_items, val_items = split_train(dataset.split("train"), val_share)
    seen = {x.label.class_name.lower() for x in train_items}
    seen |= {q.lower() for qs in generated_queries(train_items, 0).values() for q in qs}
    splits = {"val": val_items, "test": dataset.split("test")}
    if args.mode != "both":
        splits = {args.mode: splits[args.mode]}
    heldouts = {name: heldout_phrasings(items, seen) for name, items in splits.items()}
    report: dict[str, Any] = {"mode": args.mode, "args": {k: str(v) for k, v in
                                                          vars(args).items()},
                              "threads": args.threads, "date": time.strftime("%Y-%m-%d")}

    net, processor = load_base(str(base))
    net.eval()
    stats = CacheStats()
    t0 = time.perf_counter()
    features = {name: features_for(net, processor, dataset, items, cache, stats=stats)
                for name, items in splits.items()}
    report["scored_features"] = {"computed": stats.computed, "seconds": round(stats.seconds, 1),
                                 "cpu_seconds": round(stats.cpu_seconds, 1)}
    report["zero_shot"] = {name: score(net, processor, features[name], items, heldouts[name])
                           for name, items in splits.items()}
    log.info("zero-shot: %s", report["zero_shot"])

    if args.stage1_model is None:
        s1 = train_stage1(Stage1Config(
            data=args.root, base=str(base), out=args.work / f"run-{args.mode}-{run_tag}",
            cache_dir=cache, steps=args.steps, batch_size=args.batch, lr=args.lr,
            caption_prob=args.caption_prob, weight_decay=args.weight_decay,
            val_share=val_share))
        report["stage1_train"] = {"steps": s1.steps, "seconds": round(s1.seconds, 1),
                                  "cpu_seconds": s1.cpu_seconds,
                                  "load_average_end": os.getloadavg()[0],
                                  "ms_per_step": round(s1.step_ms, 1), "cache": s1.cache,
                                  "first_loss": s1.losses[0], "final_loss": s1.losses[-1],
                                  "n_train": s1.n_train}
        stage1_model = s1.model_dir
    else:
        stage1_model = args.stage1_model
    net1, proc1 = load_base(str(stage1_model))
    net1.eval()
    report["stage1"] = {name: score(net1, proc1, features[name], items, heldouts[name])
                        for name, items in splits.items()}
    log.info("stage 1: %s", report["stage1"])
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)

    if args.stage2_steps:
        from carsearch.training.trainer import TrainConfig, train

        result = train(TrainConfig(
            data=args.root, base=str(stage1_model), out=args.work / f"run2-{args.mode}-{tag}",
            steps=args.stage2_steps, batch_size=args.stage2_batch, lr=args.stage2_lr,
            full=False, progress=True))
        report["stage2_train"] = result.summary()
        scored = splits["test"]  # stage 2 trains on every train image, the carve included
        few = subset(scored, args.stage2_eval_per_class)
        few_ids = {x.image_id for x in few}
        few_feats = features["test"][[i for i, x in enumerate(scored) if x.image_id in few_ids]]
        few_heldout = heldouts["test"]
        report["stage1_subset"] = score(net1, proc1, few_feats, few, few_heldout)
        assert result.model_dir is not None
        report["stage2_subset"] = score_full_model(result.model_dir, dataset, few, few_heldout)
        log.info("stage 2 (subset): %s", report["stage2_subset"])
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
