"""Fuzzed input through the search service, the page's functions and handlers, and the
CLI: random Unicode (unpaired surrogates and NUL included), injection-like strings, odd
k, odd years and filter values, odd image ids. Only the platform's own errors (one-line
messages) may come out; the page handlers must answer every call with a message.

Seeded (derandomised) hypothesis runs, so a failure reproduces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from carsearch.cli.search import duplicates_command, search_command
from carsearch.platform.errors import CarsearchError
from carsearch.platform.runtime import Platform
from carsearch.ui.app import PageHandlers
from carsearch.ui.page import PickedFilters, SearchPage
from ui_world import World, build_world

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

INJECTIONS = ['" or id > 0 or make == "', "make in ['x'] or 1==1", "'; DROP TABLE images; --",
              "\\\\", "%s%s%n", "${jndi:ldap://x}", "../../etc/passwd", "\x00", "\udcff",
              "\ud800abc", "red 2012 chevy pickup", " " * 600, "年式 レッド", "🚗" * 20,
              "not", "no no no", "red not red", "pickup not 2012-2010", "not before 1800",
              "except 1899 or 2099", "not red or", "no pickups but not black except Ford",
              "like this but blue", "non-red non-2012", "other than", "without a"]
any_text = st.one_of(st.text(st.characters(blacklist_categories=()), max_size=80),
                     st.sampled_from(INJECTIONS))
odd_number = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                       st.booleans(), st.none())
odd_value = st.one_of(any_text, odd_number)
odd_list = st.one_of(odd_value, st.lists(odd_value, max_size=4))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, compact_model: Path) -> World:
    return build_world(tmp_path_factory.mktemp("fuzz"), compact_model)


@pytest.fixture(scope="module")
def page(world: World) -> Any:
    platform = Platform(world.settings)
    p = SearchPage(platform)
    p.warm_up()
    yield p
    platform.close()


def _only_platform_errors(call: Any) -> None:
    try:
        call()
    except CarsearchError as exc:
        assert "\n" not in str(exc) and str(exc)


@FUZZ
@given(query=any_text, k=st.one_of(odd_number, st.integers(0, 50)), iid=odd_value)
def test_the_search_service(page: SearchPage, query: Any, k: Any, iid: Any) -> None:
    svc = page.service
    _only_platform_errors(lambda: svc.search_text(query, k))
    _only_platform_errors(lambda: svc.search_similar(iid, 5))
    _only_platform_errors(lambda: svc.search_similar(iid, k))


@FUZZ
@given(query=any_text, k=odd_number, make=odd_list, body=odd_list, colour=odd_list,
       y0=odd_value, y1=odd_value, iid=odd_value, qid=odd_value, vote=odd_number)
def test_the_page_functions(page: SearchPage, query: Any, k: Any, make: Any, body: Any,
                            colour: Any, y0: Any, y1: Any, iid: Any, qid: Any,
                            vote: Any) -> None:
    def tup(v: Any) -> tuple[Any, ...]:
        return tuple(v) if isinstance(v, list) else (() if v is None else (v,))

    picked = PickedFilters(tup(make), tup(body), tup(colour), (), y0, y1)
    _only_platform_errors(lambda: page.search_text(query, k, picked))
    _only_platform_errors(lambda: page.search_text(query, 5, picked, keep_chips=tup(make)))
    _only_platform_errors(lambda: page.more_like_this(iid, k, picked))
    _only_platform_errors(lambda: page.search_upload(query or None, 5, picked))
    _only_platform_errors(lambda: page.feedback(qid, iid, vote, query))


@FUZZ
@given(query=any_text, k=odd_number, make=odd_list, y0=odd_value, iid=odd_value,
       diversity=odd_value)
def test_the_page_handlers_always_answer(page: SearchPage, query: Any, k: Any, make: Any,
                                         y0: Any, iid: Any, diversity: Any) -> None:
    h = PageHandlers(page)
    filters = (make, [], [], [], y0, "any")
    out = h.search(query, k, *filters, None, None, diversity)
    assert isinstance(out[1], str)  # the status line: results or a message
    assert isinstance(h.more_like_this(iid, k, *filters)[1], str)
    assert isinstance(h.refine(query, [str(make)], k, *filters)[1], str)
    assert isinstance(h.vote(1)(iid, iid, query), str)


odd_state_ids = st.one_of(st.none(), st.lists(st.integers(-2, 2**63), max_size=5),
                         st.lists(odd_value, max_size=3))


@pytest.mark.full  # a few searches per example
@FUZZ
@given(query=any_text, chips=st.one_of(st.none(), st.lists(any_text, max_size=3)),
       exclusions=st.one_of(odd_value, st.lists(any_text, max_size=3)),
       read=st.one_of(st.none(), odd_list, st.lists(st.tuples(any_text, any_text), max_size=3)),
       sort=st.one_of(st.sampled_from(["score", "year", "arrival"]), odd_value),
       collapse=odd_value, liked=odd_state_ids, disliked=odd_state_ids, k=odd_number,
       make=odd_list, cursor=st.one_of(st.none(), any_text),
       diversity=st.one_of(st.floats(0, 1), odd_value), text=odd_value, iid=odd_value,
       upload=st.one_of(st.none(), any_text))
def test_the_page_controls_always_answer(
        page: SearchPage, query: Any, chips: Any, exclusions: Any, read: Any, sort: Any,
        collapse: Any, liked: Any, disliked: Any, k: Any, make: Any, cursor: Any,
        diversity: Any, text: Any, iid: Any, upload: Any) -> None:
    """Issue 26's controls on the page (exclusion chips, sort, duplicates, thumbs,
    diversity, the next page, image + text): every call answers with a message, none of
    them an internal error."""
    h = PageHandlers(page)
    filters = (make, [], [], [], None, None, "any", None)
    controls = (query, chips, exclusions, read, sort, collapse, liked, disliked)

    def status(out: tuple[Any, ...]) -> str:
        assert isinstance(out[1], str) and "internal error" not in out[1], out[1]
        return out[1]

    status(h.controlled(*controls, k, *filters, diversity))
    status(h.more_results(*controls, cursor, [], [], k, *filters, diversity))
    status(h.image_search(upload, k, *filters, text))
    status(h.more_like_this(iid, k, *filters, text))
    if all(isinstance(v, list | type(None)) and all(isinstance(i, int) for i in v or [])
           for v in (liked, disliked)):  # the session's State, which only the page writes
        out = h.rerank(1)(iid, liked, disliked, query, chips, exclusions, read, sort,
                          collapse, k, *filters, diversity)
        assert isinstance(out[-1], list) and isinstance(out[-2], list)
        if isinstance(out[1], str):
            status(out)


def _tiny_images() -> list[Any]:
    from PIL import Image

    return [None, Image.new("RGB", (1, 1)), Image.new("P", (40, 30)),
            Image.new("RGBA", (64, 48), (255, 0, 0, 0)), Image.new("I;16", (8, 8))]


odd_ids = st.one_of(odd_value, st.lists(odd_value, max_size=3),
                    st.lists(st.integers(0, 2**63), max_size=60))


@FUZZ
@given(query=st.one_of(any_text, st.none()), k=st.one_of(odd_number, st.integers(0, 30)),
       cursor=st.one_of(st.none(), any_text, odd_number,
                        st.binary(max_size=64).map(lambda b: __import__("base64")
                                                   .urlsafe_b64encode(b).decode())),
       sort=st.one_of(st.sampled_from(["score", "year", "arrival"]), odd_value),
       weight=st.one_of(st.floats(0, 1), odd_value), iid=st.one_of(st.none(), odd_value),
       image=st.sampled_from(range(5)), liked=odd_ids, disliked=odd_ids,
       collapse=st.one_of(st.booleans(), odd_value), ex_make=odd_list,
       ex_other=st.one_of(odd_list, st.sampled_from(["red", "pickup", ["black", "suv"]])),
       ex_year=odd_value, ex_year_max=st.one_of(odd_value, st.integers(1890, 2030)),
       drop=odd_list, page_two=st.booleans(),
       diversity=st.one_of(st.floats(0, 1), odd_value))
def test_the_search_options(page: SearchPage, query: Any, k: Any, cursor: Any, sort: Any,
                            weight: Any, iid: Any, image: int, liked: Any, disliked: Any,
                            collapse: Any, ex_make: Any, ex_other: Any, ex_year: Any,
                            ex_year_max: Any, drop: Any, page_two: bool,
                            diversity: Any) -> None:
    """Exclusions, image + text, cursors, sorts, folding and feedback ids: only the
    platform's one-line errors, whatever they are given."""
    from pydantic import ValidationError

    from carsearch.platform.search.service import SearchRequest
    from carsearch.platform.vectors.filters import SearchFilters

    svc = page.service
    # The adapters build these from what a person sent (a 4xx / a message there): each
    # facet that builds alone is kept, so most runs exclude something.
    kept: dict[str, Any] = {}
    for name, value in (("make", ex_make), ("colour", ex_other), ("body", ex_other),
                        ("year_min", ex_year), ("year_max", ex_year_max)):
        try:
            SearchFilters(**{name: value})
        except (ValidationError, TypeError):
            continue
        kept[name] = value
    try:
        exclude = SearchFilters(**kept) if kept else None
    except (ValidationError, TypeError):
        exclude = None

    def run(cur: Any) -> Any:
        return svc.search(SearchRequest(
            query, k, exclude=exclude, image_id=iid, image=_tiny_images()[image],
            image_weight=weight, cursor=cur, sort=sort, collapse_duplicates=collapse,
            liked=liked, disliked=disliked, drop_exclusions=drop, diversity=diversity))

    _only_platform_errors(lambda: run(cursor))
    if page_two:
        def both() -> None:
            first = run(None)
            if first.next_cursor:
                second = run(first.next_cursor)
                assert not {h.image_id for h in first.hits} & {h.image_id
                                                               for h in second.hits}
        _only_platform_errors(both)


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory: pytest.TempPathFactory, compact_model: Path) -> World:
    """Its own data: each CLI call opens and closes the Lite file, which one process may
    hold once (the page fixture holds the other world's)."""
    return build_world(tmp_path_factory.mktemp("fuzz-cli"), compact_model)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(query=any_text, k=st.integers(-5, 2000), make=any_text, year=st.integers(-5, 10**6))
