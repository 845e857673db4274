"""Cached image-tower features for stage-1 training (image tower frozen).

While the image tower is frozen its pooled backbone features (1280-d for EfficientNet-
Lite0) are a pure function of (tower weights, image processor, the image's bytes and the
view taken of it), so they are computed once and kept on disk:

    <root>/<tower key>/cache.npz      keys (n content keys) and features, float32 (n, d)

The tower key is a sha256 over the backbone's architecture, weights and the image processor's
configuration; the content key a sha256 over the file's bytes plus the view (the box it
is cropped to, and any other policy tag the caller passes). A changed photo, box, size or
weight therefore never reads a stale row. Epochs over cached features take seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)


def tower_key(model: Any, processor: Any) -> str:
    """sha256 over the image backbone's architecture and weights and the image
    processor's config."""
    h = hashlib.sha256()
    # the architecture too (activations are not weights): its config and module layout
    h.update(json.dumps(model.config.vision_config.to_dict(), sort_keys=True,
                        default=str).encode())
    h.update(repr(model.vision_model.backbone).encode())
    for name, tensor in sorted(model.vision_model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    config = processor.image_processor.to_dict()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()


def content_key(path: Path, view: str = "") -> str:
    """sha256 over the file's bytes and the view tag (box, framing)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    h.update(b"\0view:")
    h.update(view.encode())
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    computed: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of the computing (all threads)


class FeatureCache:
    """An append-only store of feature rows keyed by content key, for one tower key.

    Keys and rows live in one file (``cache.npz``) replaced atomically (a temporary file
    of this process, then ``os.replace``), so a reader never sees keys and rows of two
    different writes; before each write the rows another process saved meanwhile are
    merged in, so two processes filling one directory keep each other's rows (bar a
    write that lands between one's read and its replace)."""

    FILE = "cache.npz"

    def __init__(self, root: Path, tower: str) -> None:
        self.dir = Path(root) / tower[:32]
        self._rows: dict[str, int] = {}
        self._features = np.zeros((0, 0), dtype=np.float32)
        keys, feats = self._read()
        if len(keys):
            self._rows = {k: i for i, k in enumerate(keys)}
            self._features = feats

    def _read(self) -> tuple[list[str], np.ndarray]:
        path = self.dir / self.FILE
        empty: tuple[list[str], np.ndarray] = ([], np.zeros((0, 0), dtype=np.float32))
        if path.is_file():
            try:
                with np.load(path) as data:
                    keys, feats = [str(k) for k in data["keys"]], data["features"]
            except (OSError, ValueError, KeyError):
                log.warning("feature cache %s is unreadable; starting it again", path)
                return empty
            if len(keys) != len(feats) or len(set(keys)) != len(keys):
                log.warning("feature cache %s is inconsistent; not read", path)
                return empty
            return keys, feats
        # the older layout of two files (written features first, keys last)
        keys_path, feats_path = self.dir / "keys.txt", self.dir / "features.npy"
        if keys_path.is_file() and feats_path.is_file():
            old_keys, old_feats = keys_path.read_text().split(), np.load(feats_path)
            if len(old_keys) == len(old_feats):
                return old_keys, old_feats
            log.warning("feature cache %s is inconsistent; starting it again", self.dir)
        return empty

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, keys: Sequence[str]) -> np.ndarray:
        return self._features[[self._rows[k] for k in keys]]

    def add(self, keys: Sequence[str], features: np.ndarray) -> None:
        before = len(self._rows)
        self._append(list(zip(keys, features, strict=True)))
        if len(self._rows) > before:
            self._save()

    def _append(self, new: Sequence[tuple[str, np.ndarray]]) -> None:
        # one row a key: two identical photos in one chunk share a content key, and a
        # second row for it would shift every later row off its key
        fresh: dict[str, np.ndarray] = {}
        for k, f in new:
            if k not in self._rows:
                fresh.setdefault(k, f)
        new = list(fresh.items())
        if not new:
            return
        block = np.stack([f for _, f in new]).astype(np.float32)
        start = len(self._rows)
        self._features = block if start == 0 else np.concatenate([self._features, block])
        for i, (k, _) in enumerate(new):
            self._rows[k] = start + i

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        disk_keys, disk_feats = self._read()  # rows another process added meanwhile
        if disk_keys and (not len(self._features)
                          or disk_feats.shape[1] == self._features.shape[1]):
            self._append([(k, disk_feats[i]) for i, k in enumerate(disk_keys)])
        keys = sorted(self._rows, key=self._rows.__getitem__)
        tmp = self.dir / f"cache.{os.getpid()}-{id(self):x}.tmp.npz"
        np.savez(tmp, keys=np.array(keys), features=self._features)
        os.replace(tmp, self.dir / self.FILE)


def backbone_features(
    model: Any, processor: Any, images: Sequence[Image.Image], batch_size: int = 32
) -> np.ndarray:
    """Pooled backbone features (n, 1280) of RGB images, batched, in inference mode."""
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            batch = [im if im.mode == "RGB" else im.convert("RGB")
                     for im in images[i:i + batch_size]]
            pixels = processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            out.append(model.image_backbone_features(pixels).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def cached_features(
    model: Any,
    processor: Any,
    keys: Sequence[str],
    open_image: Callable[[int], Image.Image],
    cache: FeatureCache,
    *,
    batch_size: int = 32,
    progress: bool = True,
    stats: CacheStats | None = None,
) -> np.ndarray:
    """Features for every key: cached rows, the rest computed (opening image i) and added."""
    import time

    stats = stats if stats is not None else CacheStats()
    missing = [i for i, k in enumerate(keys) if k not in cache]
    stats.hits += len(keys) - len(missing)
    start, cpu_start = time.perf_counter(), time.process_time()
    step = max(batch_size * 8, 256)  # saved every few batches: an interrupted run keeps them
    bar = tqdm(total=len(missing), desc="caching image features", unit="img",
               disable=not progress or not missing)
    for s in range(0, len(missing), step):
        chunk = missing[s:s + step]
        feats = backbone_features(model, processor, [open_image(i) for i in chunk], batch_size)
        cache.add([keys[i] for i in chunk], feats)
        bar.update(len(chunk))
    bar.close()
    stats.computed += len(missing)
    stats.seconds += time.perf_counter() - start
    stats.cpu_seconds += time.process_time() - cpu_start
    return cache.get(keys)
