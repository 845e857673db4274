"""`Client`: the JSON API over httpx, with the page's login.

    from carsearch.client import Client
    with Client("http://127.0.0.1:7860", auth=("ann", "s3cret")) as api:
        page = api.search("pickup not red", k=20)
        more = api.search("pickup not red", k=20, cursor=page.next_cursor)

With a login set on the server, the client logs in once (POST /login, as the page does)
and sends the session cookie it gets; a 401 later (the server restarted, the session
ended) logs in again once. Every error answer becomes `ApiError` with the HTTP status,
the server's one-line message and its request id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from carsearch.client.models import (
    Feedback,
    FeedbackResult,
    Health,
    ImageInfo,
    ImageSearchOptions,
    SearchQuery,
    SearchResponse,
)

PREFIX = "/api/v1"
T = TypeVar("T", bound=BaseModel)


class ApiError(Exception):
    """An error answer: ``status`` (HTTP), ``detail`` (one line), ``request_id``."""

    def __init__(self, status: int, detail: str, request_id: str | None) -> None:
        self.status = status
        self.detail = detail
        self.request_id = request_id
        rid = f" (request id {request_id})" if request_id else ""
        super().__init__(f"HTTP {status}: {detail}{rid}")


class Client:
    """The carsearch JSON API. ``http``: an httpx.Client to use instead of a new one
    (tests pass one bound to the app in-process)."""

    def __init__(self, url: str = "http://127.0.0.1:7860", *,
                 auth: tuple[str, str] | None = None, timeout_s: float = 60.0,
                 http: httpx.Client | None = None) -> None:
        self.auth = auth
        self._own = http is None
        self.http = http if http is not None else httpx.Client(
            base_url=url.rstrip("/"), timeout=timeout_s)
        self._logged_in = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self.http.close()

    # -- the API -----------------------------------------------------------------------
    def search(self, query: str | None = None, **options: Any) -> SearchResponse:
        """A text query, an indexed image (``image_id=``) or both; the other options are
        `SearchQuery`'s fields (k, cursor, filters, exclude, min_prob, sort, ...)."""
        body = SearchQuery(query=query, **options)
        return self._call("POST", "/search", SearchResponse, **_json_body(body))

    def search_image(self, image: str | Path | bytes, query: str | None = None,
                     **options: Any) -> SearchResponse:
        """Search with an uploaded image (a path or its bytes), optionally with a text
        ("but blue"); the options are `ImageSearchOptions`' fields."""
        opts = _body(ImageSearchOptions(query=query, **options))
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        name = "upload" if isinstance(image, bytes) else Path(image).name
        return self._call("POST", "/search/image", SearchResponse,
                          files={"image": (name, data, "application/octet-stream")},
                          data={"options": json.dumps(opts)})

    def more(self, previous: SearchResponse, query: str | None = None,
             **options: Any) -> SearchResponse | None:
        """The page after ``previous`` of the same search (None: there is none)."""
        if previous.next_cursor is None:
            return None
        return self.search(query, cursor=previous.next_cursor, **options)

    def feedback(self, image_id: int, vote: int, *, query_log_id: int | None = None,
                 query: str | None = None) -> FeedbackResult:
        body = Feedback(image_id=image_id, vote=vote,  # type: ignore[arg-type]
                        query_log_id=query_log_id, query=query)
        return self._call("POST", "/feedback", FeedbackResult, **_json_body(body))

    def image(self, image_id: int) -> ImageInfo:
        return self._call("GET", f"/images/{int(image_id)}", ImageInfo)

    def thumbnail(self, image_id: int) -> bytes:
        """The image's thumbnail (JPEG bytes)."""
        return self._send("GET", f"/images/{int(image_id)}/thumbnail").content

    def health(self) -> Health:
        return self._call("GET", "/health", Health)

    def openapi(self) -> dict[str, Any]:
        doc: dict[str, Any] = self._send("GET", "/openapi.json").json()
        return doc

    # -- plumbing ----------------------------------------------------------------------
    def login(self) -> None:
        """Log in with ``auth`` (POST /login, the page's form); ApiError if refused."""
        if self.auth is None:
            raise ApiError(401, "the server wants a login: pass auth=(user, password)", None)
        user, password = self.auth
        r = self.http.post("/login", data={"username": user, "password": password})
        if r.status_code != 200:
            raise _error(r)
        self._logged_in = True

    def _call(self, method: str, path: str, model: type[T], **kwargs: Any) -> T:
        return model.model_validate_json(self._send(method, path, **kwargs).content)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self.auth is not None and not self._logged_in:
            self.login()
        r = self.http.request(method, PREFIX + path, **kwargs)
        if r.status_code == 401 and self.auth is not None:
            self.login()  # the session ended: once more with a fresh one
            r = self.http.request(method, PREFIX + path, **kwargs)
        if r.status_code >= 400:
            raise _error(r)
        return r


def _body(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(exclude_defaults=True, mode="json")


def _json_body(model: BaseModel) -> dict[str, Any]:
    """A request body as JSON bytes, serialised by pydantic once (no dict in between)."""
    return {"content": model.model_dump_json(exclude_defaults=True),
            "headers": {"content-type": "application/json"}}


def _error(r: httpx.Response) -> ApiError:
    try:
        body = r.json()
    except ValueError:
        body = {}
    detail = body.get("detail") if isinstance(body, dict) else None
    rid = body.get("request_id") if isinstance(body, dict) else None
    return ApiError(r.status_code, str(detail or r.reason_phrase or "error"),
                    rid or r.headers.get("x-request-id"))