def test_the_cli(cli_world: World, query: str, k: int, make: str, year: int) -> None:
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = cli_world.settings

    app.command("search")(search_command)
    app.command("duplicates")(duplicates_command)
    args = ["search", query, "--k", str(k), "--make", make, "--year-min", str(year), "--json"]
    if year % 3 == 0:  # the search options beyond text on a third of the runs
        args += ["--not", f"make={make}", "--not", f"year={year}", "--sort", make[:8] or "year",
                 "--cursor", query or "x", "--like", str(year), "--collapse-duplicates"]
    elif year % 3 == 1:  # image + text, thumbs down, diversity on another third
        args += ["--image-id", str(year), "--image-weight", str(k / 100), "--dislike",
                 str(k), "--diversity", str((year % 7) / 5)]
    runs = [args, ["duplicates", "--threshold", str((k % 13) / 10), "--top", str(k),
                   *(["--collection", make] if year % 2 else []), "--json"]]
    for argv in runs:
        res = CliRunner().invoke(app, argv)
        if res.exit_code != 0:
            exc = res.exception
            assert isinstance(exc, CarsearchError | SystemExit), repr(exc)
            if isinstance(exc, CarsearchError):
                assert "\n" not in str(exc)


# -- the JSON API ------------------------------------------------------------------------
API_KEYS = ["query", "k", "cursor", "filters", "exclude", "image_id", "min_prob", "sort",
            "collapse_duplicates", "collection", "liked", "disliked", "keep_chips",
            "drop_exclusions", "image_weight", "diversity", "bogus"]
