"""The search page's votes as training signal: the rules, the image join, and the effect
of a thumbs-down on a real (tiny) training run of the compact SigLIP."""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy.orm import Session

from carsearch.data.stanford import load_stanford
from carsearch.platform.db import Database, QueryFeedback, QueryLog, migrate
from carsearch.platform.db import Image as ImageRow
from carsearch.platform.images import sha256_file
from carsearch.platform.models.encoder import Encoder
from carsearch.training.feedback import (
    Vote,
    feedback_cap,
    load_feedback,
    net_votes,
    query_key,
)
from carsearch.training.loss import feedback_loss
from carsearch.training.train_data import TrainSet, feedback_samples
from carsearch.training.trainer import train
from train_helpers import tiny_catalogue, tiny_config

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_catalogue(tmp_path_factory.mktemp("cat") / "catalogue")


def _vote(i: int, image: int, vote: int, query: str | None, minutes: int = 0) -> Vote:
    return Vote(i, T0 + timedelta(minutes=minutes or i), image, vote, query)


def test_net_vote_newest_first_and_cap_rules() -> None:
    votes = [
        _vote(1, 10, -1, "red pickup"),
        _vote(2, 10, -1, "Red  Pickup "),  # the same query, folded
        _vote(3, 10, +1, "red pickup"),  # net -1: one hard negative, counted once
        _vote(4, 11, +1, "blue van"),
        _vote(5, 11, -1, "blue van"),  # net 0: no pair
        _vote(6, 12, +1, "white suv"),  # the newest pair
        _vote(7, 13, -1, None),  # no text: skipped
        _vote(8, 14, +1, "grey coupe", minutes=1),  # old
    ]
    nets, skipped = net_votes(votes)
    assert [(n.image_id, n.label, n.votes) for n in nets] == [
        (12, +1, 1), (10, -1, 3), (14, +1, 1)]
    assert nets[1].query == "red pickup"  # the newest spelling
    assert skipped == {"net vote of 0": 2, "no query text": 1}
    assert query_key(" Red\tPICKUP ") == query_key("red pickup")
    # at most max_pairs, and at most max_share of the train images
    assert feedback_cap(100, 1000, 0.25) == 25
    assert feedback_cap(100, 10, 0.25) == 10
    assert feedback_cap(3, 1000, 0.25) == 1
    assert feedback_cap(100, 1000, 0.0) == 0
    with pytest.raises(ValueError):
        feedback_cap(100, -1, 0.25)


def test_feedback_loss_weights_its_pairs() -> None:
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    scale, bias = torch.tensor(2.0), torch.tensor(-1.0)
    labels = torch.tensor([1.0, -1.0, -1.0])
    z = (img * txt).sum(-1) * scale.exp() + bias
    expected = -torch.nn.functional.logsigmoid(labels * z).sum() / 8
    torch.testing.assert_close(feedback_loss(img, txt, scale, bias, labels, 1.0, 8), expected)
    torch.testing.assert_close(feedback_loss(img, txt, scale, bias, labels, 2.5, 8),
                               2.5 * expected)
    # a thumbs-down is pushed down: its gradient raises the loss with the pair's logit
    emb = img.clone().requires_grad_(True)
    feedback_loss(emb, txt, scale, bias, torch.tensor([-1.0, -1.0, -1.0]), 1.0, 8).backward()
    assert emb.grad is not None and float((emb.grad * txt).sum(-1).min()) > 0


def _add_image(s: Session, image_id: int, path: Path, sha: str | None = None,
               collection: str | None = None) -> None:
    row = ImageRow(id=image_id, sha256=sha or sha256_file(path), path=str(path),
                   source="test")
    if collection is not None:
        row.collection = collection
    s.add(row)


