"""The compact pretrained base's training recipe, as numbers (no heavy imports: the CLI
reads them for its defaults and help). Chosen on a validation split carved from the
Stanford Cars benchmark's train images; docs/BENCHMARKS.md, "Compact pretrained base".

- The base: 224 px images (EfficientNet-Lite0's own size), a text tower of mean-pooled
  WordLlama token embeddings and an MLP (no transformer layer: `PRETRAINED_TEXT_LAYERS`).
- Stage 1 (image tower frozen, its features cached): the image projection fitted in
  closed form first (`STAGE1_PROJECTION` "ridge": a ridge regression of the layer-normed
  features onto the train labels, penalty `STAGE1_RIDGE_LAMBDA`, the dimensions left
  over filled with the features' leading residual directions at `STAGE1_RIDGE_FILL`)
  and then held fixed; `STAGE1_STEPS` steps of `STAGE1_BATCH` images at peak learning
  rate `STAGE1_LR` train the text tower to it, dropout `STAGE1_FEATURE_DROPOUT` on the
  cached features.
- Stage 2 (LoRA on both towers) only when asked for: it did not add beyond the interval.
"""

from __future__ import annotations

import json
from pathlib import Path

PRETRAINED_IMAGE_SIZE = 224
PRETRAINED_TEXT_LAYERS = 0
# 3,000 steps: validation mAP 0.492 against 0.491 at 1,500 (equal), held-out phrasings'
# R@5 0.693 against 0.663, for about 55 more CPU-seconds (docs/BENCHMARKS.md, "fourth pass")
STAGE1_STEPS = 3000
STAGE1_BATCH = 128
STAGE1_LR = 1e-3  # validation mAP 0.438 (5e-4: 0.437, 2e-3: 0.418), docs/BENCHMARKS.md
# dropout on the cached backbone features before the image projection: validation mAP
# 0.491 against 0.438 without (0.5: 0.481), docs/BENCHMARKS.md, "third pass"
STAGE1_FEATURE_DROPOUT = 0.3
# the image projection: "ridge" (fitted in closed form, then fixed) or "learned" (trained
# with the text tower). Validation (seed 0): ridge R@1 0.705, mAP 0.535, held-out R@5
# 0.701 against learned 0.617 / 0.490 / 0.689; penalty 1,000 against 300 (mAP 0.504) and
# 3,000 (0.528); ridge-initialised but trained on washes out (mAP 0.485); docs/
# BENCHMARKS.md, "fifth pass"
STAGE1_PROJECTION = "ridge"
STAGE1_RIDGE_LAMBDA = 1000.0
# the leftover dimensions (embedding size minus label columns): leading principal
# directions of what the ridge does not explain, scaled to the ridge outputs' spread
# (validation mAP 0.535 with them, 0.535 without: kept, they carry what no label names)
STAGE1_RIDGE_FILL = 1.0
PROJECTIONS = ("ridge", "learned")

COMPACT_MODEL_TYPE = "carsearch_compact"


def has_cached_feature_tower(base: str) -> bool:
    """True for a local model directory of the compact pretrained type (its image tower can
    be frozen and its features cached: stage 1 applies); False for anything else (a hub
    id, a SigLIP)."""
    config = Path(base).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == COMPACT_MODEL_TYPE
    except (OSError, ValueError):
        return False
