"""The JSON API under /api/v1, driven by `carsearch.client`.

In process: the API app behind the page's `RequestGate`, over the real world of the page
tests (a compact model promoted through the Registry, drawn vehicles ingested into
Milvus Lite + SQLite), through httpx (Starlette's TestClient). Both deployment shapes
(Lite + SQLite, Milvus server + PostgreSQL) for search, image search and feedback. And
the real `carsearch serve` in a subprocess with a login: unauthenticated requests are
refused, the client logs in as the page does.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from starlette.testclient import TestClient

from carsearch.client import ApiError, Client
from carsearch.client.http import _dropped
from carsearch.client.models import Chip, Hit, SearchResponse
from carsearch.ingest.pipeline import BatchWriter, IngestItem, ingest_items
from carsearch.platform.db import QueryFeedback
from carsearch.platform.runtime import Platform
from carsearch.ui.guard import ClientLimits
from carsearch.ui.page import PickedFilters, SearchPage
from fixtures.api import api_app
from fixtures.pages import AUTH, log_since
from shapes import shape as _shape
from ui_world import CARS, Server, World, build_world, draw_car

shape = _shape


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, compact_model: Path) -> World:
    return build_world(tmp_path_factory.mktemp("api-world"), compact_model)


@pytest.fixture(scope="module")
def page(world: World) -> Iterator[SearchPage]:
    platform = Platform(world.settings)
    p = SearchPage(platform)
    p.warm_up()
    yield p
    platform.close()


@pytest.fixture(scope="module")
def http(page: SearchPage) -> Iterator[TestClient]:
    with TestClient(api_app(page), raise_server_exceptions=False) as tc:
        yield tc


@pytest.fixture(scope="module")
def api(http: TestClient) -> Client:
    return Client(http=http)


def _error(r: Any, status: int) -> dict[str, Any]:
    """An error answer: the status, JSON with one line and the request id of the header."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "request_id"} and "\n" not in body["detail"]
    assert body["request_id"] == r.headers["x-request-id"] and len(body["request_id"]) == 12
    assert "Traceback" not in r.text
    return body


def test_text_search_reads_filters_and_relaxes_as_the_page_does(
        api: Client, page: SearchPage) -> None:
    res = api.search("red 2012 chevy pickup", k=8)
    assert res.version == "base" and res.collection == "vehicles" and res.kind == "text"
    assert {c.key for c in res.chips} == {"colour=red", "year=2012", "make=Chevrolet",
                                          "body=pickup"}
    assert len(res.hits) == 8 and res.hits[0].class_name and "Silverado" in (
        res.hits[0].class_name)
    assert res.hits[0].unmet == [] and all(h.unmet for h in res.hits[1:])
    assert res.relaxed_note and res.relaxed_note.startswith("only 1 red Chevrolet pickup")
    assert sum(t.hits for t in res.relaxed) == 7 and res.query_log_id is not None
    assert res.filters["make"] == ["Chevrolet"]
    # The page's own path gives the same hits: one service behind both.
    shown = page.search_text("red 2012 chevy pickup", 8, PickedFilters())
    assert [h["image_id"] for h in shown.hits] == [h.image_id for h in res.hits]
    assert "path" not in res.hits[0].model_dump()  # no server file system in answers


def test_filters_and_the_probability_cut_off(api: Client) -> None:
    res = api.search("a car", k=8, filters={"make": ["BMW"]})
    assert res.hits and {h.make for h in res.hits} == {"BMW"}
    every = api.search("a car", k=8)
    probs = sorted((h.probability or 0.0 for h in every.hits), reverse=True)
    gap = next(i for i in range(7) if probs[i] > probs[i + 1])
    cut = (probs[gap] + probs[gap + 1]) / 2
    kept = api.search("a car", k=8, min_prob=cut)
    assert len(kept.hits) == gap + 1 and kept.filters["min_prob"] == pytest.approx(cut)


