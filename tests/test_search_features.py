"""Search features beyond a plain query, through the one search service, in every shape
(Milvus Lite's own search, the mirror, a Milvus server; SQLite and PostgreSQL):
exclusions read from the text or given, negated terms, image + text, cursors (also with an
ingest between two pages), folded near-duplicates, in-session feedback and the orders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from carsearch.cli.search import duplicates_command, search_command
from carsearch.ingest.pipeline import BatchWriter, ingest_items, read_manifest
from carsearch.platform.db import QueryFeedback
from carsearch.platform.errors import QueryError
from carsearch.platform.search.duplicates import find_duplicates
from carsearch.platform.search.service import SearchRequest, SearchService
from carsearch.platform.vectors.filters import SearchFilters, build_filter_expression
from carsearch.platform.vehicles import body_category
from fixtures.search_world import LABELS, _draw
from ui_world import build_world

# LABELS and the `service` / `indexed` fixtures: tests/fixtures/search_world.py
N = len(LABELS)


def _ingest(service: SearchService, version, tmp_path: Path, items: list[dict]) -> None:
    manifest = tmp_path / f"more{len(list(tmp_path.glob('more*.jsonl')))}.jsonl"
    manifest.write_text("".join(json.dumps(i) + "\n" for i in items))
    writer = BatchWriter.fixed(service.db, service.store, service.encoder_for(version), version)
    summary = ingest_items(list(read_manifest(manifest)), db=service.db, writer=writer,
                           max_pixels=10**7, batch_size=8, progress=False)
    assert summary.indexed == len(items)


def _id_of(service: SearchService, class_name: str) -> int:
    res = service.search(SearchRequest("vehicle", k=N, parse=False))
    return next(h.image_id for h in res.hits if h.class_name == class_name)


def test_exclusions_read_from_the_text_are_never_relaxed(service: SearchService,
                                                         indexed) -> None:
    res = service.search(SearchRequest("pickup not red", k=N))
    assert [c.key for c in res.chips] == ["body=pickup"]
    assert [c.key for c in res.exclusions] == ["colour!=red"]
    # The page is filled by relaxing "pickup", never "not red": five of six vehicles.
    assert len(res.hits) == N - 1 and all(h.colour != "red" for h in res.hits)
    assert res.hits[0].make == "Ford"  # the one pickup that is not red comes first
    assert res.filters["exclude"]["colour"] == ("red",)
    for query, ok in [("no pickups", lambda h: body_category(h.body_type) != "pickup"),
                      ("suv but not black", lambda h: h.colour != "black"),
                      ("except Ford", lambda h: h.make != "Ford"),
                      ("not 2012 or 2007", lambda h: h.year == 1991)]:
        got = service.search(SearchRequest(query, k=N))
        assert got.hits and all(ok(h) for h in got.hits), (query, got.hits)
    assert len(service.search(SearchRequest("not 2012 or 2007", k=N)).hits) == 1
    # Unticked on the page: the exclusion goes.
    back = service.search(SearchRequest("pickup not red", k=N,
                                        drop_exclusions=["colour!=red"]))
    assert back.exclusions == () and any(h.colour == "red" for h in back.hits)
    with pytest.raises(QueryError, match=r"contradictory.*colour red"):
        service.search(SearchRequest("red 2012 chevy pickup not red", k=5))


def test_the_persons_exclusions_and_negated_terms(service: SearchService, indexed) -> None:
    res = service.search(SearchRequest("vehicle", k=N, exclude=SearchFilters(
        make=("BMW", "O'Brien & Sons"), year_min=1990, year_max=2000)))
    assert {h.make for h in res.hits} == {"Chevrolet", "Ford", "Mercedes-Benz", "Jeep"}
    with pytest.raises(QueryError, match="contradictory"):
        service.search(SearchRequest("vehicle", filters=SearchFilters(make="BMW"),
                                     exclude=SearchFilters(make="BMW")))
    with pytest.raises(QueryError, match="contradictory"):
        service.search(SearchRequest("pickup", exclude=SearchFilters(body="pickup")))
    # A negated concept with no facet is subtracted from the query vector.
    plain = service.search(SearchRequest("sedan", k=N))
    neg = service.search(SearchRequest("sedan no roof rack", k=N))
    assert neg.negative_terms == ("roof rack",) and plain.negative_terms == ()
    assert [c.key for c in neg.chips] == ["body=sedan"]
    assert [h.score for h in neg.hits] != [h.score for h in plain.hits]


def test_exclusion_values_are_quoted_in_the_expression() -> None:
    f = SearchFilters(body="pickup", exclude=SearchFilters(
        make=("O'Brien", "Ford"), year_min=2005, year_max=2009))
    assert build_filter_expression(f) == (
        'body in ["pickup"] and make not in ["O\'Brien", "Ford"] and '
        "(year < 2005 or year > 2009)")
    with pytest.raises(ValueError):
        SearchFilters(exclude=SearchFilters(colour='red"] or make in ["x'))


def test_image_and_text(service: SearchService, indexed, tmp_path: Path) -> None:
    red_pickup = _id_of(service, LABELS[0][0])
    # "like this but blue" from the red pickup: blue pickups first.
    res = service.search(SearchRequest("like this but blue", k=3, image_id=red_pickup))
    # The image's own body type comes along, relaxed first ("like this").
    assert res.kind == "image" and [c.key for c in res.chips] == ["colour=blue", "body=pickup"]
    assert [c.inferred for c in res.chips] == [False, True]
    assert (res.hits[0].colour, body_category(res.hits[0].body_type)) == ("blue", "pickup")
    # The image alone: itself first; an upload with words mixed in.
    alone = service.search(SearchRequest(None, k=2, image_id=red_pickup))
    assert alone.hits[0].image_id == red_pickup
    up = Image.open(tmp_path / "car2.png")
    mixed = service.search(SearchRequest("with a spoiler", k=N, image=up, image_weight=0.2))
    only = service.search(SearchRequest("", k=N, image=up))
    assert only.hits[0].class_name == LABELS[2][0]
    assert [h.score for h in mixed.hits] != [h.score for h in only.hits]
    for bad in (-0.1, 1.5, "x", True):
        with pytest.raises(QueryError, match="image_weight"):
            service.search(SearchRequest("blue", image_id=red_pickup, image_weight=bad))
    with pytest.raises(QueryError, match="no image with id"):
        service.search(SearchRequest("blue", image_id=12345))


def test_pages_never_repeat_a_hit(service: SearchService, indexed) -> None:
    seen: list[int] = []
    cursor = None
    for _ in range(N):
        res = service.search(SearchRequest("vehicle", k=2, cursor=cursor))
        assert [h.rank for h in res.hits] == [len(seen) + 1, len(seen) + 2][:len(res.hits)]
        seen += [h.image_id for h in res.hits]
        cursor = res.next_cursor
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == N
    first = service.search(SearchRequest("vehicle", k=2))
    with pytest.raises(QueryError, match="another query"):
        service.search(SearchRequest("pickup", k=2, cursor=first.next_cursor))
    for junk in ("x", "!!!", first.next_cursor[:-3] + "AAA", "A" * 10**6):
        with pytest.raises(QueryError, match="cursor"):
            service.search(SearchRequest("vehicle", k=2, cursor=junk))
    # The setting bounds how far a query pages.
    service.settings.search_max_results = 3
    two = service.search(SearchRequest("vehicle", k=2))
    last = service.search(SearchRequest("vehicle", k=2, cursor=two.next_cursor))
    assert len(last.hits) == 1 and last.next_cursor is None


def test_page_two_of_a_100_result_query_while_the_worker_ingests(
        service: SearchService, indexed, tmp_path: Path) -> None:
    """Page 1 of 100, then an ingest of near-copies of page 1's images (which rank where
    page 1's did), then page 2: no hit of page 1 comes back; the new images do."""
    _ingest(service, indexed, tmp_path, [
        {"path": str(_drawn(tmp_path, f"bulk{i}.png", 100 + i)), "class_name": LABELS[i % N][0]}
        for i in range(150)])
    page1 = service.search(SearchRequest("vehicle", k=100, parse=False))
    assert len(page1.hits) == 100 and page1.next_cursor
    shown = {h.image_id for h in page1.hits}
    copies = []
    for n, h in enumerate(page1.hits[:20]):
        img = Image.open(h.path).convert("RGB")
        img.putpixel((0, 0), (n, 255 - n, 7))
        path = tmp_path / f"copy{n}.png"
        img.save(path)
        copies.append({"path": str(path), "class_name": h.class_name})
    _ingest(service, indexed, tmp_path, copies)  # between page 1 and page 2
    page2 = service.search(SearchRequest("vehicle", k=100, parse=False,
                                         cursor=page1.next_cursor))
    ids2 = [h.image_id for h in page2.hits]
    assert not shown & set(ids2) and len(ids2) == len(set(ids2))
    assert len(ids2) == N + 150 + 20 - 100
    assert [h.rank for h in page2.hits][:1] == [101]


