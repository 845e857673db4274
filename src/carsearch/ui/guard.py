"""The page's doors: what reaches Gradio's routes, and how much of it one client may send.

`RequestGate` is one ASGI middleware in front of every route of the Gradio app:

- a request body larger than the limit is refused with 413 from its Content-Length,
  before a byte of it is read (a body sent without one is counted as it arrives and cut
  off at the limit);
- with a login set, every route but the login page and its static assets answers 401
  to a client without a session cookie (Gradio leaves some open: heartbeat, streams,
  cancel, user, app id), and the login page is sent without the API description
  Gradio would embed in it;
- the file routes serve only files inside the served roots (the thumbnail store, the
  originals only when a setting allows it, Gradio's own upload cache), after following
  symlinks: traversal (`..`, also percent-encoded), encoded slashes, symlinks out of a
  root, absolute paths elsewhere and remote URLs get 403;
- concurrent uploads (the page's and the JSON API's image search) are capped per client
  (429 beyond the cap);
- every refusal is JSON with a request id, as the JSON API's errors are;
- login attempts (POST /login) are throttled per client and per user name
  (`LoginThrottle`): past the failures allowed in a window the gate answers 429 with a
  Retry-After, without passing the attempt on, so the password is not checked.

`ClientLimits` holds the per-client token buckets (searches per second) and upload
slots; the page's handlers check them and answer a refusal with a one-line message.
A client is the peer address of the connection. Forwarded headers (X-Forwarded-For)
are believed only from the proxies CARSEARCH_UI_TRUSTED_PROXIES names (uvicorn's
forwarded_allow_ips, set by `launch`); by default none, so a client cannot pick its own
address by rotating the header, and behind an unnamed proxy every person shares the
proxy's address.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from carsearch.platform.errors import CarsearchError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Any request but an upload: event bodies hold a query, filters and file references.
MAX_FORM_BYTES = 1_000_000
# Multipart framing around an upload at the size limit.
UPLOAD_OVERHEAD_BYTES = 64 * 1024
UPLOAD_PATH = "/gradio_api/upload"
# The JSON API's upload (ui/api.py): the same size cap and upload slots as the page's.
API_UPLOAD_PATH = "/api/v1/search/image"
UPLOAD_PATHS = frozenset({UPLOAD_PATH, API_UPLOAD_PATH})
FILE_PREFIXES = ("/gradio_api/file=", "/gradio_api/file/", "/file=", "/file/")
PROXY_PREFIXES = ("/gradio_api/proxy=", "/proxy=")
# What the login page itself needs before anyone has logged in, and the startup call
# Gradio's launch makes to its own server (it runs the startup events once; later calls
# do nothing and answer false).
PUBLIC_PATHS = frozenset({
    "/", "/login", "/login/", "/logout", "/config", "/config/", "/favicon.ico",
    "/manifest.json", "/robots.txt", "/theme.css", "/gradio_api/theme.css",
    "/gradio_api/login_check", "/gradio_api/login_check/", "/gradio_api/startup-events",
})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
_ENCODED_TRICKS = re.compile(rb"%(2e|2f|5c|25)", re.IGNORECASE)
_API_INFO = re.compile(rb"<script>window\.gradio_api_info = .*?;</script>", re.DOTALL)

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


class LimitError(CarsearchError):
    """A client over one of the page's abuse limits; the message is the one line shown."""


def parse_size(text: str | int) -> int:
    """"20mb" -> bytes (1 kb = 1024 bytes, as Gradio reads its max_file_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise CarsearchError(f"not a size: {text!r} (use e.g. 20mb, 512kb)")
    return int(m.group(1)) * _SIZE_UNITS[unit]


class ClientLimits:
    """Per-client token buckets on searches and a cap on concurrent uploads."""

    def __init__(self, searches_per_s: float, burst: int, max_uploads: int) -> None:
        self.rate = float(searches_per_s)
        self.burst = max(1, int(burst))
        self.max_uploads = max(1, int(max_uploads))
        self._buckets: dict[str, tuple[float, float]] = {}
        self._uploads: dict[str, int] = {}
        self._lock = threading.Lock()

    def take_search(self, client: str) -> None:
        """Spend one search token of `client`, or raise LimitError."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                raise LimitError(
                    f"too many searches: at most {self.rate:g} a second from one client "
                    f"(bursts of {self.burst}); wait a moment and search again")
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:  # forget clients whose bucket is full again
                full = [c for c, (t, at) in self._buckets.items()
                        if t + (now - at) * self.rate >= self.burst]
                for c in full:
                    del self._buckets[c]

    def try_upload(self, client: str) -> bool:
        with self._lock:
            n = self._uploads.get(client, 0)
            if n >= self.max_uploads:
                return False
            self._uploads[client] = n + 1
            return True

    def end_upload(self, client: str) -> None:
        with self._lock:
            n = self._uploads.get(client, 0) - 1
            if n > 0:
                self._uploads[client] = n
            else:
                self._uploads.pop(client, None)

    @contextmanager
    def upload_slot(self, client: str) -> Iterator[None]:
        """Hold one of `client`'s upload slots while its upload is worked on."""
        if not self.try_upload(client):
            raise LimitError(self.uploads_message())
        try:
            yield
        finally:
            self.end_upload(client)

    def uploads_message(self) -> str:
        return (f"too many uploads at once: at most {self.max_uploads} from one client; "
                "wait for the others to finish")


