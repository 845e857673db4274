"""Search service end to end: real compact model, Milvus Lite (its own search and the
mirror) and a Milvus server, SQLite/PostgreSQL."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from carsearch.ingest.pipeline import BatchWriter, IngestItem, ingest_items, read_manifest
from carsearch.platform.db import Database, ImageStatus, QueryLog
from carsearch.platform.db import Image as ImageRow
from carsearch.platform.errors import ModelNotFoundError, QueryError
from carsearch.platform.search.service import SearchService
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.filters import SearchFilters
from carsearch.platform.vectors.memory import ExactStore
from carsearch.platform.vectors.mirror import MirroredStore
from fixtures.search_world import LABELS, _draw

# LABELS and the `service` / `indexed` fixtures: tests/fixtures/search_world.py


def test_text_search_returns_hits_with_metadata(service: SearchService, indexed) -> None:
    res = service.search_text("  red 2012 chevy   pickup ", k=4)
    assert res.query == "red 2012 chevy pickup"
    assert res.version == "base"
    assert [h.rank for h in res.hits] == [1, 2, 3, 4]
    scores = [h.score for h in res.hits]
    assert scores == sorted(scores, reverse=True)
    by_class = {c for c, _ in LABELS}
    assert all(h.class_name in by_class and h.make and Path(h.path).is_file() for h in res.hits)
    with service.db.session() as s:
        log = s.scalars(select(QueryLog)).all()
    assert len(log) == 1 and log[0].query == "red 2012 chevy pickup"
    assert log[0].result_ids == [h.image_id for h in res.hits]


def test_filters_apply(service: SearchService, indexed) -> None:
    res = service.search_text("car", k=10, filters=SearchFilters(body="pickup"))
    assert {h.make for h in res.hits} == {"Chevrolet", "Ford"}
    res = service.search_text("car", k=10, filters=SearchFilters(year_max=2000))
    assert [h.class_name for h in res.hits] == ["Volkswagen Golf Hatchback 1991"]
    res = service.search_text("car", k=10, filters=SearchFilters(colour="silver", make="BMW"))
    assert res.hits == []


def test_filters_read_from_text_are_relaxed_to_fill_the_page(
        service: SearchService, indexed) -> None:
    from carsearch.platform.search.nlfilters import load_vocabulary, parse_query

    vocab = load_vocabulary(service.db)
    # No Mercedes-Benz coupe is indexed: the Mercedes first, then the coupe, then the
    # oldest vehicle ("older model": the oldest third of the 3 years indexed), then the rest.
    parsed = parse_query("older model mercedes coupe", vocab)
    assert {c.key for c in parsed.chips} == {"make=Mercedes-Benz", "body=coupe",
                                             "year=1991"}
    res = service.search_text(parsed.text, k=5, preferred=parsed.chips)
    assert len(res.hits) == 5 and [h.rank for h in res.hits] == [1, 2, 3, 4, 5]
    assert res.hits[0].class_name == "Mercedes-Benz C-Class Sedan 2012"
    assert res.hits[1].class_name == "BMW M3 Coupe 2012"
    assert res.hits[2].class_name == "Volkswagen Golf Hatchback 1991"
    assert res.relaxed == (
        "no Mercedes-Benz coupe from 1991; showing Mercedes-Benz of any body or year, then "
        "coupe of any make or year, then vehicles from 1991 of any make or body, then the "
        "nearest vehicles")
    assert res.hits[0].unmet == ("body: coupe", "year: 1991 (older model)")
    assert res.hits[2].unmet == ("make: Mercedes-Benz", "body: coupe")
    assert res.tiers[0]["hits"] == 0 and sum(t["hits"] for t in res.tiers) == 5
    assert res.filters == {"make": ("Mercedes-Benz",), "body": ("coupe",),
                           "year_min": 1991, "year_max": 1991}
    # Enough matches: nothing relaxed, every hit meets the filters.
    parsed = parse_query("a 2012 car", vocab)
    res = service.search_text(parsed.text, k=3, preferred=parsed.chips)
    assert res.relaxed is None and all(h.year == 2012 and not h.unmet for h in res.hits)
    # The person's own filters stay hard: relaxation never crosses them.
    parsed = parse_query("red chevy", vocab)
    res = service.search_text(parsed.text, k=5, filters=SearchFilters(year_max=2010),
                              preferred=parsed.chips)
    assert {h.class_name for h in res.hits} == {"Ford F-150 Regular Cab 2007",
                                                "Volkswagen Golf Hatchback 1991"}
    assert res.relaxed is not None and res.relaxed.startswith("no red Chevrolet")
    res = service.search_text(parsed.text, k=5, filters=SearchFilters(make="BMW", year_max=2000),
                              preferred=parsed.chips)
    assert res.hits == [] and res.relaxed is not None


def test_image_search_finds_the_same_image_first(service: SearchService, indexed,
                                                 tmp_path: Path) -> None:
    res = service.search_image(Image.open(tmp_path / "car2.png"), k=3)
    assert res.hits[0].class_name == "BMW M3 Coupe 2012"
    assert res.hits[0].score == pytest.approx(1.0, abs=1e-4)
    again = service.search_similar(res.hits[0].image_id, k=1)
    assert again.hits[0].image_id == res.hits[0].image_id


def test_more_like_this_uses_the_stored_vector_and_falls_back_to_the_file(
    service: SearchService, indexed, tmp_path: Path
) -> None:
    first = service.search_image(Image.open(tmp_path / "car3.png"), k=len(LABELS))
    image_id = first.hits[0].image_id
    path = Path(first.hits[0].path)
    moved = path.rename(tmp_path / "elsewhere.png")  # no file: only the vector can serve
    similar = service.search_similar(image_id, k=len(LABELS))
    assert [h.image_id for h in similar.hits] == [h.image_id for h in first.hits]
    assert similar.hits[0].score == pytest.approx(1.0, abs=1e-4)
    # Not in the collection (not indexed there yet): the file is decoded and encoded.
    moved.rename(path)
    service.store.delete(indexed.collection, [image_id])
    fallback = service.search_similar(image_id, k=len(LABELS))
    assert image_id not in [h.image_id for h in fallback.hits]
    assert len(fallback.hits) == len(LABELS) - 1
    with pytest.raises(QueryError, match="no image with id"):
        service.search_similar(12345, k=3)


def test_corrupt_file_is_quarantined_with_reason(service: SearchService, indexed) -> None:
    with service.db.session() as s:
        rows = s.scalars(select(ImageRow).where(ImageRow.status == ImageStatus.quarantined)).all()
        n = s.scalar(select(func.count()).select_from(ImageRow))
    assert len(rows) == 1 and rows[0].path.endswith("broken.jpg") and rows[0].error
    assert n == len(LABELS) + 1
    assert service.store.count(indexed.collection) == len(LABELS)


def test_replaying_an_ingest_doubles_nothing(service: SearchService, indexed,
                                             tmp_path: Path) -> None:
    # The same bytes under a second name, and the whole first batch again.
    (tmp_path / "copy.png").write_bytes((tmp_path / "car0.png").read_bytes())
    items = [IngestItem(tmp_path / f"car{i}.png") for i in range(3)]
    items.append(IngestItem(tmp_path / "copy.png"))
    writer = BatchWriter.fixed(service.db, service.store, service.encoder_for(indexed), indexed)
    ingest_items(items, db=service.db, writer=writer, max_pixels=10**7, progress=False)
    with service.db.session() as s:
        n = s.scalar(select(func.count()).select_from(ImageRow))
    assert n == len(LABELS) + 1
    assert service.store.count(indexed.collection) == len(LABELS)


# What does not depend on the shape (a query's checks run before any store or database is
# asked) runs on the cheapest shape only: SQLite and Milvus Lite's own search.
cheapest_shape = pytest.mark.parametrize(("db_kind", "service"), [("sqlite", "milvus")],
                                         indirect=["service"])


@cheapest_shape
@pytest.mark.parametrize("query", ["", "   ", "x" * 10_000])
def test_bad_queries_get_a_message(service: SearchService, indexed, query: str) -> None:
    with pytest.raises(QueryError) as err:
        service.search_text(query)
    assert "query" in str(err.value)


@cheapest_shape
def test_bad_k_and_no_serving_version(service: SearchService) -> None:
    with pytest.raises(QueryError):
        service.search_text("red car", k=0)
    with pytest.raises(ModelNotFoundError, match="no serving model version"):
        service.search_text("red car")


def test_real_photos_end_to_end(service: SearchService, compact_model: Path,
                                stanford_root: Path, tmp_path: Path) -> None:
    """A few real Stanford Cars photos through ingest and search (skips without them)."""
    from carsearch.data.stanford import load_stanford

    items = load_stanford(stanford_root).split("test")[:12]
    manifest = tmp_path / "real.jsonl"
    manifest.write_text("".join(
        json.dumps({"path": str(i.path), "class_name": i.label.class_name,
                    "source": "stanford_cars"}) + "\n" for i in items))
    v = service.registry.publish(compact_model, name="real")
    service.registry.promote("real")
    writer = BatchWriter.fixed(service.db, service.store, service.encoder_for(v), v)
    summary = ingest_items(list(read_manifest(manifest)), db=service.db, writer=writer,
                           max_pixels=10**8, progress=False)
    assert summary.indexed == len({i.path.read_bytes() for i in items})
    res = service.search_text("silver sedan", k=5)
    assert len(res.hits) == 5 and all(h.source == "stanford_cars" for h in res.hits)
    first = items[0]
    res = service.search_image(Image.open(first.path), k=1)
    assert res.hits[0].class_name == first.label.class_name
    assert res.hits[0].score == pytest.approx(1.0, abs=1e-4)
    makes = {i.label.make for i in items}
    some = sorted(makes)[0]
    res = service.search_text("car", k=20, filters=SearchFilters(make=some))
    assert res.hits and {h.make for h in res.hits} == {some}


def test_a_promotion_moves_the_mirror_to_the_new_version(
    database: Database, tmp_path: Path, compact_model: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=database.url)
    store = MirroredStore(settings.milvus_uri)
    service = SearchService(settings, database, store)
    service.serving_ttl_s = 0.0
    try:
        items = []
        for i, (cls, colour) in enumerate(LABELS):
            _draw(tmp_path / f"car{i}.png", i)
            items.append(IngestItem(tmp_path / f"car{i}.png", "test",
                                    {"class_name": cls, "colour": colour}))
        versions = {}
        for name in ("one", "two"):
            versions[name] = service.registry.publish(compact_model, name=name)
            writer = BatchWriter.fixed(database, store, service.encoder_for(versions[name]),
                                       versions[name])
            ingest_items(items, db=database, writer=writer, max_pixels=10**7, batch_size=8,
                         progress=False)
        service.registry.promote("one")
        service.warm(wait=True)
        first = service.search_text("red pickup", k=3)
        assert store.mirror(versions["one"].collection) is not None
        service.registry.promote("two")
        second = service.search_text("red pickup", k=3)  # Milvus answers; a build starts
        assert second.version == "two"
        assert store.mirror(versions["one"].collection) is None  # the old copy is freed
        store.warm(versions["two"].collection)  # wait for the new one
        third = service.search_text("red pickup", k=3)
        assert store.mirror(versions["two"].collection) is not None
        # Same model and images in both versions: the same ranking from either path.
        assert ([h.image_id for h in first.hits] == [h.image_id for h in second.hits]
                == [h.image_id for h in third.hits])
    finally:
        store.close()


def test_a_promotion_releases_the_old_versions_encoder(
    database: Database, tmp_path: Path, compact_model: Path
) -> None:
    """A long-running page does not keep every version it ever served: once v2 serves,
    the service no longer holds v1's encoder (a weak reference to it dies)."""
    settings = Settings(data_dir=tmp_path / "data", database_url=database.url)
    service = SearchService(settings, database, ExactStore())
    service.serving_ttl_s = 0.0
    for name in ("v1", "v2"):
        v = service.registry.publish(compact_model, name=name)
        service.store.ensure_collection(v.collection, v.dim)
    service.registry.promote("v1")
    assert service.search_text("red pickup", k=3).version == "v1"
    old = weakref.ref(service.encoder_for(service.registry.get("v1")))
    service.registry.promote("v2")
    assert service.search_text("red pickup", k=3).version == "v2"
    gc.collect()
    assert old() is None, "the v1 encoder is still held after v2 serves"
    assert service.encoder_for(service.registry.get("v2")) is service.encoder_for(
        service.serving())  # the serving one stays cached