def _drawn(tmp_path: Path, name: str, seed: int) -> Path:
    _draw(tmp_path / name, seed)
    return tmp_path / name


def test_near_duplicates_fold_into_one_hit(service: SearchService, indexed,
                                           tmp_path: Path) -> None:
    img = Image.open(tmp_path / "car2.png").convert("RGB")
    img.putpixel((5, 5), (1, 2, 3))  # other bytes, the same picture
    img.save(tmp_path / "car2-copy.png")
    _ingest(service, indexed, tmp_path, [{"path": "car2-copy.png", "class_name": LABELS[2][0],
                                          "colour": "black"}])
    bmw = service.search(SearchRequest("vehicle", k=N + 1, parse=False))
    assert len(bmw.hits) == N + 1
    res = service.search(SearchRequest("vehicle", k=N + 1, parse=False,
                                       collapse_duplicates=True))
    assert len(res.hits) == N
    folded = [h for h in res.hits if h.duplicates]
    assert len(folded) == 1 and folded[0].class_name == LABELS[2][0]
    assert len(folded[0].duplicate_ids) == 1
    assert folded[0].duplicate_ids[0] not in {h.image_id for h in res.hits}
    groups = find_duplicates(service.db, service.store, indexed.collection, 0.95)
    assert len(groups) == 1 and groups[0].size == 2
    assert {groups[0].keep, *groups[0].others} == {folded[0].image_id,
                                                   folded[0].duplicate_ids[0]}


