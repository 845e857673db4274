"""Text→image evaluation on the test split, for one or several models side by side.

Relevance is class-level: every test image of a queried class is relevant. Queries come
from the class names of the test split (one query per class, the name itself) and, from
`--queries FILE.jsonl`, from any external set: one JSON object a line,
`{"query": "red chevy pickup", "relevant": ["Chevrolet Silverado 1500 Regular Cab 2012"]}`.
Metrics (Recall@K, mAP, MRR) are `carsearch.platform.metrics.retrieval_metrics`.

Only test images are ever encoded here (`dataset.split("test")`); images are read once
and encoded by every model in the same pass.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from carsearch.data.stanford import LabelledImage, StanfordDataset, load_stanford
from carsearch.platform.errors import ConfigError
from carsearch.platform.metrics import retrieval_metrics_from_embeddings
from carsearch.platform.models.encoder import Encoder

log = logging.getLogger(__name__)

KS = (1, 5, 10)
RESULTS_FILE = "evaluation_results.json"
_CHUNK = 256


@dataclass(frozen=True)
class EvalQuery:
    text: str
    relevant: tuple[str, ...]


def class_name_queries(class_names: Sequence[str]) -> list[EvalQuery]:
    """One query per class: its name, relevant to that class only."""
    return [EvalQuery(name, (name,)) for name in sorted(set(class_names))]


def load_eval_queries(path: Path) -> list[EvalQuery]:
    """Queries from a JSONL file of {"query": str, "relevant": [class names]} lines."""
    if not path.is_file():
        raise ConfigError(f"no query file at {path}")
    out: list[EvalQuery] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            text, relevant = rec["query"], rec["relevant"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path} line {n}: not a {{query, relevant}} object ({exc})"
            ) from None
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{path} line {n}: query must be a non-empty string")
        if isinstance(relevant, str):
            relevant = [relevant]
        if not isinstance(relevant, list) or not all(isinstance(r, str) for r in relevant):
            raise ConfigError(f"{path} line {n}: relevant must be a list of class names")
        out.append(EvalQuery(text, tuple(relevant)))
    if not out:
        raise ConfigError(f"{path} holds no queries")
    return out


def _image_embeddings(
    dataset: StanfordDataset,
    items: Sequence[LabelledImage],
    encoders: Mapping[str, Encoder],
    progress: bool,
) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    bar = tqdm(total=len(items), desc="encoding test images", unit="img", disable=not progress)
    for lo in range(0, len(items), _CHUNK):
        images = [dataset.open_image(item) for item in items[lo : lo + _CHUNK]]
        for name, encoder in encoders.items():
            parts[name].append(encoder.encode_images(images))
        bar.update(len(images))
    bar.close()
    return {name: np.concatenate(p) for name, p in parts.items()}


def evaluate_models(
    models: Mapping[str, str | Path],
    data: Path | StanfordDataset,
    *,
    queries_file: Path | None = None,
    limit: int = 0,
    batch_size: int = 64,
    ks: Sequence[int] = KS,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of every model (name → hub id or directory) on the test split of `data`.

    `limit` > 0 keeps the first N test images (quick checks). Returns a JSON-ready dict:
    {"split", "n_images", "n_queries", "query_source", "models": {name: metrics}}.
    """
    dataset = data if isinstance(data, StanfordDataset) else load_stanford(data)
    items = dataset.split("test")
    if limit > 0:
        items = items[:limit]
    if not items:
        raise ConfigError(f"{dataset.root}: no test images to evaluate on")
    item_classes = [item.label.class_name for item in items]
    if queries_file is not None:
        queries, source = load_eval_queries(queries_file), str(queries_file)
    else:
        queries, source = class_name_queries(item_classes), "class names"
    encoders = {
        name: Encoder(model, batch_size=batch_size) for name, model in models.items()
    }
    image_emb = _image_embeddings(dataset, items, encoders, progress)
    results: dict[str, Any] = {}
    for name, encoder in encoders.items():
        text_emb = encoder.encode_text([q.text for q in queries])
        metrics = retrieval_metrics_from_embeddings(
            text_emb, image_emb[name], [q.relevant for q in queries], item_classes, ks
        )
        results[name] = {"model": str(models[name]), **metrics.to_dict()}
        log.info("evaluation %s: %s", name, results[name])
    return {
        "split": "test",
        "n_images": len(items),
        "n_classes": len(set(item_classes)),
        "n_queries": len(queries),
        "query_source": source,
        "chance_mAP": _chance_map(item_classes, queries),
        "models": results,
    }


def _chance_map(item_classes: Sequence[str], queries: Sequence[EvalQuery]) -> float:
    """The expected AP of a random ranking is about the fraction of relevant items."""
    n = len(item_classes)
    counts: dict[str, int] = {}
    for c in item_classes:
        counts[c] = counts.get(c, 0) + 1
    fractions = [sum(counts.get(r, 0) for r in set(q.relevant)) / n for q in queries]
    valid = [f for f in fractions if f > 0]
    return float(np.mean(valid)) if valid else 0.0


def write_results(out: Path, results: Mapping[str, Any]) -> Path:
    path = out / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
