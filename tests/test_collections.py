"""Collections side by side: `vehicles` and a general `photos` collection, each with its own
serving version, metadata, filters and (on a server) alias, on every database and Milvus
shape. Then the general collection end to end from an Unsplash-style manifest served on
loopback: ingested, searched and classified from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from carsearch.ingest.pipeline import IngestItem, ingest_items, platform_writer
from carsearch.ingest.worker import IngestWorker
from carsearch.lifecycle.reconcile import reconcile
from carsearch.lifecycle.reindex import promote_with_backfill
from carsearch.platform import collections
from carsearch.platform.db import Database, Image, IngestJob, JobState, images, queue
from carsearch.platform.errors import ModelNotFoundError, QueryError
from carsearch.platform.ids import image_id
from carsearch.platform.images import sha256_file
from carsearch.platform.runtime import Platform
from carsearch.platform.search.nlfilters import load_vocabulary, parse_query
from carsearch.platform.vectors.filters import SearchFilters
from fixtures.cli import invoke, one_line_error  # `env`: tests/fixtures/cli.py (in-process)
from fixtures.site import Site  # the `site` fixture: tests/fixtures/site.py
from ingest_world import PublishedModel, make_image, world


def _ingest(p: Platform, collection: str, items: list[IngestItem]) -> int:
    summary = ingest_items(items, db=p.db, writer=platform_writer(p, collection=collection),
                           max_pixels=p.settings.max_image_pixels, progress=False)
    return summary.indexed


def _ids(p: Platform, collection: str) -> set[int]:
    return images.indexed_ids(p.db, collection)


def _invariant(p: Platform, collection: str) -> set[int]:
    v = p.registry.require_serving(collection)
    assert p.store.ids(v.collection) == _ids(p, collection)
    return _ids(p, collection)


@pytest.fixture
def two(tmp_path: Path, database: Database, published_model: PublishedModel,
        compact_model: Path, milvus_uri: str):
    """vehicles (v1 serving, three labelled cars) and photos (p1 serving, three photos,
    one of them the same file as a car)."""
    p = world(tmp_path, database.url, published_model, milvus_uri)
    collections.create(p.db, "photos", "general", "street photos")
    p.registry.publish(compact_model, name="p1", collection="photos")
    promote_with_backfill(p, "p1", progress=False)
    files = [make_image(tmp_path / f"{i}.png", i) for i in range(5)]
    cars = [IngestItem(files[i], "lot", {"class_name": c}) for i, c in
            enumerate(["Ford F-150 Regular Cab 2012", "BMW M3 Coupe 2012",
                       "Chevrolet Silverado 1500 Extended Cab 2010"])]
    photos = [IngestItem(f, "unsplash", {"description": f"a quiet street {i}",
                                         "photographer": f"user{i}", "make": "Ford"})
              for i, f in enumerate([files[0], files[3], files[4]])]
    assert _ingest(p, "vehicles", cars) == 3
    assert _ingest(p, "photos", photos) == 3
    yield p, files
    p.close()


def test_two_collections_keep_their_own_images_versions_and_fields(two) -> None:
    p, files = two
    digest = sha256_file(files[0])
    car_id, photo_id = image_id(digest), image_id(digest, "photos")
    assert car_id != photo_id  # the same file in both is two rows
    assert car_id in _ids(p, "vehicles") and photo_id in _ids(p, "photos")
    assert not _ids(p, "vehicles") & _ids(p, "photos")
    assert _invariant(p, "vehicles") and _invariant(p, "photos")
    assert p.registry.require_serving("vehicles").name == "v1"
    assert p.registry.require_serving("photos").name == "p1"
    with p.db.session() as s:
        photo = s.get(Image, photo_id)
        assert photo is not None and photo.collection == "photos"
        # A general collection reads no vehicle labels: "make" stays plain metadata.
        assert photo.make is None and photo.extra["make"] == "Ford"
        car = s.get(Image, car_id)
        assert car is not None and car.make == "Ford" and car.year == 2012

    veh = p.search.search_text("a pickup", k=10)
    assert veh.collection == "vehicles" and veh.version == "v1"
    assert {h.image_id for h in veh.hits} == _ids(p, "vehicles")
    pho = p.search.search_text("a quiet street", k=10, collection="photos")
    assert pho.collection == "photos" and pho.version == "p1"
    assert {h.image_id for h in pho.hits} == _ids(p, "photos")
    assert {h.description for h in pho.hits} == {f"a quiet street {i}" for i in range(3)}
    assert {h.photographer for h in pho.hits} == {"user0", "user1", "user2"}
    assert {h.source for h in pho.hits} == {"unsplash"}
    img = p.search.search_image(
        PILImage.open(files[3]), k=1, collection="photos")
    assert img.hits[0].image_id == image_id(sha256_file(files[3]), "photos")
    sim = p.search.search_similar(photo_id, k=3, collection="photos")
    assert sim.hits[0].image_id == photo_id


def test_filters_fit_the_collection(two) -> None:
    p, _ = two
    # Vehicle filters read from the text apply to vehicles only; photos ignore them.
    chips = parse_query("ford pickup", load_vocabulary(p.db)).chips
    assert chips
    veh = p.search.search_text("ford pickup", k=3, preferred=chips)
    assert veh.filters.get("make") == ["Ford"] or veh.filters.get("make") == ("Ford",)
    pho = p.search.search_text("ford pickup", k=3, preferred=chips, collection="photos")
    assert pho.filters == {} and pho.relaxed is None and len(pho.hits) == 3
    with pytest.raises(QueryError, match="photos has no make filter"):
        p.search.search_text("x", k=3, filters=SearchFilters(make=("Ford",)),
                             collection="photos")
    ok = p.search.search_text("x", k=3, filters=SearchFilters(source=("unsplash",)),
                              collection="photos")
    assert len(ok.hits) == 3
    none = p.search.search_text("x", k=3, filters=SearchFilters(source=("lot",)),
                                collection="photos")
    assert none.hits == []


def test_promotion_rollback_and_reconcile_stay_in_their_collection(
        two, compact_model: Path) -> None:
    p, _ = two
    p.registry.publish(compact_model, name="p2", collection="photos")
    _, report = promote_with_backfill(p, "p2", progress=False)
    assert report.embedded == 3  # the photos only
    assert p.registry.require_serving("photos").name == "p2"
    assert p.registry.require_serving("vehicles").name == "v1"  # untouched
    assert p.search.search_text("x", k=10, collection="photos").version in ("p1", "p2")
    # Reconcile of one collection never takes the other's vectors for orphans.
    rep = reconcile(p, collection="photos", progress=False)
    assert rep.orphans == rep.missing == 0 and rep.milvus == 3
    rep = reconcile(p, progress=False)  # (it also points the vehicles alias)
    assert rep.version == "v1" and rep.orphans == rep.missing == 0 and rep.milvus == 3
    if not p.store.is_lite:  # each collection has its own alias on a server
        assert p.store.alias_target("carsearch_serving") == "carsearch_v1"
        assert p.store.alias_target(collections.alias_for("photos")) == "carsearch_p2"
    assert p.registry.rollback("photos").name == "p1"
    assert p.registry.require_serving("vehicles").name == "v1"
    with pytest.raises(Exception, match="nothing to roll back"):
        p.registry.rollback("vehicles")
    _invariant(p, "vehicles")
    _invariant(p, "photos")


def test_the_worker_routes_queued_jobs_by_collection(two, tmp_path: Path) -> None:
    p, _ = two
    new = [make_image(tmp_path / f"n{i}.png", 100 + i) for i in range(4)]
    queue.enqueue(p.db, [{"path": str(f), "source": "q", "meta": {"description": "d"},
                          "collection": c} for f, c in
                         zip(new, ["vehicles", "photos", "photos", "nowhere"], strict=True)])
    stats = IngestWorker(p, batch_size=8).run_once()
    assert stats.summary.indexed == 3
    assert len(_invariant(p, "vehicles")) == 4 and len(_invariant(p, "photos")) == 5
    # The job for an unknown collection goes back with its reason (retried, then dead).
    with p.db.session() as s:
        waiting = list(s.scalars(select(IngestJob).where(IngestJob.state == JobState.queued)))
    assert len(waiting) == 1 and "no collection named 'nowhere'" in str(waiting[0].last_error)
    with p.db.session() as s:
        row = s.get(Image, image_id(sha256_file(new[1]), "photos"))
        assert row is not None and row.extra["description"] == "d"


def test_a_collection_without_a_serving_version_says_so(
        tmp_path: Path, database: Database, published_model: PublishedModel) -> None:
    p = world(tmp_path, database.url, published_model)
    try:
        collections.create(p.db, "photos", "general")
        with pytest.raises(ModelNotFoundError, match="for collection photos"):
            p.search.search_text("x", collection="photos")
        with pytest.raises(collections.CollectionError, match="no collection named 'art'"):
            p.search.search_text("x", collection="art")
        with pytest.raises(collections.CollectionError, match="unusable collection name"):
            collections.create(p.db, "Bad Name", "general")
        with pytest.raises(collections.CollectionError, match="kind general, not vehicles"):
            collections.create(p.db, "photos", "vehicles")
    finally:
        p.close()


def test_a_general_collection_from_an_unsplash_manifest_end_to_end(
        site: tuple[str, Site], env: dict[str, str], tmp_path: Path,
        compact_model: Path) -> None:
    """The issue's done-when: a general collection built from an Unsplash-style manifest
    served on loopback, searched from the CLI and classified zero-shot; vehicles beside it
    keep working, and a command that names no collection uses vehicles."""
    base, state = site
    env = {**env, "CARSEARCH_DOWNLOAD__ALLOW_NETWORKS": "127.0.0.0/8"}  # the test server
    invoke(["db", "upgrade"], env)
    invoke(["models", "publish", str(compact_model), "--name", "v1", "--promote"], env)
    assert "collection photos (general)" in invoke(
        ["collections", "create", "photos", "--kind", "general"], env).stdout
    one_line_error(invoke(["search", "street", "--collection", "photos"], env, ok=False),
                   "no serving model version for collection photos")
    out = invoke(["models", "publish", str(compact_model), "--name", "p1", "--collection",
               "photos", "--promote"], env).stdout
    assert "published p1 for photos" in out and "p1 is serving" in out
    lines = ["photo_id\tphoto_image_url\tphoto_description\tphotographer_username"]
    for i, path in enumerate([*state.images, "/missing.jpg"]):
        lines.append(f"p{i}\t{base}{path}\tphoto number {i} of a street\tuser{i}")
    tsv = tmp_path / "photos.tsv000"
    tsv.write_text("\n".join(lines) + "\n")
    got = json.loads(invoke(["ingest", "manifest", str(tsv), "--collection", "photos",
                          "--source", "unsplash", "--json"], env).stdout)
    assert got["indexed"] == 4 and got["download"]["failed"] == 1

    res = json.loads(invoke(["search", "a street", "-c", "photos", "--json"], env).stdout)
    assert res["collection"] == "photos" and res["version"] == "p1"
    assert len(res["hits"]) == 4 and {h["photographer"] for h in res["hits"]} == {
        f"user{i}" for i in range(4)}
    text = invoke(["search", "a street", "-c", "photos", "--source", "unsplash"], env).stdout
    assert "4 hits" in text and "(photos, p1)" in text and "by user" in text
    one_line_error(invoke(["search", "a street", "-c", "photos", "--make", "Ford"], env,
                       ok=False), "photos has no make filter")
    veh = json.loads(invoke(["search", "a street", "--json"], env).stdout)
    assert veh["collection"] == "vehicles" and veh["hits"] == []  # nothing leaks across

    photo = Path(res["hits"][0]["path"])
    cls = json.loads(invoke(["classify", str(photo), "--labels", "street,car,dog",
                          "-c", "photos", "--json"], env).stdout)
    assert cls["collection"] == "photos" and cls["model"] == "p1"
    probs = [s["probability"] for s in cls["results"][0]["labels"]]
    assert len(probs) == 3 and all(0.0 < q < 1.0 for q in probs)

    listed = json.loads(invoke(["collections", "list", "--json"], env).stdout)
    assert {(c["name"], c["kind"], c["serving"], c["images"]["indexed"]) for c in listed} == {
        ("vehicles", "vehicles", "v1", 0), ("photos", "general", "p1", 4)}
    versions = json.loads(invoke(["models", "list", "--json"], env).stdout)
    assert {(v["name"], v["collection"], v["status"]) for v in versions} == {
        ("v1", "vehicles", "serving"), ("p1", "photos", "serving")}