def test_feedback_moves_the_ranking_at_once_and_is_stored(service: SearchService,
                                                          indexed) -> None:
    base = service.search(SearchRequest("vehicle", k=N, parse=False))
    last = base.hits[-1].image_id
    first = base.hits[0].image_id
    liked = service.search(SearchRequest("vehicle", k=N, parse=False, liked=[last]))
    assert [h.image_id for h in liked.hits].index(last) < N - 1
    disliked = service.search(SearchRequest("vehicle", k=N, parse=False, disliked=[first]))
    assert first not in [h.image_id for h in disliked.hits]
    with pytest.raises(QueryError, match="both liked and disliked"):
        service.search(SearchRequest("vehicle", liked=[first], disliked=[first]))
    with pytest.raises(QueryError, match="at most"):
        service.search(SearchRequest("vehicle", liked=list(range(1, 100))))
    row = service.record_feedback(liked.query_log_id, last, 1, "ignored")
    with service.db.session() as s:
        fb = s.get(QueryFeedback, row)
        assert (fb.image_id, fb.vote, fb.query) == (last, 1, "vehicle")
        assert len(s.scalars(select(QueryFeedback)).all()) == 1
    with pytest.raises(QueryError, match="vote"):
        service.record_feedback(None, last, 3)


def test_sort_after_the_cut_off(service: SearchService, indexed) -> None:
    by_year = service.search(SearchRequest("vehicle", k=N, parse=False, sort="year"))
    years = [h.year for h in by_year.hits]
    assert years == sorted(years, reverse=True) and len(years) == N
    by_score = service.search(SearchRequest("vehicle", k=N, parse=False))
    assert {h.image_id for h in by_year.hits} == {h.image_id for h in by_score.hits}
    # Relaxed hits stay after the exact ones, each part in its order.
    relaxed = service.search(SearchRequest("pickup", k=N, sort="year"))
    assert {body_category(h.body_type) for h in relaxed.hits[:2]} == {"pickup"}
    assert [h.year for h in relaxed.hits[:2]] == [2012, 2007]
    arrival = service.search(SearchRequest("vehicle", k=2, parse=False, sort="arrival"))
    page2 = service.search(SearchRequest("vehicle", k=N, parse=False, sort="arrival",
                                         cursor=arrival.next_cursor))
    assert len(page2.hits) == N - 2
    assert not {h.image_id for h in arrival.hits} & {h.image_id for h in page2.hits}
    with pytest.raises(QueryError, match="sort"):
        service.search(SearchRequest("vehicle", sort="price"))