FILTER_KEYS = ["make", "body", "colour", "source", "year_min", "year_max", "exclude", "x"]
odd_filters = st.one_of(odd_value, st.dictionaries(st.sampled_from(FILTER_KEYS), odd_list,
                                                   max_size=4))
api_body = st.one_of(
    st.dictionaries(st.sampled_from(API_KEYS), st.one_of(odd_list, odd_filters), max_size=6),
    odd_list)


@pytest.fixture(scope="module")
def api_http(page: SearchPage) -> Any:
    from starlette.testclient import TestClient

    from fixtures.api import api_app

    with TestClient(api_app(page), raise_server_exceptions=False) as tc:
        yield tc


def _json_answer(r: Any) -> None:
    """Any answer but a crash: 2xx, or a refusal that is JSON with a request id."""
    assert r.status_code in (200, 400, 404, 405, 413, 422, 429), (r.status_code, r.text)
    if r.status_code >= 400:
        body = r.json()
        assert body["request_id"] == r.headers["x-request-id"]
        assert isinstance(body["detail"], str) and "\n" not in body["detail"]


feedback_body = st.dictionaries(st.sampled_from(["image_id", "vote", "query_log_id", "query",
                                                "x"]),
                                st.one_of(odd_value, st.integers(-2, 3)), max_size=4)