def test_one_search_call_reads_filters_from_the_text(service: SearchService, indexed) -> None:
    """`search(SearchRequest)` is the page's and the CLI's path: it cleans the query,
    reads its filters, relaxes them and returns the chips and the effective filters, with
    the same hits as parsing first and passing the chips to `search_text`."""
    from carsearch.platform.search.nlfilters import (
        filters_from_chips,
        load_vocabulary,
        parse_query,
    )
    from carsearch.platform.search.service import SearchRequest

    parsed = parse_query("older model mercedes coupe", load_vocabulary(service.db))
    res = service.search(SearchRequest("  older model\tmercedes   coupe ", k=5))
    same = service.search_text(parsed.text, k=5, preferred=parsed.chips)
    assert res.query == "older model mercedes coupe"
    assert res.chips == parsed.chips and res.ignored == parsed.ignored
    assert [h.image_id for h in res.hits] == [h.image_id for h in same.hits]
    assert [h.unmet for h in res.hits] == [h.unmet for h in same.hits]
    assert res.relaxed == same.relaxed and res.filters == same.filters
    assert res.effective == parsed.filters
    assert res.to_dict()["chips"] == [c.key for c in parsed.chips]
    # The person removed the make chip and picked a year: theirs overrides the text's.
    kept = service.search(SearchRequest("older model mercedes coupe", k=5,
                                        filters=SearchFilters(year_max=2010),
                                        keep_chips=["body=coupe", "year=1991"]))
    assert {c.key for c in kept.chips} == {"body=coupe", "year=1991"}
    assert kept.effective == SearchFilters(body="coupe", year_max=2010)
    assert kept.filters == {"body": ("coupe",), "year_max": 2010}
    assert all(h.year is not None and h.year <= 2010 for h in kept.hits)
    # No parsing: similarity alone, nothing read, nothing relaxed.
    plain = service.search(SearchRequest("older model mercedes coupe", k=5, parse=False))
    assert plain.chips == () and plain.relaxed is None and plain.filters == {}
    assert plain.effective == filters_from_chips(())
    with pytest.raises(QueryError, match="k must be"):
        service.search(SearchRequest("red car", k=0))
    with pytest.raises(QueryError, match="empty query"):
        service.search(SearchRequest("   "))