def test_diversity_spreads_the_page_over_unlike_hits(service: SearchService, indexed,
                                                    tmp_path: Path) -> None:
    """MMR: two near-copies of one image crowd the top of a search by that image; with
    diversity the page holds one of the three and the others come on later pages."""
    items = []
    for n in (1, 2):
        img = Image.open(tmp_path / "car2.png").convert("RGB")
        img.putpixel((n, n), (n, 2, 3))  # other bytes, the same picture
        img.save(tmp_path / f"car2-copy{n}.png")
        items.append({"path": f"car2-copy{n}.png", "class_name": LABELS[2][0],
                      "colour": "black"})
    _ingest(service, indexed, tmp_path, items)
    source = _id_of(service, LABELS[2][0])
    plain = service.search(SearchRequest(None, k=3, image_id=source))
    group = {h.image_id for h in plain.hits}  # the image and its two copies
    assert len(group) == 3 and all(h.class_name == LABELS[2][0] for h in plain.hits)
    diverse = service.search(SearchRequest(None, k=3, image_id=source, diversity=1.0))
    assert diverse.hits[0].image_id == plain.hits[0].image_id  # the best stays first
    assert len({h.image_id for h in diverse.hits} & group) == 1
    assert len({h.class_name for h in diverse.hits}) == 3
    # Pages still never repeat a hit, and together hold every image.
    seen, cursor = [], None
    while True:
        page = service.search(SearchRequest(None, k=3, image_id=source, diversity=0.5,
                                            cursor=cursor))
        seen += [h.image_id for h in page.hits]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == N + 2
    # A text query, and refusals.
    text = service.search(SearchRequest("vehicle", k=4, parse=False, diversity=0.3))
    assert len(text.hits) == 4 and [h.rank for h in text.hits] == [1, 2, 3, 4]
    with pytest.raises(QueryError, match="does not combine with sort year"):
        service.search(SearchRequest("vehicle", diversity=0.5, sort="year"))
    for bad in (-0.1, 1.5, True, "x", float("nan")):
        with pytest.raises(QueryError, match="diversity"):
            service.search(SearchRequest("vehicle", diversity=bad))