@FUZZ
@given(body=api_body, options=any_text, blob=st.binary(max_size=200), path=any_text,
       fb=feedback_body)
def test_the_json_api_answers_every_input(api_http: Any, body: Any, options: str,
                                          blob: bytes, path: str, fb: Any) -> None:
    import json as _json

    try:
        content = _json.dumps(body)
    except ValueError:  # NaN and friends: sent as Python writes them, not strict JSON
        content = repr(body)
    _json_answer(api_http.post("/api/v1/search", content=content.encode("utf-8", "replace"),
                               headers={"content-type": "application/json"}))
    _json_answer(api_http.post("/api/v1/search/image",
                               files={"image": ("x.png", blob)},
                               data={"options": options.encode("utf-8", "replace")}))
    opts = _json.dumps(body) if isinstance(body, dict) and "image_id" not in body else "{}"
    _json_answer(api_http.post("/api/v1/search/image", files={"image": ("x.png", blob)},
                               data={"options": opts}))
    feedback = fb if isinstance(body, dict) else {"image_id": 1, "vote": 1,
                                                  "query": str(body)}
    _json_answer(api_http.post("/api/v1/feedback", content=_json.dumps(feedback),
                               headers={"content-type": "application/json"}))
    from urllib.parse import quote

    image = quote(path.encode("utf-8", "replace"), safe="")
    _json_answer(api_http.get("/api/v1/images/" + image))
    _json_answer(api_http.get(f"/api/v1/images/{image}/thumbnail"))


@pytest.mark.full  # a search or two per example
@FUZZ
@given(query=st.one_of(any_text, st.none()),
       opts=st.dictionaries(st.sampled_from(API_KEYS), st.one_of(odd_list, odd_filters),
                            max_size=4),
       name=any_text, ctype=any_text, blob=st.binary(max_size=200))
def test_the_client_sends_whatever_it_is_given(api_http: Any, query: Any, opts: Any,
                                               name: str, ctype: str, blob: bytes) -> None:
    """`carsearch.client` with odd options refuses them before sending (pydantic) or
    gets the server's one-line refusal; the multipart body it writes itself reaches the
    server whole, whatever the file's name and type."""
    from pydantic import ValidationError

    from carsearch.client import ApiError, Client
    from carsearch.client.http import multipart

    api = Client(http=api_http)
    opts.pop("query", None)
    image_opts = {key: v for key, v in opts.items() if key != "image_id"}
    for call in (lambda: api.search(query, **opts),
                 lambda: api.search_image(blob, query, **image_opts)):
        try:
            call()
        except ApiError as exc:
            assert 400 <= exc.status < 500 and exc.request_id and "\n" not in exc.detail
        except ValidationError:
            pass  # refused before it was sent
    body, content_type = multipart({"options": "{}"}, {"image": (name, blob, ctype)})
    _json_answer(api_http.post("/api/v1/search/image", content=body,
                               headers={"content-type": content_type}))