def test_feedback_joins_votes_to_images(
    catalogue: Path, database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = load_stanford(catalogue)
    data = TrainSet.from_dataset(ds, image_size=64, limit=8, progress=False)
    train_items = {item.image_id: item for item in ds.split("train")}
    first, second = (train_items[i] for i in data.image_ids[:2])
    beyond = next(i for i in ds.split("train") if i.image_id not in data.image_ids)
    test_item = ds.split("test")[0]
    store = tmp_path / "store"
    store.mkdir()
    copied = shutil.copy(second.path, store / "second.jpg")  # the inbox moves files
    test_copy = shutil.copy(test_item.path, store / "test.jpg")
    outside = store / "outside.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(outside)
    with database.session() as s:
        _add_image(s, 1, first.path)  # by path: a train image of the run
        _add_image(s, 2, Path(copied))  # by sha256: the same train image, elsewhere
        _add_image(s, 3, Path(test_copy))  # the test split: never trained on
        _add_image(s, 4, beyond.path)  # a train image beyond --limit
        _add_image(s, 5, outside)  # outside the data set: read from its path
        _add_image(s, 6, store / "gone.jpg", sha="0" * 64)  # unreadable
        _add_image(s, 7, outside, sha="1" * 64, collection="photos")
        log_row = QueryLog(query="logged query", k=10, latency_ms=1.0)
        s.add(log_row)
        s.flush()
        at = [T0 + timedelta(minutes=m) for m in range(20)]
        s.add_all([
            QueryFeedback(image_id=1, vote=-1, query="red pickup", created_at=at[1]),
            QueryFeedback(image_id=1, vote=-1, query="red pickup", created_at=at[2]),
            QueryFeedback(image_id=1, vote=1, query="red pickup", created_at=at[3]),
            QueryFeedback(image_id=2, vote=1, query_log_id=log_row.id, created_at=at[4]),
            QueryFeedback(image_id=3, vote=-1, query="q3", created_at=at[5]),
            QueryFeedback(image_id=4, vote=-1, query="q4", created_at=at[6]),
            QueryFeedback(image_id=5, vote=1, query="q5", created_at=at[7]),
            QueryFeedback(image_id=6, vote=1, query="q6", created_at=at[8]),
            QueryFeedback(image_id=7, vote=1, query="q7", created_at=at[9]),
            QueryFeedback(image_id=99, vote=-1, query="q99", created_at=at[10]),
        ])
    with caplog.at_level(logging.INFO, logger="carsearch.training.feedback"):
        found = load_feedback(database, ds, data.image_ids, data.images, max_share=1.0)
    got = {(p.image_id, p.query, p.label, p.train_index) for p in found.pairs}
    assert got == {(1, "red pickup", -1, 0), (2, "logged query", 1, 1), (5, "q5", 1, None)}
    assert [p.image_id for p in found.pairs] == [5, 2, 1]  # newest first
    outside_pair = found.pairs[0]
    # framed by the policy, held like a train image (longer side at most the train set's)
    assert max(outside_pair.image.size) <= max(data.images[0].size)
    assert found.stats["skipped"] == {
        "image row gone": 1,
        "image unreadable": 1,
        "in the data set but not a train image of this run": 2,
        "not in the vehicles collection": 1,
    }
    assert (found.stats["rows"], found.stats["up"], found.stats["down"]) == (10, 2, 1)
    assert "feedback: 3 pairs" in caplog.text and "image row gone" in caplog.text
    # the cap keeps the newest pairs and counts the rest
    capped = load_feedback(database, ds, data.image_ids, data.images, max_pairs=2)
    assert [p.image_id for p in capped.pairs] == [5, 2]
    assert capped.stats["capped"] == 1 and capped.stats["cap"] == 2
    # the per-batch cycle covers every pair, deterministically
    seen = [s["text"] for m in range(3) for s in feedback_samples(found.pairs, m, 1, seed=0)]
    assert sorted(seen) == sorted(p.query for p in found.pairs)
    assert seen == [s["text"] for m in range(3)
                    for s in feedback_samples(found.pairs, m, 1, seed=0)]


def _score(model_dir: Path, images: list[Image.Image], query: str) -> tuple[float, float, float]:
    """(cosine, pair logit) of images[0] and the query under a trained model, and its
    cosine's margin over the mean of the other images'."""
    enc = Encoder(model_dir)
    cos = enc.encode_images(images) @ enc.encode_text([query])[0]
    logit = float(cos[0]) * float(np.exp(enc.logit_scale)) + enc.logit_bias
    return float(cos[0]), logit, float(cos[0] - cos[1:].mean())


def test_thumbs_down_lowers_the_pair(
    compact_model: Path, catalogue: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    migrate.upgrade(url)
    db = Database(url)
    ds = load_stanford(catalogue)
    data = TrainSet.from_dataset(ds, image_size=64, limit=16, progress=False)
    item = next(i for i in ds.split("train") if i.image_id == data.image_ids[0])
    query = item.label.class_name  # its own caption: a positive without the vote
    with db.session() as s:
        _add_image(s, 1, item.path)
        s.add(QueryFeedback(image_id=1, vote=-1, query=query))
    db.dispose()
    runs = {}
    for name, db_url in (("without", ""), ("with", url)):
        result = train(tiny_config(catalogue, compact_model, tmp_path / name,
                                   feedback_db=db_url))
        assert result.model_dir is not None
        runs[name] = result
    assert runs["with"].feedback["pairs"] == 1 and runs["with"].feedback["down"] == 1
    assert runs["without"].feedback == {}
    assert runs["with"].fingerprint != runs["without"].fingerprint
    by_id = {i.image_id: i for i in ds.split("train")}
    images = [ds.open_image(by_id[i]) for i in data.image_ids]  # the voted image first
    without = _score(runs["without"].model_dir, images, query)  # type: ignore[arg-type]
    with_vote = _score(runs["with"].model_dir, images, query)  # type: ignore[arg-type]
    logging.getLogger(__name__).info("cos/logit/margin without %s, with %s", without,
                                     with_vote)
    # lower in cosine and pair logit, and against the run's other train images too
    assert with_vote[0] < without[0] and with_vote[1] < without[1]
    assert with_vote[2] < without[2]
