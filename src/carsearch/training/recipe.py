"""The compact pretrained base's training recipe, as numbers (no heavy imports: the CLI
reads them for its defaults and help). Chosen on a validation split carved from the
Stanford Cars benchmark's train images; docs/BENCHMARKS.md, "Compact pretrained base".

- The base: 224 px images (EfficientNet-Lite0's own size), a text tower of mean-pooled
  WordLlama token embeddings and an MLP (no transformer layer: `PRETRAINED_TEXT_LAYERS`).
- Stage 1 (image tower frozen, its features cached): `STAGE1_STEPS` steps of
  `STAGE1_BATCH` images at peak learning rate `STAGE1_LR`, dropout
  `STAGE1_FEATURE_DROPOUT` on the cached features (the projection's regulariser).
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
