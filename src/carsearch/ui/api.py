"""The JSON API under /api/v1, served by the page's own server.

`build_api(page, limits)` is a FastAPI app that `launch` mounts at /api/v1 inside the
Gradio app, so the page's `RequestGate` stands in front of it: the same login (the
session cookie from POST /login), the same body caps and upload slots, the same
per-client search tokens (`ClientLimits`). Every search goes to the one service call
the page makes, `SearchService.search(SearchRequest)`; the bodies are the pydantic
models of `carsearch.client.models`, which also make /api/v1/openapi.json.

    POST /api/v1/search              a text, an indexed image (image_id), or both
    POST /api/v1/search/image        multipart: "image" (the file), "options" (JSON)
    POST /api/v1/feedback            a thumbs-up or -down on a hit
    GET  /api/v1/images/{id}         metadata, and the thumbnail's URL
    GET  /api/v1/images/{id}/thumbnail
    GET  /api/v1/health

Every answer carries an X-Request-ID header. Every error is JSON, {"detail": one line,
"request_id": id}: 400 for input the platform refuses, 404 for an unknown image or
route, 422 for a body that does not fit the schema, 429 over a limit, 503 while no
model serves, 500 with only the id for anything else (the trace is logged under it).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount

from carsearch.client.models import (
    ErrorBody,
    Feedback,
    FeedbackResult,
    Filters,
    Health,
    ImageInfo,
    ImageSearchOptions,
    SearchOptions,
    SearchQuery,
    SearchResponse,
)
from carsearch.platform.db import Image
from carsearch.platform.errors import (
    CarsearchError,
    ImageRejectedError,
    ModelNotFoundError,
    QueryError,
)
from carsearch.platform.images import DECODE_MAX_SIDE, load_image_bytes
from carsearch.platform.search.nlfilters import FilterChip, validate_filters
from carsearch.platform.search.service import SearchHit, SearchRequest, SearchResult
from carsearch.platform.vectors.filters import SearchFilters
from carsearch.ui.guard import ClientLimits, LimitError, Receive, Scope, Send, client_of
from carsearch.ui.page import SearchPage

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
IMAGE_SEARCH_PATH = PREFIX + "/search/image"
API_VERSION = "v1"
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in ((400, "input the platform refuses"), (401, "not logged in"),
                       (422, "a body that does not fit the schema"),
                       (429, "over a per-client limit"), (503, "no model serves"))
}


def request_id() -> str:
    return uuid.uuid4().hex[:12]


def _error(status: int, detail: str, rid: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    line = (detail.splitlines() or [""])[0][:500] or "error"
    return JSONResponse({"detail": line, "request_id": rid}, status_code=status,
                        headers={"x-request-id": rid, **(headers or {})})


class RequestIds:
    """Give each API request an id (X-Request-ID on every answer, `request.state`), and
    be the last line of defence: an exception nothing else answered becomes a 500 that
    holds only the id; the trace is logged under it and goes no further."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id()
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def tagged(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        except Exception as exc:
            log.error("internal error (request id %s) in %s %s", rid, scope.get("method"),
                      scope.get("path"), exc_info=exc)
            if not started:
                await _error(500, f"internal error (request id {rid})", rid)(
                    scope, receive, send)


def _rid(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or request_id())


def status_of(exc: CarsearchError) -> int:
    if isinstance(exc, LimitError):
        return 429
    if isinstance(exc, ModelNotFoundError):
        return 503
    return 400


class SearchApi:
    """The API's handlers over one SearchPage (its service, vocabulary cache,
    thumbnails and feedback) and the page's per-client limits."""

    def __init__(self, page: SearchPage, limits: ClientLimits | None = None) -> None:
        self.page = page
        self.service = page.service
        self.limits = limits

    # -- searches ----------------------------------------------------------------------
    def search(self, body: SearchQuery, client: str) -> dict[str, Any]:
        self._admit(client)
        if body.query is None and body.image_id is None:
            raise QueryError("give a query, an image_id, or both")
        return self._run(body, body.query, image_id=body.image_id)

    def search_image(self, data: bytes, name: str, options: ImageSearchOptions,
                     client: str) -> dict[str, Any]:
        self._admit(client)
        try:
            img = load_image_bytes(data, name=name[:100] or "upload",
                                   max_pixels=self.page.settings.max_image_pixels,
                                   max_bytes=self.page.max_upload_bytes,
                                   max_side=DECODE_MAX_SIDE)
        except ImageRejectedError as exc:
            raise QueryError(f"upload rejected: {exc.reason}") from None
        except (OSError, ValueError):
            raise QueryError("upload rejected: not a readable image") from None
        return self._run(options, options.query, image=img)

    def _admit(self, client: str) -> None:
        if self.limits is not None:
            self.limits.take_search(client)

    def _run(self, body: SearchOptions, query: str | None, *, image_id: int | None = None,
             image: Any = None) -> dict[str, Any]:
        request = self.request(body, query, image_id=image_id, image=image)
        try:
            result = self.service.search(request)
        except ValidationError as exc:
            raise QueryError(f"filter: {exc.errors()[0]['msg']}") from None
        return self.response(result)

    def request(self, body: SearchOptions, query: str | None, *, image_id: int | None = None,
                image: Any = None) -> SearchRequest:
        """The service's request for an API body: the filters checked against the
        vocabulary the page uses, the collection resolved as the page does."""
        weight = getattr(body, "image_weight", None)
        extra = {} if weight is None else {"image_weight": float(weight)}
        return SearchRequest(
            query, body.k, self._filters(body.filters, "filter"),
            keep_chips=body.keep_chips, min_prob=body.min_prob,
            collection=self.service.collection(body.collection),
            vocabulary=self.page.vocabulary(), exclude=self._filters(body.exclude, "exclude"),
            drop_exclusions=tuple(body.drop_exclusions),
            image_id=None if image_id is None else self.service.check_image_id(image_id),
            image=image, cursor=body.cursor, sort=body.sort,
            collapse_duplicates=body.collapse_duplicates, liked=tuple(body.liked),
            disliked=tuple(body.disliked), diversity=float(body.diversity), **extra)

    def _filters(self, filters: Filters | None, what: str) -> SearchFilters | None:
        if filters is None:
            return None
        try:
            return validate_filters(filters.as_dict(), self.page.vocabulary())
        except QueryError as exc:
            raise QueryError(f"{what}: {exc}") from None

    @staticmethod
    def response(result: SearchResult) -> dict[str, Any]:
        """The service's result as the API's answer (`SearchResponse`'s fields, every
        one, in its order), as plain values: no model is built on this path, which runs
        on every search (building 12 hits as pydantic models cost 0.27 ms; every value
        here comes from the service, typed). `SearchResponse.model_validate` of it is
        the model; tests/test_api.py checks the two agree."""
        return {
            "hits": [_hit(h) for h in result.hits],
            "next_cursor": result.next_cursor, "filters": _plain(result.filters),
            "relaxed": [{"kept": list(t["kept"]), "dropped": list(t["dropped"]),
                         "hits": t["hits"]} for t in result.tiers[1:]],
            "relaxed_note": result.relaxed, "chips": [_chip(c) for c in result.chips],
            "exclusions": [_chip(c) for c in result.exclusions],
            "negative_terms": list(result.negative_terms), "ignored": list(result.ignored),
            "version": result.version, "collection": result.collection,
            "query": result.query, "kind": result.kind,
            "query_log_id": result.query_log_id, "latency_ms": result.latency_ms,
        }

    # -- the rest ----------------------------------------------------------------------
    def feedback(self, body: Feedback) -> FeedbackResult:
        row = self.service.record_feedback(body.query_log_id, body.image_id, body.vote,
                                           body.query)
        return FeedbackResult(id=row)

    def image_row(self, image_id: int) -> Image | None:
        iid = self.service.check_image_id(image_id)
        with self.page.platform.db.session() as s:
            row = s.get(Image, iid)
            if row is not None:
                s.expunge(row)
            return row

    def image(self, row: Image) -> ImageInfo:
        extra = row.extra or {}
        status = getattr(row.status, "value", row.status)
        return ImageInfo(
            id=row.id, collection=row.collection, status=str(status), source=row.source,
            make=row.make, model=row.model, year=row.year, body_type=row.body_type,
            colour=row.colour, class_name=row.class_name, width=row.width,
            height=row.height, box=list(row.box) if row.box else None,
            description=_text(extra.get("description")),
            photographer=_text(extra.get("photographer")),
            ingested_at=row.ingested_at.isoformat() if row.ingested_at else None,
            thumbnail_url=f"{PREFIX}/images/{row.id}/thumbnail")

    def health(self) -> Health:
        try:
            version = self.service.serving()
        except CarsearchError as exc:
            return Health(status="no-model", detail=str(exc).splitlines()[0][:300],
                          api=API_VERSION)
        return Health(status="ok", version=version.name,
                      collection=version.image_collection, api=API_VERSION)


def _hit(h: SearchHit) -> dict[str, Any]:
    return {"rank": h.rank, "score": h.score, "image_id": h.image_id, "make": h.make,
            "model": h.model, "year": h.year, "body_type": h.body_type, "colour": h.colour,
            "class_name": h.class_name, "source": h.source, "unmet": list(h.unmet),
            "probability": h.probability, "description": h.description,
            "photographer": h.photographer, "box": None if h.box is None else list(h.box),
            "duplicates": h.duplicates, "duplicate_ids": list(h.duplicate_ids),
            "thumbnail_url": f"{PREFIX}/images/{h.image_id}/thumbnail"}


def _chip(c: FilterChip) -> dict[str, str]:
    return {"key": c.key, "label": c.label, "field": c.field, "value": c.value}


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


class ApiMount(Mount):
    """The API at /api/v1: every path under it, newlines included (Starlette's pattern
    stops at one, which would hand such a path to the page's app and its plain 404)."""

    def __init__(self, app: Any) -> None:
        super().__init__(PREFIX, app=app)
        self.path_regex = re.compile(self.path_regex.pattern, re.DOTALL)


def build_api(page: SearchPage, limits: ClientLimits | None = None) -> FastAPI:
    """The API app (mounted at /api/v1 by `launch`; its paths here are relative)."""
    api = SearchApi(page, limits)
    app = FastAPI(title="carsearch API", version=API_VERSION, openapi_url="/openapi.json",
                  docs_url=None, redoc_url=None,
                  description="Natural-language vehicle image search. Log in as on the "
                  "page (POST /login, form fields username and password) and send the "
                  "session cookie.")
    app.add_middleware(RequestIds)  # type: ignore[arg-type]

    @app.exception_handler(CarsearchError)
    async def platform_error(request: Request, exc: CarsearchError) -> JSONResponse:
        status = status_of(exc)
        headers = {"retry-after": "1"} if status == 429 else None
        return _error(status, str(exc) or type(exc).__name__, _rid(request), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = str(first.get("msg", "invalid request"))
        return _error(422, f"{where}: {msg}" if where else msg, _rid(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), _rid(request))

    @app.post("/search", response_model=SearchResponse, responses=_ERRORS)
    def search(body: SearchQuery, request: Request) -> Response:
        """Search with a text, an indexed image (``image_id``) or both."""
        return _json(api.search(body, client_of(request.scope)))

    @app.post("/search/image", response_model=SearchResponse, responses=_ERRORS)
    def search_image(
        request: Request,
        image: Annotated[UploadFile, File(description="the image to search with")],
        options: Annotated[str, Form(description="ImageSearchOptions as JSON")] = "{}",
    ) -> Response:
        """Search with an uploaded image, optionally with a text ("but blue")."""
        try:
            opts = ImageSearchOptions.model_validate(json.loads(options))
        except (ValueError, ValidationError) as exc:
            raise QueryError(f"options: {_first_error(exc)}") from None
        limit = page.max_upload_bytes
        data = image.file.read(limit + 1)
        if len(data) > limit:
            raise QueryError(f"upload rejected: over the limit of {limit} bytes")
        return _json(api.search_image(data, image.filename or "upload", opts,
                                      client_of(request.scope)))

    @app.post("/feedback", response_model=FeedbackResult, responses=_ERRORS)
    def feedback(body: Feedback) -> FeedbackResult:
        """Store a thumbs-up (1) or -down (-1) on a hit (kept for training)."""
        return api.feedback(body)

    @app.get("/images/{image_id}", response_model=ImageInfo, responses=_ERRORS)
    def image(image_id: int, request: Request) -> Any:
        """An image's metadata and its thumbnail's URL."""
        row = api.image_row(image_id)
        if row is None:
            return _error(404, f"no image with id {image_id}", _rid(request))
        return api.image(row)

    @app.get("/images/{image_id}/thumbnail", response_class=FileResponse,
             responses={200: {"content": {"image/jpeg": {}}}, **_ERRORS})
    def thumbnail(image_id: int, request: Request) -> Any:
        """The image's thumbnail (JPEG, at most 320 px a side)."""
        row = api.image_row(image_id)
        if row is None:
            return _error(404, f"no image with id {image_id}", _rid(request))
        return FileResponse(page.thumbs.get(row.id, row.path), media_type="image/jpeg")

    @app.get("/health", response_model=Health, responses=_ERRORS)
    def health() -> Health:
        """Whether a model serves, and which."""
        return api.health()

    return app


def _json(body: dict[str, Any]) -> Response:
    """An answer as JSON, serialised once with orjson (FastAPI would validate it against
    the route's response_model, which stays for the OpenAPI document)."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e.get("loc", ()))
        return f"{where}: {e['msg']}" if where else str(e["msg"])
    return "not JSON"
