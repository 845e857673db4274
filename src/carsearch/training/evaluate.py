"""Text→image evaluation on a held-out split, for one or several models side by side.

Images are embedded exactly as the version serves them: `Encoder.encode_images` with each
image whole and its box, so the version's image policy (`image_policy.json`) frames them
as ingest does. `framing="whole"` drops the boxes: what a box-less camera photo gets.

Splits: "validation" (carved from the train split, `StanfordDataset.subset`) is what
recipes, early stopping and promotion read; "test" is only reported.

Query sets (each scored apart):
- "class names": one query per class, its name, relevant to that class's images;
- "held-out phrasings" (`platform.search.heldout`): one query per class from a generator
  configuration training never uses, relevant to every image whose labels satisfy every
  attribute it names (its colour too);
- a file (`--queries FILE.jsonl`), one JSON object a line:
  `{"query": "red chevy pickup", "relevant": ["Chevrolet Silverado 1500 Regular Cab 2012"]}`
  and/or `"attributes": {"make": "Chevrolet", "colour": "red"}`.

Each set reports R@1/5/10, mAP (over the whole ranking), MRR, the same metrics expected of
a random ranking (`chance`), 95 % bootstrap intervals over queries, and the calibration
of the probability the page shows (sigmoid(exp(logit_scale) * cos + logit_bias)) over
every (query, image) pair of the split: a reliability table and its ECE.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from carsearch.data.stanford import LabelledImage, StanfordDataset, load_stanford
from carsearch.platform.errors import ConfigError
from carsearch.platform.metrics import QueryScores, query_scores, reliability
from carsearch.platform.models.encoder import Encoder
from carsearch.platform.search.classify import probability
from carsearch.platform.search.evaluation import EvalQuery, summarise
from carsearch.platform.search.heldout import held_out_query

log = logging.getLogger(__name__)

KS = (1, 5, 10)
RESULTS_FILE = "evaluation_results.json"
_CHUNK = 256
FRAMINGS = ("box", "whole")


def label_fields(item: LabelledImage) -> dict[str, Any]:
    """The labels an evaluation query is matched against."""
    lab = item.label
    return {"class_name": lab.class_name, "make": lab.make, "model": lab.model,
            "year": lab.year, "colour": lab.colour, "body": lab.body_category}


def class_name_queries(class_names: Sequence[str]) -> list[EvalQuery]:
    """One query per class: its name, relevant to that class only."""
    return [EvalQuery(name, (name,)) for name in sorted(set(class_names))]


def held_out_queries(items: Sequence[LabelledImage]) -> list[EvalQuery]:
    """One held-out phrasing per class, written from the first image of that class (by
    id) so that the colour it may name exists among the images searched."""
    first: dict[str, LabelledImage] = {}
    for item in sorted(items, key=lambda im: im.image_id):
        first.setdefault(item.label.class_name, item)
    out = []
    for name in sorted(first):
        q = held_out_query(first[name].label, key=first[name].image_id)
        if q is not None:
            out.append(EvalQuery(q.text, (), q.attributes))
    return out


def load_eval_queries(path: Path) -> list[EvalQuery]:
    """Queries from a JSONL file of {"query", "relevant": [class names], "attributes"}."""
    if not path.is_file():
        raise ConfigError(f"no query file at {path}")
    out: list[EvalQuery] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            text = rec["query"]
            relevant = rec.get("relevant", [])
            attributes = rec.get("attributes", {})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"{path} line {n}: not a {{query, relevant}} object ({exc})"
            ) from None
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{path} line {n}: query must be a non-empty string")
        if isinstance(relevant, str):
            relevant = [relevant]
        if not isinstance(relevant, list) or not all(isinstance(r, str) for r in relevant):
            raise ConfigError(f"{path} line {n}: relevant must be a list of class names")
        if not isinstance(attributes, dict):
            raise ConfigError(f"{path} line {n}: attributes must be an object")
        if not relevant and not attributes:
            raise ConfigError(f"{path} line {n}: give relevant class names or attributes")
        out.append(EvalQuery(text, tuple(relevant), attributes))
    if not out:
        raise ConfigError(f"{path} holds no queries")
    return out


def relevance_matrix(queries: Sequence[EvalQuery],
                     fields: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(n_queries, n_items) booleans: item j is relevant to query i."""
    return np.array([[q.matches(f) for f in fields] for q in queries], dtype=bool).reshape(
        len(queries), len(fields))


def scores_from_similarity(sim: np.ndarray, relevant: np.ndarray,
                           ks: Sequence[int] = KS) -> QueryScores:
    """Per-query scores of full rankings (ties broken by item index, as metrics does)."""
    ranked = []
    for row, rel in zip(sim, relevant, strict=True):
        order = np.argsort(-row, kind="stable")
        ranked.append(rel[order])
    return query_scores(ranked, relevant.sum(axis=1).tolist(), sim.shape[1], ks)