def test_image_by_id_upload_and_thumbnail(api: Client, world: World) -> None:
    first = api.search("black bmw coupe", k=3).hits[0]
    similar = api.search(image_id=first.image_id, k=3)
    assert similar.kind == "image" and similar.hits[0].image_id == first.image_id
    assert similar.hits[0].score > 0.99
    uploaded = api.search_image(world.photos[2], k=3)
    assert uploaded.hits[0].class_name == CARS[2][0] and uploaded.hits[0].score > 0.99
    thumb = api.thumbnail(first.image_id)
    assert thumb[:3] == b"\xff\xd8\xff"
    info = api.image(first.image_id)
    assert (info.id, info.make, info.status) == (first.image_id, "BMW", "indexed")
    assert info.thumbnail_url == first.thumbnail_url == (
        f"/api/v1/images/{first.image_id}/thumbnail")


def test_feedback_is_stored_against_the_query(api: Client, page: SearchPage) -> None:
    res = api.search("white convertible", k=4)
    row = api.feedback(res.hits[0].image_id, -1, query_log_id=res.query_log_id)
    with page.platform.db.session() as s:
        fb = s.get(QueryFeedback, row.id)
        assert fb is not None
        assert (fb.image_id, fb.vote, fb.query_log_id, fb.query) == (
            res.hits[0].image_id, -1, res.query_log_id, "white convertible")


def test_negation_pages_sort_duplicates_feedback_and_image_text(api: Client) -> None:
    """The search features through the API: the same service's behaviour, as JSON."""
    n = len(CARS)
    res = api.search("pickup not red", k=n)
    assert [c.key for c in res.exclusions] == ["colour!=red"]
    assert res.hits and all(h.colour != "red" for h in res.hits)
    assert res.filters["exclude"]["colour"] == ["red"]
    back = api.search("pickup not red", k=n, drop_exclusions=["colour!=red"])
    assert any(h.colour == "red" for h in back.hits) and back.exclusions == []
    with pytest.raises(ApiError) as err:
        api.search("red 2012 chevy pickup not red")
    assert err.value.status == 400 and "red" in err.value.detail
    # Pages: the second never repeats the first; the last has no cursor.
    first = api.search("a car", k=3)
    assert first.next_cursor
    second = api.more(first, "a car", k=3)
    assert second is not None and second.hits
    assert not {h.image_id for h in first.hits} & {h.image_id for h in second.hits}
    seen, page = [h.image_id for h in first.hits], second
    while page is not None:
        seen += [h.image_id for h in page.hits]
        page = api.more(page, "a car", k=3)
    assert len(seen) == len(set(seen)) == n
    # Sort by model year (newest first) among what passed.
    years = [h.year for h in api.search("a car", k=n, sort="year").hits]
    assert years == sorted(years, reverse=True)
    # Folding duplicates (none among distinct drawings): counts are there, all zero.
    folded = api.search("a car", k=n, collapse_duplicates=True)
    assert all(h.duplicates == len(h.duplicate_ids) for h in folded.hits)
    # Thumbs in the session move the ranking: the liked hit rises.
    plain = api.search("a car", k=n)
    last = plain.hits[-1].image_id
    moved = api.search("a car", k=n, liked=[last], disliked=[plain.hits[0].image_id])
    assert [h.image_id for h in moved.hits].index(last) < n - 1
    # Diversity: the best match first, then hits unlike it; pages still never repeat.
    diverse = api.search("a car", k=3, diversity=0.9)
    assert diverse.hits[0].image_id == first.hits[0].image_id and diverse.next_cursor
    rest = api.more(diverse, "a car", k=n, diversity=0.9)
    assert rest is not None and len({h.image_id for h in diverse.hits + rest.hits}) == n
    # Image + text: the red pickup "but blue" puts the blue pickup first.
    red = next(h for h in api.search("red chevy pickup", k=n).hits if h.colour == "red"
               and h.make == "Chevrolet")
    blue = api.search("but blue", image_id=red.image_id, k=3)
    assert blue.hits[0].colour == "blue" and blue.kind != "text"