LOGIN_PATHS = frozenset({"/login", "/login/"})


class LoginRefused(LimitError):
    """Too many failed logins; `retry_after_s` says when the oldest one stops counting."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(f"too many failed logins: try again in {self.retry_after_s} s")


class LoginThrottle:
    """Failed logins counted per client and per user name over a sliding window.

    `admit` refuses (LoginRefused) when either has `failures` in the window; otherwise it
    counts the attempt as a failure at once (so a burst sent in parallel is held to the
    same number as one sent in turn) and returns a ticket; `settle(ticket, ok=True)`
    takes the attempt back off when the login succeeded. Refused attempts are not
    counted: the lock-out ends one window after the last attempt that was checked. A
    user name is counted whoever sends it, so guessing one user's password from many
    addresses is held too (at the price that such guessing locks that user out for the
    window)."""

    def __init__(self, failures: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = max(1, int(failures))
        self.window_s = float(window_s)
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def keys(client: str, user: str) -> tuple[str, str]:
        return f"client:{client}", f"user:{user.strip().lower()[:256]}"

    def admit(self, client: str, user: str) -> tuple[tuple[str, str], float]:
        now = self.clock()
        keys = self.keys(client, user)
        with self._lock:
            for key in keys:
                seen = self._recent(key, now)
                if len(seen) >= self.failures:
                    raise LoginRefused(seen[0] + self.window_s - now)
            for key in keys:
                self._seen.setdefault(key, deque()).append(now)
            if len(self._seen) > 10_000:  # forget keys with nothing left in the window
                for key in [k for k in self._seen if not self._recent(k, now)]:
                    del self._seen[key]
        return keys, now

    def settle(self, ticket: tuple[tuple[str, str], float], *, ok: bool) -> None:
        if not ok:
            return
        keys, at = ticket
        with self._lock:
            for key in keys:
                seen = self._seen.get(key)
                if seen is not None and at in seen:
                    seen.remove(at)

    def _recent(self, key: str, now: float) -> deque[float]:
        seen = self._seen.get(key, deque())
        while seen and seen[0] <= now - self.window_s:
            seen.popleft()
        return seen


@dataclass(frozen=True)
class GateConfig:
    served_roots: tuple[Path, ...]
    max_upload_bytes: int
    limits: ClientLimits
    max_form_bytes: int = MAX_FORM_BYTES
    login: LoginThrottle | None = None


class _TooLarge(Exception):
    pass


class RequestGate:
    """ASGI middleware in front of the Gradio app (see the module docstring)."""

    def __init__(self, app: ASGIApp, config: GateConfig) -> None:
        self.app = app
        self.config = config
        self.roots = tuple(Path(r).resolve() for r in config.served_roots)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        gradio = scope.get("app")
        logged_in = self._logged_in(scope, gradio)
        if scope["type"] == "websocket":
            if logged_in:
                await self.app(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        limit = (self.config.max_upload_bytes + UPLOAD_OVERHEAD_BYTES
                 if path in UPLOAD_PATHS else self.config.max_form_bytes)
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _answer(send, 413, f"request too large: at most {limit} bytes")
            return
        if not logged_in and not _public(path):
            await _answer(send, 401, "Not authenticated")
            return
        if path.startswith(PROXY_PREFIXES):
            await _answer(send, 403, "File not allowed")
            return
        if path.startswith(FILE_PREFIXES) and not self._file_allowed(scope, gradio):
            await _answer(send, 403, "File not allowed")
            return
        if not logged_in and path == "/" and scope.get("method") in ("GET", "HEAD"):
            send = _without_api_info(send)
        receive, send = _capped(receive, send, limit)
        if (path in LOGIN_PATHS and scope.get("method") == "POST"
                and self.config.login is not None
                and getattr(gradio, "auth", None) is not None):
            await self._login(scope, receive, send, self.config.login)
            return
        if path in UPLOAD_PATHS and scope.get("method") == "POST":
            client = client_of(scope)
            if not self.config.limits.try_upload(client):
                await _answer(send, 429, self.config.limits.uploads_message())
                return
            try:
                await self.app(scope, receive, send)
            finally:
                self.config.limits.end_upload(client)
            return
        await self.app(scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive, send: Send,
                     throttle: LoginThrottle) -> None:
        """A login attempt: refused with 429 while its client or user name is over the
        failures allowed, else passed on and its outcome counted."""
        from starlette.requests import Request

        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away (or the body was over the cap: answered)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            form = await Request(scope, _once(body)).form()
            user = str(form.get("username") or "")
        except Exception:  # a form Gradio will refuse too; counted under no user name
            user = ""
        client = client_of(scope)
        try:
            ticket = throttle.admit(client, user)
        except LoginRefused as exc:
            log.warning("login refused for client %s (user %r): %s", client, user[:64], exc)
            await _answer(send, 429, str(exc),
                          [(b"retry-after", str(exc.retry_after_s).encode())])
            return
        answered: dict[str, int] = {}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered["status"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, replay, watch)
        finally:
            throttle.settle(ticket, ok=answered.get("status") == 200)

    @staticmethod
    def _logged_in(scope: Scope, gradio: Any) -> bool:
        """No login configured, or a cookie of a session Gradio issued."""
        if gradio is None or getattr(gradio, "auth", None) is None:
            return True
        raw = _header(scope, b"cookie")
        if not raw:
            return False
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw)
        except CookieError:
            return False
        cid = getattr(gradio, "cookie_id", "")
        tokens: dict[str, Any] = getattr(gradio, "tokens", {})
        for name in (f"access-token-{cid}", f"access-token-unsecure-{cid}"):
            morsel = jar.get(name)
            if morsel is not None and tokens.get(morsel.value) is not None:
                return True
        return False

    def _file_allowed(self, scope: Scope, gradio: Any) -> bool:
        path: str = scope["path"]
        raw: bytes = scope.get("raw_path") or path.encode()
        prefix = next(p for p in FILE_PREFIXES if path.startswith(p))
        target = path[len(prefix):]
        raw_target = raw.split(b"=", 1)[1] if b"=" in raw else raw[len(prefix):]
        if _ENCODED_TRICKS.search(raw_target) or "\\" in target or "\x00" in target:
            return False  # encoded dots, slashes, backslashes or a second encoding
        decoded = unquote(target)
        if any(part == ".." for part in decoded.split("/")) or "://" in decoded:
            return False
        roots = list(self.roots)
        upload_dir = getattr(gradio, "uploaded_file_dir", None)
        if upload_dir:
            roots.append(Path(upload_dir).resolve())
        try:
            real = Path(decoded).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            return False
        if not Path(decoded).is_absolute() or not real.is_file():
            return False
        return any(real.is_relative_to(root) for root in roots)


def client_of(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _answer(send: Send, status: int, detail: str,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A refusal as JSON, with a request id (in the body and X-Request-ID) as the API's
    own errors have (ui/api.py)."""
    rid = uuid.uuid4().hex[:12]
    log.info("refused with %d (request id %s): %s", status, rid, detail)
    body = json.dumps({"detail": detail, "request_id": rid}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", rid.encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _once(body: bytes) -> Receive:
    """A receive callable that gives `body` once, then a disconnect."""
    given = False

    async def receive() -> Message:
        nonlocal given
        if given:
            return {"type": "http.disconnect"}
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _capped(receive: Receive, send: Send, limit: int) -> tuple[Receive, Send]:
    """Count the body as it arrives; past `limit` answer 413 and tell the app the client
    went away (whatever it sends after that is dropped)."""
    state = {"seen": 0, "started": False, "refused": False}

    async def capped_receive() -> Message:
        if state["refused"]:
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.request":
            state["seen"] += len(message.get("body", b""))
            if state["seen"] > limit:
                state["refused"] = True
                if not state["started"]:
                    state["started"] = True
                    await _answer(send, 413, f"request too large: at most {limit} bytes")
                return {"type": "http.disconnect"}
        return message

    async def capped_send(message: Message) -> None:
        if state["refused"]:
            return
        if message["type"] == "http.response.start":
            state["started"] = True
        await send(message)

    return capped_receive, capped_send


def _without_api_info(send: Send) -> Send:
    """The login page as Gradio renders it, less the API description it embeds."""
    held: dict[str, Any] = {"start": None, "body": b""}

    async def strip(message: Message) -> None:
        if message["type"] == "http.response.start":
            held["start"] = message
            return
        if message["type"] != "http.response.body" or held["start"] is None:
            await send(message)
            return
        held["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return
        body = _API_INFO.sub(b"<script>window.gradio_api_info = null;</script>", held["body"])
        start = dict(held["start"])
        start["headers"] = [(k, v) for k, v in start.get("headers", [])
                            if k.lower() != b"content-length"]
        start["headers"].append((b"content-length", str(len(body)).encode()))
        await send(start)
        await send({"type": "http.response.body", "body": body})

    return strip
