"""Zero-shot classification: SigLIP's own pair probabilities (checked against the model's
forward pass), label and template validation, the relevance cut-off on searches, and
`carsearch classify` in a real subprocess."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carsearch.platform.errors import QueryError
from carsearch.platform.models.encoder import Encoder
from carsearch.platform.search.classify import (
    DEFAULT_TEMPLATE,
    check_template,
    classify_vectors,
    parse_labels,
    probability,
)
from carsearch.platform.search.service import SearchService
from fixtures.cli import invoke, one_line_error  # `env`: tests/fixtures/cli.py (in-process)

# the `service` and `indexed` fixtures (the search world, on every backend):
# tests/fixtures/search_world.py


def _photo(path: Path, rgb: tuple[int, int, int], seed: int) -> Path:
    arr = np.random.default_rng(seed).integers(0, 60, (64, 80, 3)) + np.array(rgb)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
    return path


def test_labels_and_templates_are_checked() -> None:
    assert parse_labels(" sedan, pickup ,, suv,sedan ") == ["sedan", "pickup", "suv"]
    assert parse_labels(["a  red car", "truck"]) == ["a red car", "truck"]
    for bad in ("", " , ,", "x" * 101, "ok,\x00bad", ",".join(str(i) for i in range(101))):
        with pytest.raises(QueryError):
            parse_labels(bad)
    assert check_template("a photo of a {}.") == "a photo of a {}."
    for bad in ("a photo", "{} and {}", "a {photo} of {}", "{0}"):
        with pytest.raises(QueryError, match="template"):
            check_template(bad)


def test_probabilities_are_siglips_own_and_independent(compact_model: Path,
                                                       tmp_path: Path) -> None:
    from transformers import AutoProcessor, SiglipModel

    enc = Encoder(compact_model)
    imgs = [Image.open(_photo(tmp_path / f"{i}.png", c, i))
            for i, c in enumerate([(200, 20, 20), (20, 20, 200)])]
    labels = ["red car", "blue car", "pickup"]
    got = classify_vectors(enc, enc.encode_images(imgs), labels, "a photo of a {}.")
    # The same numbers from the model's own forward pass: logits_per_image is
    # exp(logit_scale) * cos + logit_bias, and SigLIP's probability is its sigmoid.
    net = SiglipModel.from_pretrained(compact_model).eval()
    proc = AutoProcessor.from_pretrained(compact_model)
    texts = [f"a photo of a {label}." for label in labels]
    inputs = proc(text=texts, images=imgs, padding="max_length", return_tensors="pt",
                  max_length=enc._load().text_max_length, truncation=True)
    with torch.inference_mode():
        want = torch.sigmoid(net(**inputs).logits_per_image).numpy()
    for i, row in enumerate(got):
        assert {s.label: s.probability for s in row} == pytest.approx(
            dict(zip(labels, want[i].tolist(), strict=True)), abs=1e-4)
        assert [s.probability for s in row] == sorted((s.probability for s in row),
                                                      reverse=True)
        for s in row:
            assert s.probability == pytest.approx(
                1 / (1 + math.exp(-(s.cosine * math.exp(enc.logit_scale) + enc.logit_bias))),
                abs=1e-5)
    # Independent: another label changes none of the others' probabilities.
    more = classify_vectors(enc, enc.encode_images(imgs), [*labels, "a dog"])
    for before, after in zip(got, more, strict=True):
        after_by = {s.label: s.probability for s in after}
        assert all(after_by[s.label] == pytest.approx(s.probability, abs=1e-6) for s in before)
    assert float(probability(0.0, 0.0, 0.0)) == 0.5


def test_the_cut_off_on_search_results(service: SearchService, indexed) -> None:
    res = service.search_text("red pickup", k=6)
    probs = [h.probability for h in res.hits]
    assert all(p is not None and 0.0 < p < 1.0 for p in probs)
    enc = service.encoder_for(service.serving())
    for h in res.hits:
        assert h.probability == pytest.approx(
            float(probability(h.score, enc.logit_scale, enc.logit_bias)), abs=1e-5)
    middle = sorted(p for p in probs if p is not None)[len(probs) // 2]
    cut = service.search_text("red pickup", k=6, min_prob=middle)
    assert cut.hits and all(h.probability is not None and h.probability >= middle
                            for h in cut.hits)
    assert len(cut.hits) < len(res.hits) and cut.filters["min_prob"] == middle
    assert service.search_text("red pickup", k=6, min_prob=1.0).hits == []
    for bad in (-0.1, 1.5, "high", True):
        with pytest.raises(QueryError, match="min-prob"):
            service.search_text("red pickup", k=6, min_prob=bad)
    img = Image.new("RGB", (64, 48), (200, 20, 20))
    assert all(h.probability is None for h in service.search_image(img, k=3).hits)


def test_classify_command(env: dict[str, str], tmp_path: Path,
                          compact_model: Path) -> None:
    invoke(["db", "upgrade"], env)
    invoke(["models", "publish", str(compact_model), "--name", "v1", "--promote"], env)
    red = _photo(tmp_path / "red.png", (200, 20, 20), 1)
    blue = _photo(tmp_path / "blue.png", (20, 20, 200), 2)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    p = invoke(["classify", str(red), str(tmp_path / "broken.jpg"), str(blue), "--labels",
             "sedan, pickup,suv", "--json"], env, ok=False)
    assert p.returncode == 1, p.stderr  # one image rejected; the others classified
    out = json.loads(p.stdout)
    assert out["template"] == DEFAULT_TEMPLATE
    assert [r["image"] for r in out["results"]] == [str(red), str(blue)]
    assert all(sorted(s["label"] for s in r["labels"]) == ["pickup", "sedan", "suv"]
               for r in out["results"])
    assert [r["image"] for r in out["rejected"]] == [str(tmp_path / "broken.jpg")]
    text = invoke(["classify", str(red), "--labels", "sedan,pickup", "--top", "1"], env).stdout
    assert text.splitlines()[0] == str(red) and len(text.splitlines()) == 2
    one_line_error(invoke(["classify", str(red), "--labels", " , "], env, ok=False),
                   "at least one label")
    one_line_error(invoke(["classify", str(red), "--labels", "a", "--template", "no slot"], env,
                       ok=False), "template")
    one_line_error(invoke(["search", "red car", "--min-prob", "2"], env, ok=False), "min-prob")
