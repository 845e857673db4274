"""What is served is what is measured (issue 25): one image policy per model version,
boxes as data, the served-view evaluation, chance levels and intervals, honest splits,
attribute-aware positives. Real parts: the compact model, Milvus Lite / the Milvus server,
SQLite / PostgreSQL."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carsearch.data.stanford import load_stanford, validation_ids
from carsearch.ingest.pipeline import BatchWriter, IngestItem, clean_metadata, ingest_items
from carsearch.platform.db import Database
from carsearch.platform.db import Image as ImageRow
from carsearch.platform.ids import image_id
from carsearch.platform.images import sha256_file
from carsearch.platform.metrics import (
    bootstrap_interval,
    expected_random_ap,
    query_scores,
    random_hit_at_k,
    random_reciprocal_rank,
)
from carsearch.platform.models.encoder import Encoder
from carsearch.platform.models.image_policy import (
    IMPLIED_POLICY,
    POLICY_FILE,
    BoxError,
    ImagePolicy,
    check_box,
    parse_box,
    read_policy,
    write_policy,
)
from carsearch.platform.search.evaluation import (
    EvalQuery,
    evaluate_served,
    store_served,
    stored_served,
)
from carsearch.training.evaluate import held_out_queries, image_embeddings, label_fields
from ingest_world import PublishedModel, world
from train_helpers import tiny_catalogue


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_catalogue(tmp_path_factory.mktemp("cat") / "catalogue", n=24)


@pytest.fixture(scope="module")
def policy_model(tmp_path_factory: pytest.TempPathFactory, compact_model: Path) -> Path:
    """The compact model with a recorded policy that widens boxes by 10 %."""
    out = tmp_path_factory.mktemp("policy") / "model"
    shutil.copytree(compact_model, out)
    write_policy(out, ImagePolicy(margin=0.1))
    return out


# -- the policy ---------------------------------------------------------------------------
def test_policy_frames_serves_and_trains_between_box_and_frame(tmp_path: Path) -> None:
    img = Image.new("RGB", (100, 80))
    policy = ImagePolicy(margin=0.1, train_views="box-to-frame")
    assert policy.served_box(img.size, (20, 20, 60, 50)) == (16, 17, 64, 53)
    assert policy.frame(img, (20, 20, 60, 50)).size == (48, 36)
    assert policy.frame(img, None).size == (100, 80)  # no box: the whole frame
    assert policy.train_box(img.size, (20, 20, 60, 50), 0.0) == (16, 17, 64, 53)
    assert policy.train_box(img.size, (20, 20, 60, 50), 1.0) == (0, 0, 100, 80)
    x1, y1, x2, y2 = policy.train_box(img.size, (20, 20, 60, 50), 0.5)  # type: ignore[misc]
    assert (x1, y1, x2, y2) == (8, 8, 82, 66)
    assert ImagePolicy(train_views="box").train_box(img.size, (20, 20, 60, 50), 1.0) == (
        20, 20, 60, 50)
    assert ImagePolicy(framing="whole").frame(img, (20, 20, 60, 50)).size == (100, 80)
    # recorded with the version, read back; a folder without one gets the implied policy
    write_policy(tmp_path, policy)
    assert read_policy(tmp_path) == ImagePolicy(margin=0.1, train_views="box-to-frame",
                                                source="file")
    assert read_policy(tmp_path / "absent") is IMPLIED_POLICY
    assert IMPLIED_POLICY.framing == "box" and IMPLIED_POLICY.train_views == "box"


def test_policy_is_recorded_in_the_version_and_its_hash(database, tmp_path: Path,
                                                        policy_model: Path) -> None:
    from carsearch.platform.models.registry import Registry

    reg = Registry(database, tmp_path / "models")
    v = reg.publish(policy_model, name="p1")
    artifact = Path(v.artifact_path)
    assert (artifact / POLICY_FILE).is_file()
    assert Encoder(artifact).policy.margin == 0.1
    (artifact / POLICY_FILE).write_text(json.dumps({"margin": 0.3}))
    with pytest.raises(Exception, match=r"changed since it was published"):
        reg.verify(v)


# -- boxes --------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ([10, 5, 50, 40], ((10, 5, 50, 40), None)),
    ("10,5,50,40", ((10, 5, 50, 40), None)),
    ("10 5 50 40", ((10, 5, 50, 40), None)),
    ({"x1": 10, "y1": 5, "x2": 50, "y2": 40}, ((10, 5, 50, 40), None)),
    ([-20, -5, 500, 400], ((0, 0, 64, 48), None)),  # clipped to the image
    ([10.4, 5.6, 50.2, 40.5], ((10, 6, 50, 40), None)),
])
def test_boxes_are_parsed_and_clipped(value: object, expected: tuple) -> None:
    assert check_box(value, (64, 48)) == expected


@pytest.mark.parametrize("value, reason", [
    ([50, 5, 10, 40], "inverted"),
    ([10, 5, 10, 40], "inverted or empty"),
    ([1, 2, 3], "4 numbers"),
    (["a", 2, 3, 4], "not a number"),
    ([True, 2, 3, 4], "numbers"),
    ([float("nan"), 2, 3, 4], "finite"),
    ("1;2;3;4", "4 numbers"),
    (17, "must be"),
    ([100, 100, 200, 200], "outside"),
])
def test_bad_boxes_are_refused_with_a_reason(value: object, reason: str) -> None:
    box, why = check_box(value, (64, 48))
    assert box is None and why is not None and reason in why


def test_parse_box_raises_box_error() -> None:
    with pytest.raises(BoxError, match="inverted"):
        parse_box([3, 3, 1, 1])


def test_metadata_box_is_kept_or_refused_never_fatal() -> None:
    ok = clean_metadata({"box": [1, 2, 30, 40], "make": "Ford"}, "t", size=(64, 48))
    assert ok.box == (1, 2, 30, 40) and "box" not in (ok.extra or {}) and not ok.rejected
    bad = clean_metadata({"box": "x"}, "t", size=(64, 48))
    assert bad.box is None and "box" in bad.rejected
    assert bad.extra is not None and "box" in bad.extra["rejected_metadata"]


# -- ingest stores what evaluation measures ------------------------------------------------
def test_ingest_vector_equals_evaluation_vector(
    tmp_path: Path, database: Database, milvus_uri: str, policy_model: Path,
    catalogue: Path
) -> None:
    ds = load_stanford(catalogue)
    items = ds.split("test")[:6]
    p = world(tmp_path, database.url, policy_model, milvus_uri)
    try:
        v = p.registry.require_serving()
        enc = p.search.encoder_for(v)
        assert enc.policy.margin == 0.1  # the version's own policy, read from its folder
        boxed = [IngestItem(im.path, "t", {"class_name": im.label.class_name,
                                           "box": list(im.bbox or ())}) for im in items[:3]]
        # the same photos re-saved (other bytes, another id) without a box: whole frames
        whole = []
        for im in items[3:]:
            copy = tmp_path / f"whole-{im.path.stem}.png"
            Image.open(im.path).save(copy)
            whole.append(IngestItem(copy, "t", {"class_name": im.label.class_name}))
        writer = BatchWriter.fixed(p.db, p.store, enc, v)
        summary = ingest_items(boxed + whole, db=p.db, writer=writer, max_pixels=10**7,
                               batch_size=4, progress=False)
        assert summary.indexed == 6
        ids = [image_id(sha256_file(it.path)) for it in boxed + whole]
        found, stored = p.store.vectors(v.collection, ids)
        stored_by_id = dict(zip([int(i) for i in found], stored, strict=True))
        box_eval = image_embeddings(ds, items[:3], {"m": Encoder(policy_model)},
                                    framing="box", progress=False)["m"]
        whole_eval = image_embeddings(ds, items[3:], {"m": Encoder(policy_model)},
                                      framing="whole", progress=False)["m"]
        expected = np.concatenate([box_eval, whole_eval])
        got = np.stack([stored_by_id[i] for i in ids])
        assert np.allclose(got, expected, atol=1e-5)
        # and the box is stored with the row, the whole photo kept as the file
        with p.db.session() as s:
            boxes = [s.get(ImageRow, i).box for i in ids]
        assert boxes[:3] == [list(im.bbox) for im in items[:3]] and boxes[3:] == [None] * 3
        # the box matters: the crop's vector is not the whole photo's
        assert not np.allclose(box_eval[0], Encoder(policy_model).encode_images(
            [Image.open(items[0].path).convert("RGB")])[0], atol=1e-3)
    finally:
        p.close()


def test_a_bad_box_costs_only_the_box(tmp_path: Path, make_database,
                                      published_model: PublishedModel,
                                      catalogue: Path) -> None:
    ds = load_stanford(catalogue)
    im = ds.split("test")[0]
    p = world(tmp_path, make_database("sqlite").url, published_model)
    try:
        v = p.registry.require_serving()
        writer = BatchWriter.fixed(p.db, p.store, p.search.encoder_for(v), v)
        summary = ingest_items([IngestItem(im.path, "t", {"box": [500, 500, 10, 10]})],
                               db=p.db, writer=writer, max_pixels=10**7, progress=False)
        assert summary.indexed == 1 and summary.fields_rejected == 1
        with p.db.session() as s:
            row = s.query(ImageRow).one()
        assert row.box is None and "inverted" in row.extra["rejected_metadata"]["box"]
    finally:
        p.close()


# -- chance levels, intervals, per-query scores -------------------------------------------
@pytest.mark.parametrize("n, r", [(5, 1), (6, 2), (7, 3), (6, 6)])
def test_chance_levels_match_brute_force(n: int, r: int) -> None:
    aps, hits1, hits3, rrs, aps_at3 = [], [], [], [], []
    for perm in itertools.permutations(range(n)):
        flags = [i < r for i in perm]
        sc = query_scores([flags], [r], n, ks=(1, 3))
        aps.append(sc.ap[0])
        hits1.append(sc.hits[1][0])
        hits3.append(sc.hits[3][0])
        rrs.append(sc.rr[0])
        aps_at3.append(query_scores([flags[:3]], [r], n, ks=(1,)).ap[0])
    assert expected_random_ap(r, n) == pytest.approx(np.mean(aps), abs=1e-12)
    assert expected_random_ap(r, n, depth=3) == pytest.approx(np.mean(aps_at3), abs=1e-12)
    assert random_hit_at_k(r, n, 1) == pytest.approx(np.mean(hits1), abs=1e-12)
    assert random_hit_at_k(r, n, 3) == pytest.approx(np.mean(hits3), abs=1e-12)
    assert random_reciprocal_rank(r, n) == pytest.approx(np.mean(rrs), abs=1e-12)
    if 1 < r < n:
        assert expected_random_ap(r, n) > r / n  # R/N understates chance


def test_issue_chance_figure() -> None:
    # 600 catalogue test images, 36 classes of about 16.7 images: about 0.037, not 0.028
    value = np.mean([expected_random_ap(r, 600) for r in [17] * 24 + [16] * 12])
    assert 0.036 < value < 0.039


def test_bootstrap_interval_holds_the_estimate() -> None:
    rng = np.random.default_rng(3)
    for values in (rng.random(36), (rng.random(36) < 0.9).astype(float), np.ones(5)):
        lo, hi = bootstrap_interval(values)
        assert lo <= float(np.mean(values)) <= hi
    lo, hi = bootstrap_interval((np.arange(36) < 18).astype(float))
    assert 0.25 < lo < 0.5 < hi < 0.75  # one query moves R@1 by 1/36: the interval is wide


# -- splits --------------------------------------------------------------------------------
def test_validation_is_carved_from_train_disjoint_and_covers_classes(tmp_path: Path) -> None:
    ds = load_stanford(tiny_catalogue(tmp_path / "cat", n=300))
    train, val, test = (set(i.image_id for i in ds.subset(s))
                        for s in ("train", "validation", "test"))
    whole = {i.image_id for i in ds.split("train")}
    assert val and not train & val and not (train | val) & test
    assert train | val == whole
    counts: dict[str, int] = {}
    for im in ds.split("train"):
        counts[im.label.class_name] = counts.get(im.label.class_name, 0) + 1
    val_classes = {im.label.class_name for im in ds.subset("validation")}
    assert val_classes == {c for c, n in counts.items() if n >= 3}
    assert validation_ids(ds.split("train")) == val  # a pure function of the ids


def test_training_never_sees_validation_or_test(catalogue: Path) -> None:
    from carsearch.training.train_data import TrainSet

    ds = load_stanford(catalogue)
    data = TrainSet.from_dataset(ds, image_size=32, progress=False)
    held = {i.image_id for i in ds.subset("validation")} | {i.image_id for i in ds.split("test")}
    assert data.image_ids and not set(data.image_ids) & held
    # held whole, with boxes: the policy frames each sample
    assert all(b is not None for b in data.boxes)
    assert len(data.images) == len(data.boxes)


# -- attribute-aware positives ------------------------------------------------------------
def test_a_query_that_names_a_colour_is_positive_only_for_that_colour() -> None:
    q = EvalQuery("red chevy silverado", attributes={"make": "Chevrolet",
                                                     "model": "Silverado 1500",
                                                     "colour": "red"})
    red = {"class_name": "x", "make": "Chevrolet", "model": "Silverado 1500", "colour": "red"}
    blue = {**red, "colour": "blue"}
    other = {**red, "make": "Ford"}
    assert q.matches(red) and not q.matches(blue) and not q.matches(other)
    assert not q.matches({**red, "colour": None})  # unknown colour: not a positive
    by_class = EvalQuery("Ford F-150", ("Ford F-150",))
    assert by_class.matches({"class_name": "Ford F-150"})


def test_held_out_phrasings_are_labelled_by_their_attributes(catalogue: Path) -> None:
    from carsearch.data.augment.offline import PREFIXES

    ds = load_stanford(catalogue)
    items = ds.split("test")
    queries = held_out_queries(items)
    assert queries
    fields = [label_fields(im) for im in items]
    for q in queries:
        assert q.attributes and not q.relevant
        positives = [f for f in fields if q.matches(f)]
        assert positives  # written from an image of the set
        for f in positives:
            for name, value in q.attributes.items():
                assert str(f[name]).lower() == str(value).lower()
        assert not any(q.text.startswith(p) for p in PREFIXES if p.strip())


# -- the served view -----------------------------------------------------------------------
def test_served_evaluation_scores_the_index_against_the_database(
    tmp_path: Path, database: Database, milvus_uri: str, published_model: PublishedModel,
    catalogue: Path
) -> None:
    ds = load_stanford(catalogue)
    items = ds.split("test")[:8]
    p = world(tmp_path, database.url, published_model, milvus_uri)
    try:
        v = p.registry.require_serving()
        enc = p.search.encoder_for(v)
        writer = BatchWriter.fixed(p.db, p.store, enc, v)
        ingest_items([IngestItem(im.path, "t", {"class_name": im.label.class_name,
                                                "colour": im.label.colour,
                                                "box": list(im.bbox or ())}) for im in items],
                     db=p.db, writer=writer, max_pixels=10**7, progress=False)
        names = sorted({im.label.class_name for im in items})
        queries = [EvalQuery(n, (n,)) for n in names]
        result = evaluate_served(p.search, {"class names": queries}, n_boot=200)
        got = result["query_sets"]["class names"]
        assert result["n_images"] == 8 and result["k"] == 8
        # brute force: the stored vectors ranked by the text vectors, labels from the rows
        with p.db.session() as s:
            rows = list(s.query(ImageRow))
        ids = [int(r.id) for r in rows]
        found, vecs = p.store.vectors(v.collection, ids)
        labels = {int(r.id): r.class_name for r in rows}
        texts = enc.encode_text(names)
        aps, r1 = [], []
        for t, name in zip(texts, names, strict=True):
            order = [int(found[j]) for j in np.argsort(-(vecs @ t), kind="stable")]
            flags = [labels[i] == name for i in order]
            r1.append(float(flags[0]))
            pos = [k + 1 for k, f in enumerate(flags) if f]
            aps.append(np.mean([(n + 1) / r for n, r in enumerate(pos)]))
        assert got["recall@1"] == pytest.approx(np.mean(r1))
        assert got["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)
        assert got["ci95"]["mAP"][0] <= got["mAP"] <= got["ci95"]["mAP"][1]
        assert got["chance"]["mAP"] == pytest.approx(np.mean(
            [expected_random_ap(sum(1 for x in labels.values() if x == n), 8) for n in names]))
        # kept with the version (the page's Evaluation tab reads it), other metrics kept;
        # a NaN (no probabilities) is stored as null, which PostgreSQL's JSON accepts
        before = dict(p.registry.get(v.name).metrics or {})
        got["calibration"]["ece"] = float("nan")
        store_served(p.db, result)
        kept = stored_served(p.db, v.name)
        assert kept is not None and kept["measured_at"]
        assert kept["query_sets"]["class names"]["mAP"] == pytest.approx(got["mAP"])
        assert kept["query_sets"]["class names"]["calibration"]["ece"] is None
        after = dict(p.registry.get(v.name).metrics or {})
        assert {k: x for k, x in after.items() if k != "served"} == before
        assert stored_served(p.db, "no-such-version") is None
    finally:
        p.close()


# -- calibration ---------------------------------------------------------------------------
def test_reliability_table_and_ece() -> None:
    from carsearch.platform.metrics import reliability

    # bin 0.9-1.0: 4 pairs at 0.95 of which 2 positive; bin 0.0-0.1: 4 at 0.05, none
    out = reliability([0.95] * 4 + [0.05] * 4, [1, 1, 0, 0, 0, 0, 0, 0])
    assert out["n"] == 8 and out["positives"] == 2
    assert [(b["n"], b["observed"]) for b in out["bins"]] == [(4, 0.0), (4, 0.5)]
    assert out["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.45)
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    calibrated = reliability(p, rng.random(20000) < p)
    assert calibrated["ece"] < 0.02
    with pytest.raises(ValueError):
        reliability([0.1], [1, 0])


def test_offline_evaluation_reports_sets_chance_intervals_and_calibration(
    tmp_path: Path, compact_model: Path, catalogue: Path
) -> None:
    from carsearch.training.evaluate import evaluate_models, load_eval_queries

    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"query": "a red car", "attributes": {"colour": "red"}})
                     + "\n")
    assert load_eval_queries(qfile)[0].attributes == {"colour": "red"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "x"}) + "\n")
    with pytest.raises(Exception, match="relevant class names or attributes"):
        load_eval_queries(bad)
    res = evaluate_models({"m": compact_model}, catalogue, framings=("box", "whole"),
                          progress=False, n_boot=100)
    sets = res["models"]["m"]["query_sets"]
    assert set(sets) == {"box", "whole"}
    for framing in sets.values():
        assert set(framing) == {"class names", "held-out phrasings"}
        for summary in framing.values():
            lo, hi = summary["ci95"]["mAP"]
            assert lo <= summary["mAP"] <= hi
            assert 0 < summary["chance"]["mAP"] < 1
            assert summary["calibration"]["n"] == summary["n_queries"] * res["n_images"]
    assert res["chance_mAP"] == sets["box"]["class names"]["chance"]["mAP"]


def test_label_import_sets_a_box_and_re_embeds_the_crop(
    tmp_path: Path, make_database, published_model: PublishedModel, catalogue: Path
) -> None:
    from carsearch.lifecycle.labelling import LabelImportError, import_rows

    im = load_stanford(catalogue).split("test")[0]
    p = world(tmp_path, make_database("sqlite").url, published_model)
    try:
        v = p.registry.require_serving()
        enc = p.search.encoder_for(v)
        ingest_items([IngestItem(im.path, "t", {})], db=p.db,
                     writer=BatchWriter.fixed(p.db, p.store, enc, v), max_pixels=10**7,
                     progress=False)
        iid = image_id(sha256_file(im.path))
        with pytest.raises(LabelImportError, match="box"):
            import_rows(p, [(2, {"image_id": iid, "box": "9,9,1,1"})])
        with pytest.raises(LabelImportError, match="outside"):
            import_rows(p, [(2, {"image_id": iid, "box": [900, 900, 990, 990]})])
        report = import_rows(p, [(2, {"image_id": iid, "make": "Ford",
                                      "box": ",".join(map(str, im.bbox or ()))})])
        assert report.applied == 1
        with p.db.session() as s:
            assert s.get(ImageRow, iid).box == list(im.bbox or ())
        _, vec = p.store.vectors(v.collection, [iid])
        expected = enc.encode_images([Image.open(im.path).convert("RGB")], [im.bbox])
        assert np.allclose(vec, expected, atol=1e-5)
    finally:
        p.close()


def test_training_positives_match_the_colour_a_text_names() -> None:
    import torch

    from carsearch.training.loss import pair_labels
    from carsearch.training.train_data import colour_id, named_colour

    assert named_colour("a red 2012 chevy pickup") == "red"
    assert named_colour("chevy pickup 2012") is None
    red, blue = colour_id("red"), colour_id("blue")
    assert red >= 0 and blue >= 0 and colour_id(None) == -1
    classes = torch.tensor([0, 0, 1])
    # image 0 red, image 1 blue, image 2 red; text 0 names red, text 1 nothing, text 2 red
    labels = pair_labels(classes, 3, torch.device("cpu"),
                         image_colours=torch.tensor([red, blue, red]),
                         text_colours=torch.tensor([red, -1, red]))
    assert labels.tolist() == [[1, 1, -1],
                               [-1, 1, -1],  # the blue image is no "red" text's positive
                               [-1, -1, 1]]
    # class-name columns (no colour) stay class-level
    cols = pair_labels(classes, 3, torch.device("cpu"), text_classes=torch.tensor(
        [0, 0, 1, 0, 1]), image_colours=torch.tensor([red, blue, red]),
        text_colours=torch.tensor([red, -1, red, -1, -1]))
    assert cols[:, 3:].tolist() == [[1, -1], [1, -1], [-1, 1]]
