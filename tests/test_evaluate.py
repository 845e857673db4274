"""Evaluation on the test split: queries, class-level relevance, the split respected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from carsearch.data.stanford import load_stanford
from carsearch.platform.errors import ConfigError
from carsearch.platform.models.encoder import Encoder
from carsearch.training.evaluate import (
    class_name_queries,
    evaluate_models,
    load_eval_queries,
)
from carsearch.training.train_data import TrainSet
from train_helpers import tiny_catalogue


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_catalogue(tmp_path_factory.mktemp("cat") / "catalogue", n=40)


def _brute_force(scores: np.ndarray, relevant: list[set[str]], classes: list[str]) -> dict:
    recall1, aps, rr = [], [], []
    for row, rel in zip(scores, relevant, strict=True):
        order = sorted(range(len(classes)), key=lambda j: (-row[j], j))
        hits = [classes[j] in rel for j in order]
        if not any(hits):
            continue
        recall1.append(float(hits[0]))
        rr.append(1.0 / (hits.index(True) + 1))
        found, precisions = 0, []
        for rank, hit in enumerate(hits, start=1):
            if hit:
                found += 1
                precisions.append(found / rank)
        aps.append(float(np.mean(precisions)))
    return {"recall@1": np.mean(recall1), "mAP": np.mean(aps), "MRR": np.mean(rr)}


def test_class_name_queries_and_file(tmp_path: Path) -> None:
    qs = class_name_queries(["b", "a", "b"])
    assert [(q.text, q.relevant) for q in qs] == [("a", ("a",)), ("b", ("b",))]
    path = tmp_path / "q.jsonl"
    path.write_text('{"query": "red pickup", "relevant": ["x", "y"]}\n\n'
                    '{"query": "van", "relevant": "z"}\n')
    loaded = load_eval_queries(path)
    assert [(q.text, q.relevant) for q in loaded] == [("red pickup", ("x", "y")), ("van", ("z",))]
    path.write_text('{"query": "", "relevant": []}\n')
    with pytest.raises(ConfigError, match="line 1"):
        load_eval_queries(path)
    path.write_text("not json\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_eval_queries(path)
    with pytest.raises(ConfigError, match="no query file"):
        load_eval_queries(tmp_path / "absent.jsonl")


def test_evaluation_matches_brute_force_on_test_split(
    compact_model: Path, catalogue: Path, tmp_path: Path
) -> None:
    ds = load_stanford(catalogue)
    test = ds.split("test")
    external = tmp_path / "q.jsonl"
    names = sorted({im.label.class_name for im in test})
    external.write_text("".join(
        json.dumps({"query": f"a {n}", "relevant": [n, names[0]]}) + "\n" for n in names
    ))
    results = evaluate_models({"base": compact_model}, ds, queries_file=external,
                              progress=False)
    assert results["n_images"] == len(test) and results["split"] == "test"
    enc = Encoder(compact_model)
    images = enc.encode_images([ds.open_image(im) for im in test])
    texts = enc.encode_text([f"a {n}" for n in names])
    expected = _brute_force(texts @ images.T, [{n, names[0]} for n in names],
                            [im.label.class_name for im in test])
    got = results["models"]["base"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert 0 < results["chance_mAP"] < 1


def test_evaluation_columns_and_class_name_queries(compact_model: Path, catalogue: Path) -> None:
    results = evaluate_models({"zero_shot": compact_model, "again": compact_model}, catalogue,
                              limit=10, progress=False)
    assert results["n_images"] == 10 and results["query_source"] == "class names"
    a, b = results["models"]["zero_shot"], results["models"]["again"]
    assert a["mAP"] == pytest.approx(b["mAP"]) and a["n_items"] == 10


def test_real_stanford_split_is_respected(stanford_root: Path) -> None:
    ds = load_stanford(stanford_root)
    data = TrainSet.from_dataset(ds, image_size=32, limit=12, progress=False)
    assert all(int(Path(i).stem) % 2 == 1 for i in data.image_ids)
    test = ds.split("test")
    assert test and all(int(Path(im.image_id).stem) % 2 == 0 for im in test)
    assert not {im.image_id for im in test} & {im.image_id for im in ds.split("train")}
