"""Stage-1 recipe search on the validation carve of the Stanford Cars train split.

    python bench/bench_stage1_recipe.py --cache /work/cache/feat --out runs.jsonl \\
        --grid '[{}, {"weight_decay": 0.1}, {"feature_dropout": 0.3}]'

Each grid entry overrides fields of `Stage1Config` (the recipe's defaults otherwise) and
trains stage 1 from the same 224 px base on the train images outside the 20 % validation
carve (`bench_pretrained`'s: a fixed hash of the image id), then scores the carve: the
class names and the held-out phrasings (bench_pretrained's), 95 % bootstrap intervals
over queries. The test split is never read. One JSON line per run goes to --out.

`--refit-test` instead trains one configuration (the first grid entry) on every train
image (the carve included: the recipe is chosen, this is its refit) and scores the test
split: the figure to report, no decision made on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from bench_pretrained import heldout_phrasings, score
from carsearch.data.stanford import load_stanford
from carsearch.training.pretrained_base import PretrainedSpec, build_pretrained_base
from carsearch.training.stage1 import Stage1Config, features_for, split_train, train_stage1
from carsearch.training.train_data import generated_queries
from carsearch.training.trainer import load_base

log = logging.getLogger("bench_stage1_recipe")
VAL_SHARE = 0.2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2]
                   / "shared" / "stanford_cars")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_stage1_recipe"))
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--grid", type=str, default="[{}]")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=0, help="image size of the base (0: the "
                   "recipe's)")
    p.add_argument("--refit-test", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep each run's model")
    p.add_argument("--no-score", action="store_true",
                   help="train and keep the models only (score them elsewhere, e.g. "
                        "bench_stanford_served.py)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    spec = PretrainedSpec(**({"image_size": args.size} if args.size else {}))
    base = args.work / f"base-{spec.image_size}"
    if not (base / "config.json").is_file():
        build_pretrained_base(base, spec=spec)
    dataset = load_stanford(args.root)
    grid: list[dict[str, Any]] = json.loads(args.grid)
    if args.refit_test:
        grid = grid[:1]
        train_items = dataset.split("train")
        scored = dataset.split("test")
        share = 0.0
    else:
        train_items, scored = split_train(dataset.split("train"), VAL_SHARE)
        share = VAL_SHARE
    net0, proc0 = load_base(str(base))
    if not args.no_score:
        seen = {x.label.class_name.lower() for x in train_items}
        seen |= {q.lower() for qs in generated_queries(train_items, 0).values() for q in qs}
        heldout = heldout_phrasings(scored, seen)
        feats = features_for(net0, proc0, dataset, scored, args.cache)
    from carsearch.platform.models import compact

    plain_project = compact.CompactVisionModel.project
    train_feats = features_for(net0, proc0, dataset, train_items, args.cache)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for power in (1.0, 0.5):
        f = torch.from_numpy(train_feats).clamp_min(0) ** power
        stats[str(power)] = (f.mean(0), f.std(0) + 1e-3)

    def patched(power: float, standardise: bool) -> Any:
        mean, std = stats[str(power)]

        def project(self: Any, features: torch.Tensor) -> torch.Tensor:
            x = features.clamp_min(0) ** power if power != 1.0 else features
            return plain_project(self, (x - mean) / std if standardise else x)
        return project

    for i, overrides in enumerate(grid):
        # experiment-only keys (not Stage1Config fields), by patching the class for this
        # process (training and scoring alike): "_power" raises the features to that power
        # first, "_standardise" then divides them by the train images' per-dimension
        # statistics before the layer norm
        overrides = dict(overrides)
        power = float(overrides.get("_power", 1.0))
        standardise = bool(overrides.get("_standardise"))
        compact.CompactVisionModel.project = (  # type: ignore[method-assign]
            patched(power, standardise) if power != 1.0 or standardise else plain_project)
        fields = {k: v for k, v in overrides.items() if not k.startswith("_")}
        config = Stage1Config(data=args.root, base=str(base),
                              out=args.work / f"run-{os.getpid()}-{i}",
                              cache_dir=args.cache, val_share=share, progress=False)
        if args.refit_test:
            fields = {"train_subset": "train+validation", **fields}
        for key, value in fields.items():
            if not hasattr(config, key):
                raise SystemExit(f"Stage1Config has no field {key!r}")
            setattr(config, key, tuple(value) if isinstance(value, list) else value)
        load0, cpu0 = os.getloadavg()[0], time.process_time()
        result = train_stage1(config)
        if args.no_score:
            print(json.dumps({"overrides": overrides, "model": str(result.model_dir),
                              "n_train": result.n_train, "train_cpu_s": result.cpu_seconds,
                              "train_seconds": round(result.seconds, 1),
                              "load_end": round(os.getloadavg()[0], 2)}), flush=True)
            continue
        net, proc = load_base(str(result.model_dir))
        net.eval()
        scores = score(net, proc, feats, scored, heldout)
        row = {"overrides": overrides, "split": "test" if args.refit_test else "val",
               "n_train": result.n_train, "steps": result.steps,
               "train_seconds": round(result.seconds, 1), "train_cpu_s": result.cpu_seconds,
               "process_cpu_s": round(time.process_time() - cpu0, 1),
               "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2),
               "final_loss": round(result.losses[-1], 3),
               "time": time.strftime("%Y-%m-%d %H:%M:%S"), **scores}
        cn, ho = scores["class_names"], scores["heldout"]
        log.info("%s: R@1 %.3f R@5 %.3f mAP %.3f | held-out R@5 %.3f (%.1f CPU-s)",
                 overrides, cn["recall@1"][0], cn["recall@5"][0], cn["AP"][0],
                 ho["recall@5"][0], result.cpu_seconds)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        if not args.keep:
            import shutil

            shutil.rmtree(config.out, ignore_errors=True)


if __name__ == "__main__":
    main()