def test_the_vocabulary_is_read_once_per_ttl_and_read_again_when_cleared(
        service: SearchService, indexed, monkeypatch: pytest.MonkeyPatch) -> None:
    """The service reads the text against a cached vocabulary (distinct values over every
    image row, a scan at scale): once per ``search_vocabulary_ttl_s``, again at once after
    ``invalidate`` (what a label given on the page does); TTL 0 reads it per query."""
    from carsearch.platform.search import nlfilters
    from carsearch.platform.search.nlfilters import VocabularyCache
    from carsearch.platform.search.service import SearchRequest

    reads: list[int] = []
    real = nlfilters.load_vocabulary

    def counted(db: Database) -> nlfilters.FilterVocabulary:
        reads.append(1)
        return real(db)

    monkeypatch.setattr(nlfilters, "load_vocabulary", counted)
    service.vocabulary.invalidate()
    for _ in range(3):
        res = service.search(SearchRequest("red chevy pickup", k=3))
        assert "make=Chevrolet" in {c.key for c in res.chips}
    assert len(reads) == 1
    # A make the cached vocabulary does not hold yet is plain text until the cache clears.
    with service.db.session() as s:
        row = s.scalars(select(ImageRow).where(ImageRow.make == "Jeep")).one()
        row.make = "Zephyr"
    assert "make=Zephyr" not in {c.key for c in service.search(
        SearchRequest("zephyr suv", k=3)).chips}
    service.vocabulary.invalidate()
    assert "make=Zephyr" in {c.key for c in service.search(
        SearchRequest("zephyr suv", k=3)).chips}
    assert len(reads) == 2
    service.vocabulary = VocabularyCache(service.db, ttl_s=0.0)
    service.search(SearchRequest("red chevy pickup", k=3))
    service.search(SearchRequest("red chevy pickup", k=3))
    assert len(reads) == 4
