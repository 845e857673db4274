"""Does the drift job flag a make no model knows, with a real model's embeddings?

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_drift_model.py --model DIR [--model DIR2]

For each compact pretrained model (a base, or a version trained with its image backbone
frozen: stage 1), the frozen backbone's features come from the feature cache (computed
once for every model), then each model's projection; and each world:

- `catalogue`: references are rendered catalogue photos (`write_catalogue`, the demo's
  data); the new images are more catalogue photos plus `--novel` photos of the rendered
  novel make (`carsearch data novel`'s Zephyr Aero, `write_vehicles`).
- `stanford`: references are Stanford Cars test photos (real); the new images are other
  Stanford test photos plus the same rendered Zephyr photos.

`detect_drift` runs with the job's defaults (k 10, 5th percentile, clusters of >= 5), and
the table says how many new images came out novel, how many of the Zephyr photos among
them, the isolated clusters and how many Zephyr photos the largest one holds. Prints
JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from carsearch.data.catalogue import NOVEL, write_catalogue, write_vehicles
from carsearch.data.stanford import load_stanford
from carsearch.monitoring.drift import detect_drift
from carsearch.monitoring.drift_detect import knn_density
from carsearch.training.feature_cache import FeatureCache, cached_features, content_key, tower_key
from carsearch.training.stage1 import image_embeddings_from_features, image_keys
from carsearch.training.trainer import load_base
from machine import cpu_name

REPO = Path(__file__).resolve().parents[1]


Photo = tuple[str, Callable[[], Image.Image]]  # (content key, opener)


def embed(net: Any, processor: Any, photos: list[Photo], cache_dir: Path) -> np.ndarray:
    """Unit image embeddings: the frozen backbone's features through the feature cache
    (shared by every model with the same image tower), then the model's projection."""
    cache = FeatureCache(cache_dir, tower_key(net, processor))
    feats = cached_features(net, processor, [k for k, _ in photos],
                            lambda i: photos[i][1](), cache, progress=False)
    return image_embeddings_from_features(net, feats)


def worlds(root: Path, stanford: Path, n_ref: int, n_new: int, n_novel: int
           ) -> dict[str, tuple[list[Photo], list[Photo], list[Photo]]]:
    """name -> (reference photos, new known photos, novel photos). Catalogue and Stanford
    photos are cropped to their boxes (the served view); the novel photos arrive whole."""
    paths = write_vehicles(root / "novel", NOVEL, n_novel, seed=3, size=(320, 240))
    novel: list[Photo] = [(content_key(p, "whole"),
                           lambda p=p: Image.open(p).convert("RGB")) for p in paths]
    out: dict[str, tuple[list[Photo], list[Photo], list[Photo]]] = {}
    write_catalogue(root / "cat", n_ref + n_new, seed=11, size=(320, 240), progress=False)
    cat = load_stanford(root / "cat")
    items = sorted(cat.images, key=lambda x: x.image_id)
    cat_photos: list[Photo] = [(k, lambda x=x: cat.open_image(x))
                               for k, x in zip(image_keys(items), items, strict=True)]
    out["catalogue"] = (cat_photos[:n_ref], cat_photos[n_ref:n_ref + n_new], novel)
    if (stanford / "cars_meta.mat").is_file():
        ds = load_stanford(stanford, split="test")
        test = ds.images[::max(1, len(ds.images) // (n_ref + n_new))]
        real: list[Photo] = [(k, lambda x=x: ds.open_image(x))
                             for k, x in zip(image_keys(test), test, strict=True)]
        out["stanford"] = (real[:n_ref], real[n_ref:n_ref + n_new], novel)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", required=True)
    ap.add_argument("--stanford", type=Path, default=REPO.parent / "shared" / "stanford_cars")
    ap.add_argument("--references", type=int, default=600)
    ap.add_argument("--new", type=int, default=200)
    ap.add_argument("--novel", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/bench_pretrained/featcache"),
                    help="the feature cache (bench_pretrained's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-drift-model-") as tmp:
        data = worlds(Path(tmp), args.stanford, args.references, args.new, args.novel)
        for model in args.model:
            net, processor = load_base(str(model))
            net.eval()
            for name, (ref_p, new_p, novel_p) in data.items():
                t0 = time.perf_counter()
                ref, known, novel = (embed(net, processor, x, args.cache)
                                     for x in (ref_p, new_p, novel_p))
                new = np.vstack([known, novel])
                ids = np.arange(len(new))
                det = detect_drift(ref, new, new_ids=ids)
                novel_ids = set(range(len(known), len(new)))
                largest = max(det.clusters, key=lambda c: c.size, default=None)
                dens, _, _ = knn_density(ref, novel, min(10, len(ref) - 1))
                rows.append({
                    "model": str(model), "world": name, "references": len(ref),
                    "new_known": len(known), "novel_photos": len(novel),
                    "threshold": round(det.threshold, 3),
                    "novel_density": [round(float(dens.min()), 3),
                                      round(float(dens.max()), 3)],
                    "n_novel": det.n_novel,
                    "zephyr_novel": int(sum(1 for i, d in enumerate(dens)
                                            if d < det.threshold)),
                    "isolated": det.n_isolated,
                    "largest_cluster": largest.size if largest else 0,
                    "largest_zephyr": (len(set(largest.all_ids) & novel_ids)
                                       if largest else 0),
                    "seconds": round(time.perf_counter() - t0, 1),
                })
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores · torch threads {args.threads} · "
          f"{time.strftime('%Y-%m-%d')} · 1-min load average {load0:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after\n")
    print("| model | world | references | new (known + Zephyr) | threshold | Zephyr density "
          "min-max | novel (Zephyr) | isolated clusters | largest (Zephyr in it) |")
    print("|---|---|---:|---:|---:|---|---:|---:|---|")
    for r in rows:
        print(f"| {Path(r['model']).name} | {r['world']} | {r['references']} | "
              f"{r['new_known']} + {r['novel_photos']} | {r['threshold']:.3f} | "
              f"{r['novel_density'][0]:.2f}-{r['novel_density'][1]:.2f} | "
              f"{r['n_novel']} ({r['zephyr_novel']}) | {r['isolated']} | "
              f"{r['largest_cluster']} ({r['largest_zephyr']}) |")


if __name__ == "__main__":
    main()
