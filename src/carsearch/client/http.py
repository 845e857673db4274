"""`Client`: the JSON API, with the page's login.

    from carsearch.client import Client
    with Client("http://127.0.0.1:7860", auth=("ann", "s3cret")) as api:
        page = api.search("pickup not red", k=20)
        more = api.search("pickup not red", k=20, cursor=page.next_cursor)

With a login set on the server, the client logs in once (POST /login, as the page does)
and sends the session cookie it gets; a 401 later (the server restarted, the session
ended) logs in again once. Every error answer becomes `ApiError` with the HTTP status,
the server's one-line message and its request id.

Transport: a plain ``http://`` URL with no proxy set for it is spoken with the standard
library's `http.client` over kept-alive connections (a small pool, one connection per
thread in flight); anything else (``https://``, a proxy from the environment, or an
``httpx.Client`` passed as ``http=``) goes through httpx. The stdlib path costs about
half of httpx's client CPU per call (0.71 against 1.50 ms on a quiet machine,
docs/BENCHMARKS.md, "The JSON API at 100k on a quiet machine, with httptools + uvloop");
``transport="httpx"`` forces httpx.
"""

from __future__ import annotations

import http.client
import json
import select
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from http.cookies import SimpleCookie
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

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

if TYPE_CHECKING:
    import httpx

PREFIX = "/api/v1"
T = TypeVar("T", bound=BaseModel)
Transport = Literal["auto", "stdlib", "httpx"]
JSON = "application/json"


class ApiError(Exception):
    """An error answer: ``status`` (HTTP), ``detail`` (one line), ``request_id``."""

    def __init__(self, status: int, detail: str, request_id: str | None) -> None:
        self.status = status
        self.detail = detail
        self.request_id = request_id
        rid = f" (request id {request_id})" if request_id else ""
        super().__init__(f"HTTP {status}: {detail}{rid}")


class Answer:
    """One HTTP answer, whichever transport brought it: ``status_code``, ``reason``,
    ``headers`` (names in lower case), ``content`` (the body's bytes)."""

    __slots__ = ("content", "headers", "reason", "status_code")

    def __init__(self, status_code: int, reason: str, headers: Mapping[str, str],
                 content: bytes) -> None:
        self.status_code = status_code
        self.reason = reason
        self.headers = headers
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)


class _Httpx:
    """Requests through an httpx.Client (its own cookies, proxies and TLS)."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def request(self, method: str, path: str, body: bytes | None,
                headers: dict[str, str]) -> Answer:
        r = self.client.request(method, path, content=body, headers=headers)
        return Answer(r.status_code, r.reason_phrase, r.headers, r.content)

    def close(self) -> None:
        self.client.close()


class _Stdlib:
    """Requests through `http.client` over kept-alive connections to one http:// origin.

    Idle connections wait in a pool; a request takes one (or opens one), so threads
    never share a connection in flight. A kept-alive connection the server has closed
    meanwhile (uvicorn closes them after 5 s idle) is seen before it is used (its socket
    reads ready: urllib3 and httpx check the same) and replaced; one closed in the
    moment between that check and the request fails before any answer, and the request
    is sent once more on a new connection. Cookies the server
    sets (the login's session) are kept and sent back: one origin, so no domain or path
    rules apply beyond the server's own."""

    _STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
              ConnectionAbortedError)

    def __init__(self, url: urllib.parse.SplitResult, timeout_s: float) -> None:
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.base = url.path.rstrip("/")
        self.timeout_s = timeout_s
        self.idle: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()
        self.cookies: dict[str, str] = {}
        self.cookie_header = ""

    def request(self, method: str, path: str, body: bytes | None,
                headers: dict[str, str]) -> Answer:
        if self.cookie_header:
            headers = {**headers, "cookie": self.cookie_header}
        with self.lock:
            reused = self.idle.pop() if self.idle else None
        if reused is not None and _dropped(reused):
            reused.close()  # the server closed it while it was idle: a new one
            reused = None
        if reused is not None:
            try:
                return self._exchange(reused, method, path, body, headers)
            except self._STALE:
                reused.close()  # closed by the server while idle: once more on a new one
            except BaseException:
                reused.close()
                raise
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            return self._exchange(conn, method, path, body, headers)
        except BaseException:
            conn.close()
            raise

    def _exchange(self, conn: http.client.HTTPConnection, method: str, path: str,
                  body: bytes | None, headers: dict[str, str]) -> Answer:
        conn.request(method, self.base + path, body=body, headers=headers)
        r = conn.getresponse()
        content = r.read()  # the whole body: the connection is free again after it
        msg = r.msg
        cookies = msg.get_all("set-cookie")
        if cookies:
            self._keep(cookies)
        answer = Answer(r.status, r.reason, {k.lower(): v for k, v in msg.items()}, content)
        if r.will_close:
            conn.close()
        else:
            with self.lock:
                self.idle.append(conn)
        return answer

    def _keep(self, lines: list[str]) -> None:
        for line in lines:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(line)
            except Exception:  # a cookie this jar cannot read is not the session's
                continue
            for name, morsel in jar.items():
                if morsel["max-age"] in ("0", "-1") or morsel.value == "":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        self.cookie_header = "; ".join(f"{k}={v}" for k, v in self.cookies.items())

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection was closed by the server (or has bytes
    nobody asked for): its socket reads ready before a request is sent on it."""
    sock = conn.sock
    if sock is None:
        return False  # closed on our side: http.client opens a new one
    try:
        ready, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(ready)


def _stdlib_fits(url: urllib.parse.SplitResult) -> bool:
    """A plain http:// URL that no proxy in the environment is set for."""
    if url.scheme != "http" or not url.hostname:
        return False
    proxies = urllib.request.getproxies()
    return "http" not in proxies or bool(urllib.request.proxy_bypass(url.hostname))


