"""The search page's controls beyond the query, at the handler level (the functions the
Blocks wire, called as Gradio calls them, over the page tests' real world): exclusion
chips read from "not ..." and unticked, sort, folded duplicates, "more results" through
the cursor, thumbs that re-rank at once, and an image with a "...but" text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carsearch.platform.runtime import Platform
from carsearch.platform.search.service import SearchHit
from carsearch.ui.app import PageHandlers, _controls, build_app
from carsearch.ui.page import SearchControls, SearchPage, caption
from ui_world import CARS, World, build_world

F = ([], [], [], [], "any", "any", None, None)  # no filters, default collection, no cut
N = len(CARS)
# The outputs of a search handler: gallery, status, hits, query log id, selected, detail,
# cursor, exclusions read, items shown (and, for a new search, the chips).
GALLERY, STATUS, HITS, QLOG, _SEL, _DET, CURSOR, READ, SHOWN = range(9)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, compact_model: Path) -> World:
    return build_world(tmp_path_factory.mktemp("controls-world"), compact_model)


@pytest.fixture(scope="module")
def h(world: World) -> Iterator[PageHandlers]:
    platform = Platform(world.settings)
    page = SearchPage(platform)
    page.warm_up()
    yield PageHandlers(page)
    platform.close()


def _ids(out: tuple[Any, ...]) -> list[int]:
    return [int(hit["image_id"]) for hit in out[HITS]]


def test_the_page_wires_the_controls(h: PageHandlers) -> None:
    info = build_app(h.page).get_api_info()["named_endpoints"]
    assert {"/search_controlled", "/more_results"} <= set(info)
    for name in ("/image_search", "/more_like_this"):
        assert info[name]["parameters"][-1]["parameter_name"] == "text"
    assert len(info["/search"]["returns"]) == 5  # the states do not change the API


def test_exclusion_chips_can_be_unticked(h: PageHandlers) -> None:
    out = h.search("pickup not red", N, *F)
    assert out[READ] == [("colour: not red", "colour!=red")] or [
        key for _label, key in out[READ]] == ["colour!=red"]
    assert all(hit["colour"] != "red" for hit in out[HITS])
    assert "excluding" in out[STATUS]
    shown = h.show_exclusions(out[READ])
    assert shown["value"] == ["colour!=red"] and shown["visible"] is True
    chips = out[-1]["value"]
    kept = h.controlled("pickup not red", chips, ["colour!=red"], out[READ], "score", False,
                        [], [], N, *F)
    assert _ids(kept) == _ids(out)  # still ticked: the same search
    allowed = h.controlled("pickup not red", chips, [], out[READ], "score", False, [], [],
                           N, *F)
    assert any(hit["colour"] == "red" for hit in allowed[HITS])
    assert "excluding" not in allowed[STATUS]


def test_sort_and_folding(h: PageHandlers) -> None:
    out = h.controlled("a car", [], [], [], "year", False, [], [], N, *F)
    years = [hit["year"] for hit in out[HITS]]
    assert len(years) == N and years == sorted(years, reverse=True)
    folded = h.controlled("a car", [], [], [], "score", True, [], [], N, *F)
    assert all(hit["duplicates"] == len(hit["duplicate_ids"]) for hit in folded[HITS])
    bad = h.controlled("a car", [], [], [], "price'; --", "yes", "x", None, N, *F)
    assert len(bad[HITS]) == N  # odd widget values fall back to the plain search


def test_more_results_adds_the_next_page(h: PageHandlers) -> None:
    first = h.search("a car", 3, *F)
    assert first[CURSOR]
    args = ("a car", [], [], [], "score", False, [], [])
    items, status, hits, _q, cursor, shown = h.more_results(
        *args, first[CURSOR], first[SHOWN], first[HITS], 3, *F)
    assert len(items) == len(hits) == 6 and shown == items, status
    assert len({hit["image_id"] for hit in hits}) == 6  # page 2 repeats nothing of page 1
    assert status.startswith("6 results shown")
    while cursor:
        items, status, hits, _q, cursor, shown = h.more_results(
            *args, cursor, shown, hits, 3, *F)
    assert len({hit["image_id"] for hit in hits}) == len(hits) == N
    items, status, *_ = h.more_results(*args, None, shown, hits, 3, *F)
    assert "No more results" in status and len(items) == N
    # With chips read from the query, all still ticked: the cursor of the new search.
    q = "red 2012 chevy pickup"
    out = h.search(q, 3, *F)
    chips = out[-1]["value"]
    nxt = h.more_results(q, chips, [], [], "score", False, [], [], out[CURSOR], out[SHOWN],
                         out[HITS], 3, *F)
    assert len({hit["image_id"] for hit in nxt[2]}) == 6, nxt[1]


def test_thumbs_re_rank_at_once(h: PageHandlers) -> None:
    out = h.search("a car", N, *F)
    last = _ids(out)[-1]
    rerank = h.rerank(1)
    after = rerank(str(last), [], [], "a car", [], [], [], "score", False, N, *F)
    liked, disliked = after[-2], after[-1]
    assert liked == [last] and disliked == []
    assert _ids(after[:-2]).index(last) < N - 1  # the liked hit rose
    down = h.rerank(-1)(str(last), liked, disliked, "a car", [], [], [], "score", False,
                        N, *F)
    assert down[-2] == [] and down[-1] == [last]  # a changed mind moves it across
    none = rerank("", [], [], "a car", [], [], [], "score", False, N, *F)
    assert none[-2:] == ([], [])  # nothing selected: nothing re-ranked


def test_an_image_with_a_but_text(h: PageHandlers, world: World) -> None:
    hits = h.search("red chevy pickup", N, *F)[HITS]
    red = next(hit for hit in hits if hit["colour"] == "red" and hit["make"] == "Chevrolet")
    out = h.more_like_this(str(red["image_id"]), 3, *F, "but blue")
    assert out[HITS][0]["colour"] == "blue"
    plain = h.more_like_this(str(red["image_id"]), 3, *F, "")
    assert plain[HITS][0]["image_id"] == red["image_id"]  # no text: more like this
    up = h.image_search(str(world.photos[1]), 3, *F, "but red")
    assert up[HITS] and "Error" not in up[STATUS]
    bad = h.more_like_this("", 3, *F, "but blue")
    assert bad[STATUS].startswith("**Error:**") and "select a result" in bad[STATUS]


def test_the_diversity_slider(h: PageHandlers) -> None:
    """The slider's value goes with the new search, the controls and the next page; with
    another order chosen it is off rather than an error."""
    plain = h.search("a car", 3, *F)
    diverse = h.search("a car", 3, *F, 1.0)
    assert len(diverse[HITS]) == 3 and "Error" not in diverse[STATUS]
    assert _ids(diverse)[0] == _ids(plain)[0]  # the best match stays first
    args = ("a car", [], [], [], "score", False, [], [])
    _items, status, hits, *_ = h.more_results(
        *args, diverse[CURSOR], diverse[SHOWN], diverse[HITS], 3, *F, 1.0)
    assert len({hit["image_id"] for hit in hits}) == 6, status
    by_year = h.controlled("a car", [], [], [], "year", False, [], [], N, *F, 0.7)
    assert len(by_year[HITS]) == N and "Error" not in by_year[STATUS]
    for odd in ("x", True, -1, 7, None):
        assert len(h.controlled(*args, 3, *F, odd)[HITS]) == 3


def test_controls_from_widget_values() -> None:
    read = [("colour: not red", "colour!=red"), ("make: not Ford", "make!=Ford")]
    c = _controls(["make!=Ford"], read, "arrival", True, [3, "x", True, 4], None)
    assert c == SearchControls(drop_exclusions=("colour!=red",), sort="arrival",
                               collapse_duplicates=True, liked=(3, 4), disliked=())
    assert _controls(None, None, None, None, None, None).is_plain()
    hit = SearchHit(rank=1, score=0.5, image_id=1, path="/x", duplicates=2,
                    duplicate_ids=(5, 6))
    assert "· +2 duplicates ·" in caption(hit)