def test_the_answer_is_the_response_model_field_for_field(http: TestClient) -> None:
    """The answer is built as plain values (no model on the hot path): it has exactly
    `SearchResponse`'s and `Hit`'s fields, and they validate against the models."""
    r = http.post("/api/v1/search", json={"query": "pickup not red", "k": 4,
                                         "collapse_duplicates": True})
    body = r.json()
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert list(body) == list(SearchResponse.model_fields)
    assert body["hits"] and all(list(h) == list(Hit.model_fields) for h in body["hits"])
    assert set(body["exclusions"][0]) == set(Chip.model_fields)
    parsed = SearchResponse.model_validate(body)
    assert parsed.model_dump(mode="json") == body
    assert all(h.thumbnail_url == f"/api/v1/images/{h.image_id}/thumbnail"
               for h in parsed.hits)


def test_health_and_the_openapi_document(api: Client) -> None:
    h = api.health()
    assert (h.status, h.version, h.collection, h.api) == ("ok", "base", "vehicles", "v1")
    doc = api.openapi()
    assert {"/search", "/search/image", "/feedback", "/images/{image_id}",
            "/health"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    assert {"SearchQuery", "SearchResponse", "Hit", "Feedback", "ErrorBody"} <= set(schemas)
    assert schemas["SearchQuery"]["properties"]["k"]["maximum"] == 1000


@pytest.mark.parametrize(("body", "status", "expected"), [
    ({"query": "   "}, 400, "empty query"),
    ({"query": "red chevy " * 1000}, 400, "query too long"),
    ({"query": "a car", "filters": {"make": ["Zonda"]}}, 400, "filter: unknown make 'Zonda'"),
    ({"query": "a car", "exclude": {"colour": "plaid"}}, 400, "exclude: unknown colour"),
    ({"query": "a car", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ({"query": "a car", "k": True}, 422, "k: Input should be a valid integer"),
    ({"query": "a car", "kk": 3}, 422, "kk: Extra inputs are not permitted"),
    ({"query": "a car", "sort": "price"}, 422, "sort: Input should be"),
    ({"query": "a car", "min_prob": 2}, 422, "min_prob"),
    ({"query": "a car", "diversity": 1.5}, 422, "diversity: Input should be less than"),
    ({"query": "a car", "diversity": 0.5, "sort": "year"}, 400, "diversity"),
    ({"query": "a car", "collection": "Nope!"}, 400, "unusable collection name"),
    ({"image_id": 12345}, 400, "no image with id 12345"),
    ({"image_id": -1}, 400, "not an image id"),
    ({}, 400, "give a query, an image_id, or both"),
    ("not json", 422, "JSON"),
    (["a", "list"], 422, "Input should be a valid dictionary"),
])
def test_bad_input_is_a_json_error_with_a_request_id(
        http: TestClient, body: Any, status: int, expected: str) -> None:
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = http.post("/api/v1/search", **kw, headers={"content-type": "application/json"})
    assert expected in _error(r, status)["detail"]


def test_other_errors_are_json_too(http: TestClient, tmp_path: Path) -> None:
    assert "no image with id 99" in _error(http.get("/api/v1/images/99"), 404)["detail"]
    _error(http.get("/api/v1/images/abc"), 422)
    _error(http.get("/api/v1/nowhere"), 404)
    _error(http.get("/api/v1/search"), 405)
    r = http.post("/api/v1/search/image", files={"image": ("x.png", b"not a picture")})
    assert "upload rejected" in _error(r, 400)["detail"]
    png = io.BytesIO()
    PILImage.new("RGB", (8, 8)).save(png, format="PNG")
    r = http.post("/api/v1/search/image", files={"image": ("x.png", png.getvalue())},
                  data={"options": "{not json"})
    assert _error(r, 400)["detail"] == "options: not JSON"
    r = http.post("/api/v1/search/image", files={"image": ("x.png", png.getvalue())},
                  data={"options": '{"k": 5000}'})
    assert "options: k: Input should be less than or equal to 1000" in _error(r, 400)["detail"]
    r = http.post("/api/v1/feedback", json={"image_id": 1, "vote": 2})
    assert "vote" in _error(r, 422)["detail"]


def test_an_unexpected_failure_shows_only_a_request_id(
        page: SearchPage, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("secret detail of the server")

    monkeypatch.setattr(page.service, "search", broken)
    with TestClient(api_app(page), raise_server_exceptions=False) as tc:
        r = tc.post("/api/v1/search", json={"query": "a car"})
    body = _error(r, 500)
    assert body["detail"] == f"internal error (request id {body['request_id']})"
    assert "secret" not in r.text
    logged = [rec for rec in caplog.records if body["request_id"] in rec.getMessage()]
    assert logged and logged[0].exc_info is not None  # the trace is in the log


def test_the_search_rate_limit_applies(page: SearchPage) -> None:
    limits = ClientLimits(0.001, 2, 4)  # two searches, then one a quarter-hour
    with TestClient(api_app(page, limits), raise_server_exceptions=False) as tc:
        client = Client(http=tc)
        client.search("a car", k=2)
        client.search_image(page.thumbs.missing(), k=2)
        with pytest.raises(ApiError) as err:
            client.search("a car", k=2)
        assert err.value.status == 429 and "too many searches" in err.value.detail
        assert err.value.request_id
        assert client.health().status == "ok"  # only searches spend tokens


def test_an_upload_over_the_cap_is_refused_before_it_is_read(page: SearchPage) -> None:
    with TestClient(api_app(page, max_upload=10_000), raise_server_exceptions=False) as tc:
        r = tc.post("/api/v1/search/image", files={"image": ("big.png", b"x" * 200_000)})
        assert "request too large" in _error(r, 413)["detail"]


# -- both shapes ---------------------------------------------------------------------------
def test_search_image_and_feedback_in_both_shapes(shape: Platform, tmp_path: Path) -> None:
    version = shape.registry.require_serving()
    items = []
    for i, (cls, colour, source) in enumerate(CARS[:4]):
        p = tmp_path / f"car{i}.png"
        draw_car(p, i, {"red": (200, 20, 20), "blue": (20, 40, 200)}.get(colour, (15, 15, 15)))
        items.append(IngestItem(p, source=source, meta={"class_name": cls, "colour": colour}))
    got = ingest_items(items, db=shape.db, writer=BatchWriter.fixed(
        shape.db, shape.store, shape.search.encoder_for(version), version),
        max_pixels=10**7, progress=False)
    assert got.indexed == 4
    page = SearchPage(shape)
    with TestClient(api_app(page), raise_server_exceptions=False) as tc:
        api = Client(http=tc)
        res = api.search("blue ford pickup", k=4)
        assert res.version == "v1" and len(res.hits) == 4
        assert res.hits[0].make == "Ford"
        similar = api.search(image_id=res.hits[0].image_id, k=2)
        assert similar.hits[0].image_id == res.hits[0].image_id
        up = api.search_image(items[2].path, k=1)
        assert up.hits[0].class_name == CARS[2][0]
        fb = api.feedback(res.hits[1].image_id, 1, query_log_id=res.query_log_id)
    with shape.db.session() as s:
        rows = s.scalars(select(QueryFeedback)).all()
    assert [(r.id, r.image_id, r.vote) for r in rows] == [(fb.id, res.hits[1].image_id, 1)]


# -- the real server -----------------------------------------------------------------------
def test_the_served_api_needs_the_page_login(auth_server: Server) -> None:
    import httpx

    server = auth_server  # the run's page behind a login (tests/fixtures/pages.py)
    logged = server.log.stat().st_size

    with httpx.Client(base_url=server.url) as anon:
        for method, path in (("POST", "/api/v1/search"), ("GET", "/api/v1/health"),
                             ("GET", "/api/v1/openapi.json"),
                             ("GET", "/api/v1/images/1/thumbnail")):
            r = anon.request(method, path, json={"query": "a car"})
            assert _error(r, 401)["detail"] == "Not authenticated"
    with pytest.raises(ApiError) as err, Client(server.url, auth=("ann", "nope")) as bad:
        bad.health()
    assert err.value.status == 400  # Gradio's answer to wrong credentials
    with Client(server.url, auth=("ann", "s3cret")) as api:
        res = api.search("blue ford", k=2)
        assert res.hits and res.version == "base"
        assert api.thumbnail(res.hits[0].image_id)[:3] == b"\xff\xd8\xff"
        assert "/search" in api.openapi()["paths"]
        with pytest.raises(ApiError) as err:
            api.search("   ")
        assert err.value.status == 400 and err.value.request_id
    assert "Traceback" not in log_since(server, logged)


# -- the client's transports ---------------------------------------------------------------
def test_the_client_picks_its_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """http.client for a plain http:// URL with no proxy; httpx for https, a proxy from
    the environment, or when asked."""
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                "no_proxy", "REQUEST_METHOD"):
        monkeypatch.delenv(var, raising=False)
    with Client("http://127.0.0.1:9") as local, Client("https://cars.example") as tls, \
            Client("http://127.0.0.1:9", transport="httpx") as asked:
        assert (local.transport, tls.transport, asked.transport) == ("stdlib", "httpx", "httpx")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    with Client("http://cars.example:7860") as proxied:
        assert proxied.transport == "httpx"
    monkeypatch.setenv("NO_PROXY", "cars.example")
    with Client("http://cars.example:7860") as bypassed:
        assert bypassed.transport == "stdlib"
    with pytest.raises(ValueError, match="http:// only"):
        Client("https://cars.example", transport="stdlib")


def test_an_upload_with_an_odd_file_name(api: Client, world: World, tmp_path: Path) -> None:
    """The client writes its multipart body itself: quotes, backslashes, control and
    non-ASCII characters in the file name reach the server as one well-formed part."""
    odd = tmp_path / 'car "red" \\ ü\x01;name=x.png'
    odd.write_bytes(world.photos[2].read_bytes())
    res = api.search_image(odd, "but blue", k=2)
    assert res.hits and res.kind != "text" and res.query == "but blue"


@pytest.mark.full  # the shared page server, and uvicorn's 5 s keep-alive
def test_the_stdlib_transport_keeps_one_connection_and_the_login(auth_server: Server) -> None:
    server = auth_server
    assert "HTTP: uvicorn HttpToolsProtocol on uvloop" in log_since(server, 0)
    with Client(server.url, auth=AUTH) as api, \
            Client(server.url, auth=AUTH, transport="httpx") as other:
        assert (api.transport, other.transport) == ("stdlib", "httpx")
        res = api.search("blue ford", k=3)
        assert [h.image_id for h in res.hits] == [
            h.image_id for h in other.search("blue ford", k=3).hits]
        wire: Any = api._wire
        first = wire.idle[0].sock.getsockname()
        for _ in range(3):
            assert api.health().status == "ok"
        assert [c.sock.getsockname() for c in wire.idle] == [first]  # kept alive, reused
        up = api.search_image(api.thumbnail(res.hits[0].image_id), "but blue", k=1)
        assert len(up.hits) == 1 and up.kind != "text"
        time.sleep(5.5)  # uvicorn closes a connection idle for 5 s
        assert _dropped(wire.idle[0])  # seen before it is used
        assert api.search("blue ford", k=3).hits == res.hits  # on a new one
        assert [c.sock.getsockname() for c in wire.idle] != [first]