def test_mmr_order() -> None:
    from carsearch.platform.search.querymix import mmr_order

    # Three tight groups; the most relevant three are all in group a.
    rng = np.random.default_rng(0)
    centres = np.eye(3, 16, dtype=np.float32)
    groups = [0, 0, 0, 1, 1, 2]
    vecs = centres[groups] + 0.01 * rng.normal(size=(6, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    rel = np.array([0.9, 0.89, 0.88, 0.7, 0.69, 0.5])
    assert mmr_order(rel, vecs, 3, 0.0) == [0, 1, 2]
    assert mmr_order(rel, vecs, 3, 0.5) == [0, 3, 5]
    assert mmr_order(rel, vecs, 10, 0.5)[:3] == [0, 3, 5]  # k beyond the pool: all
    assert sorted(mmr_order(rel, vecs, 10, 0.5)) == list(range(6))
    # A candidate with no vector (zeros) is never redundant; an empty pool gives nothing.
    vecs[3] = 0.0
    assert mmr_order(rel, vecs, 2, 0.9)[1] == 3
    assert mmr_order(np.array([]), np.empty((0, 16)), 3, 0.5) == []


def test_rocchio_is_bounded() -> None:
    from carsearch.platform.search.querymix import rocchio

    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 8)).astype(np.float32)
    q /= np.linalg.norm(q)
    liked = rng.normal(size=(40, 8)).astype(np.float32)
    out = rocchio(q, liked, np.empty((0, 8), np.float32), (1.0, 0.75, 0.25))
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-5)
    # However many ids: alpha * q dominates beta * (a unit vector), so the cosine to q
    # stays above (1 - 0.75) / 1.75.
    assert (out @ q.T).item() > (1 - 0.75) / 1.75


def test_the_cli_search_options(tmp_path: Path, compact_model: Path) -> None:
    """`carsearch search` with --not, --image-id, --cursor, --sort, --like and
    --collapse-duplicates, and `carsearch duplicates`, over the service (Milvus Lite)."""
    world = build_world(tmp_path, compact_model)
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = world.settings

    app.command("search")(search_command)
    app.command("duplicates")(duplicates_command)

    def cli(*args: str) -> dict:
        res = CliRunner().invoke(app, [*args, "--json"])
        assert res.exit_code == 0, (res.output, res.exception)
        return json.loads(res.stdout)

    out = cli("search", "pickup not red", "--k", "4")
    assert out["exclusions"] == ["colour!=red"] and out["chips"] == ["body=pickup"]
    assert len(out["hits"]) == 4 and all(h["colour"] != "red" for h in out["hits"])
    out = cli("search", "vehicle", "--k", "8", "--not", "make=BMW", "--not", "year=1991-1997")
    assert out["hits"] and all(h["make"] != "BMW" and h["year"] > 1997 for h in out["hits"])
    red = next(h for h in cli("search", "red pickup", "--k", "1")["hits"])
    out = cli("search", "like this but blue", "--image-id", str(red["image_id"]), "--k", "2")
    assert out["hits"][0]["colour"] == "blue" and out["kind"] == "image"
    one = cli("search", "vehicle", "--k", "3", "--sort", "year")
    two = cli("search", "vehicle", "--k", "3", "--sort", "year", "--cursor", one["next_cursor"])
    assert not {h["image_id"] for h in one["hits"]} & {h["image_id"] for h in two["hits"]}
    years = [h["year"] for h in one["hits"] + two["hits"]]
    assert years == sorted(years, reverse=True)
    liked = cli("search", "vehicle", "--k", "8", "--like", str(red["image_id"]),
                "--collapse-duplicates")
    assert liked["hits"]
    diverse = cli("search", "vehicle", "--k", "3", "--diversity", "0.5")
    assert len(diverse["hits"]) == 3 and diverse["next_cursor"]
    bad = CliRunner().invoke(app, ["search", "vehicle", "--diversity", "0.5", "--sort", "year"])
    assert isinstance(bad.exception, QueryError) and "diversity" in str(bad.exception)
    text = CliRunner().invoke(app, ["search", "vehicle", "--k", "2"]).output
    assert "more: --cursor " in text
    bad = CliRunner().invoke(app, ["search", "vehicle", "--not", "price=3"])
    assert isinstance(bad.exception, QueryError) and "FIELD=VALUE" in str(bad.exception)
    report = cli("duplicates")
    assert report["groups"] == len(report["top"]) and report["threshold"] > 0.5