def image_embeddings(
    dataset: StanfordDataset,
    items: Sequence[LabelledImage],
    encoders: Mapping[str, Encoder],
    *,
    framing: str = "box",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Every model's vectors of the items, each image whole with its box (framing "box")
    or without it ("whole"), through the version's image policy, as ingest embeds."""
    if framing not in FRAMINGS:
        raise ConfigError(f"framing must be one of {', '.join(FRAMINGS)}, not {framing!r}")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    bar = tqdm(total=len(items), desc="encoding images", unit="img", disable=not progress)
    for lo in range(0, len(items), _CHUNK):
        chunk = items[lo : lo + _CHUNK]
        images = [dataset.open_image(item, crop=False) for item in chunk]
        boxes = [item.bbox if framing == "box" else None for item in chunk]
        for name, encoder in encoders.items():
            parts[name].append(encoder.encode_images(images, boxes))
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
    split: str = "test",
    framings: Sequence[str] = ("box",),
    held_out: bool = True,
    n_boot: int = 2000,
    new_classes: Sequence[str] = (),
) -> dict[str, Any]:
    """Metrics of every model (name → hub id or directory) on one split of `data`.

    `limit` > 0 keeps the first N images (quick checks). With `new_classes` (a retrain's
    new classes) the class-name queries are also scored as two sets, "old classes" and
    "new classes", against the same images. Returns a JSON-ready dict:
    {"split", "n_images", "n_queries", "query_source", "chance_mAP", "models": {name:
    metrics of the main query set, with "query_sets": {framing: {set: summary}}}}.
    """
    dataset = data if isinstance(data, StanfordDataset) else load_stanford(data)
    items = dataset.subset(split)
    if limit > 0:
        items = items[:limit]
    if not items:
        raise ConfigError(f"{dataset.root}: no {split} images to evaluate on")
    fields = [label_fields(item) for item in items]
    item_classes = [f["class_name"] for f in fields]
    sets: dict[str, list[EvalQuery]] = {}
    if queries_file is not None:
        sets[str(queries_file)] = load_eval_queries(queries_file)
        main = str(queries_file)
    else:
        sets["class names"] = class_name_queries(item_classes)
        main = "class names"
    if held_out:
        sets["held-out phrasings"] = held_out_queries(items)
    if new_classes and "class names" in sets:
        new = set(new_classes)
        sets["old classes"] = [q for q in sets["class names"] if not set(q.relevant) & new]
        sets["new classes"] = [q for q in sets["class names"] if set(q.relevant) & new]
        sets = {k: v for k, v in sets.items() if v}
    relevance = {name: relevance_matrix(qs, fields) for name, qs in sets.items()}
    encoders = {name: Encoder(model, batch_size=batch_size) for name, model in models.items()}
    results: dict[str, Any] = {}
    chance: dict[str, Any] = {}
    for framing in framings:
        image_emb = image_embeddings(dataset, items, encoders, framing=framing,
                                     progress=progress)
        for name, encoder in encoders.items():
            entry = results.setdefault(name, {"model": str(models[name]),
                                              "policy": encoder.policy.to_dict(),
                                              "policy_source": encoder.policy.source,
                                              "query_sets": {}})
            per_set = entry["query_sets"].setdefault(framing, {})
            for set_name, queries in sets.items():
                text_emb = encoder.encode_text([q.text for q in queries])
                sim = text_emb @ image_emb[name].T
                summary = summarise(scores_from_similarity(sim, relevance[set_name], ks),
                                    n_boot=n_boot)
                # the probability the page shows, on every held-out (query, image) pair
                probs = probability(sim, encoder.logit_scale, encoder.logit_bias)
                summary["calibration"] = reliability(probs, relevance[set_name])
                per_set[set_name] = summary
                chance[set_name] = summary["chance"]
            log.info("evaluation %s (%s): %s", name, framing, per_set)
    for entry in results.values():  # the headline: the main set, the first framing
        head = entry["query_sets"][framings[0]][main]
        entry.update({k: v for k, v in head.items() if k != "chance"})
    return {
        "split": split,
        "framings": list(framings),
        "n_images": len(items),
        "n_classes": len(set(item_classes)),
        "n_queries": len(sets[main]),
        "query_source": main,
        "query_sets": {name: [q.text for q in qs] for name, qs in sets.items()},
        "chance": chance,
        "chance_mAP": chance[main]["mAP"],
        "models": results,
    }


def write_results(out: Path, results: Mapping[str, Any]) -> Path:
    path = out / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