class Client:
    """The carsearch JSON API. ``http``: an httpx.Client to use instead of a new
    connection (tests pass one bound to the app in-process); ``transport``: "auto" (the
    standard library's http.client for a plain http:// URL with no proxy, else httpx),
    "stdlib" or "httpx"."""

    def __init__(self, url: str = "http://127.0.0.1:7860", *,
                 auth: tuple[str, str] | None = None, timeout_s: float = 60.0,
                 http: httpx.Client | None = None, transport: Transport = "auto") -> None:
        self.auth = auth
        self.http = http
        self._logged_in = False
        parts = urllib.parse.urlsplit(url)
        self._wire: _Httpx | _Stdlib
        if http is not None:
            self._wire = _Httpx(http)
            self._own = False
            return
        self._own = True
        if transport == "stdlib" or (transport == "auto" and _stdlib_fits(parts)):
            if parts.scheme != "http":
                raise ValueError(f"the stdlib transport speaks http:// only, not {url!r}")
            self._wire = _Stdlib(parts, timeout_s)
        else:
            import httpx

            self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s)
            self._wire = _Httpx(self.http)

    @property
    def transport(self) -> str:
        """Which transport this client speaks through: "stdlib" or "httpx"."""
        return "stdlib" if isinstance(self._wire, _Stdlib) else "httpx"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self._wire.close()

    # -- the API -----------------------------------------------------------------------
    def search(self, query: str | None = None, **options: Any) -> SearchResponse:
        """A text query, an indexed image (``image_id=``) or both; the other options are
        `SearchQuery`'s fields (k, cursor, filters, exclude, min_prob, sort, ...)."""
        body = SearchQuery(query=query, **options)
        return self._call("POST", "/search", SearchResponse, _json_body(body), JSON)

    def search_image(self, image: str | Path | bytes, query: str | None = None,
                     **options: Any) -> SearchResponse:
        """Search with an uploaded image (a path or its bytes), optionally with a text
        ("but blue"); the options are `ImageSearchOptions`' fields."""
        opts = _body(ImageSearchOptions(query=query, **options))
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        name = "upload" if isinstance(image, bytes) else Path(image).name
        body, content_type = multipart(
            {"options": json.dumps(opts)}, {"image": (name, data, "application/octet-stream")})
        return self._call("POST", "/search/image", SearchResponse, body, content_type)

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
        return self._call("POST", "/feedback", FeedbackResult, _json_body(body), JSON)

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
        form = urllib.parse.urlencode({"username": user, "password": password}).encode()
        r = self._wire.request("POST", "/login", form,
                               {"content-type": "application/x-www-form-urlencoded"})
        if r.status_code != 200:
            raise _error(r)
        self._logged_in = True

    def _call(self, method: str, path: str, model: type[T], body: bytes | None = None,
              content_type: str | None = None) -> T:
        return model.model_validate_json(self._send(method, path, body, content_type).content)

    def _send(self, method: str, path: str, body: bytes | None = None,
              content_type: str | None = None) -> Answer:
        if self.auth is not None and not self._logged_in:
            self.login()
        headers = {} if content_type is None else {"content-type": content_type}
        r = self._wire.request(method, PREFIX + path, body, headers)
        if r.status_code == 401 and self.auth is not None:
            self.login()  # the session ended: once more with a fresh one
            r = self._wire.request(method, PREFIX + path, body, headers)
        if r.status_code >= 400:
            raise _error(r)
        return r


def _body(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(exclude_defaults=True, mode="json")


def _json_body(model: BaseModel) -> bytes:
    """A request body as JSON bytes, serialised by pydantic once (no dict in between)."""
    return model.model_dump_json(exclude_defaults=True).encode()


def _quote(value: str) -> str:
    """A multipart parameter value as browsers (and httpx) write it: '"' and the control
    characters percent-escaped, backslashes doubled."""
    out = value.replace("\\", "\\\\").replace('"', "%22")
    return "".join(f"%{ord(c):02X}" if ord(c) < 0x20 and c != "\x1b" else c for c in out)


def multipart(fields: Mapping[str, str], files: Mapping[str, tuple[str, bytes, str]]
              ) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type: text ``fields``, then ``files``
    (name: (filename, bytes, content type)). Names are written as UTF-8; a character
    that has none (a lone surrogate, as undecodable bytes in a file name become) as "?"."""
    boundary = uuid.uuid4().hex

    def utf8(text: str) -> bytes:
        return text.encode("utf-8", "replace")

    parts: list[bytes] = []
    for name, value in fields.items():
        parts += [utf8(f'--{boundary}\r\nContent-Disposition: form-data; '
                       f'name="{_quote(name)}"\r\n\r\n'), utf8(value), b"\r\n"]
    for name, (filename, data, ctype) in files.items():
        parts += [utf8(f'--{boundary}\r\nContent-Disposition: form-data; '
                       f'name="{_quote(name)}"; filename="{_quote(filename)}"\r\n'
                       f"Content-Type: {_quote(ctype)}\r\n\r\n"), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _error(r: Answer) -> ApiError:
    try:
        body = r.json()
    except ValueError:
        body = {}
    detail = body.get("detail") if isinstance(body, dict) else None
    rid = body.get("request_id") if isinstance(body, dict) else None
    return ApiError(r.status_code, str(detail or r.reason or "error"),
                    rid or r.headers.get("x-request-id"))
