"""The page's doors, tried on the real server (`carsearch serve` in a subprocess over a
real world, see ui_world.py) with plain HTTP, raw sockets and gradio_client:

- with a login set, every route and the Gradio API refuse a client without one, and the
  login page carries no API description;
- only the thumbnail store is served: originals, `../`, encoded traversal, symlinks out
  of the store and absolute paths elsewhere get 403;
- an induced internal error reaches the person as a request id, never as trace text,
  and the server's log has the trace under that id;
- oversized bodies get 413 from their Content-Length, concurrent uploads and bursts of
  searches past the per-client limits get a one-line refusal;
- `serve` on a non-loopback address without a login is refused, and with `--no-auth`
  it starts and the page says so.

The one thing forced is the internal error: the served process is started with a
search-service method and the Status renderer replaced by ones that raise.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client, handle_file

from carsearch.cli.serve import is_loopback
from carsearch.platform.settings import Settings
from carsearch.ui.app import NO_AUTH_BANNER, served_roots
from ui_world import REPO, Server, World, build_world, free_port, run_server

NO_FILTERS = ([], [], [], [], "any", "any")
SECRET = "secret-trace-text"
# The served process, with two of its methods made to fail: what the test induces.
BROKEN = (
    "import runpy\n"
    "import carsearch.platform.search.service as service\n"
    "import carsearch.ui.app as app\n"
    "def boom(*args, **kwargs):\n"
    f"    raise RuntimeError({SECRET!r})\n"
    "service.SearchService.search_similar = boom\n"
    "app.status_markdown = boom\n"
    "runpy.run_module('carsearch.cli', run_name='__main__')\n"
)
LIMITS = {"CARSEARCH_UI_SEARCHES_PER_S": "0.2", "CARSEARCH_UI_SEARCH_BURST": "4",
          "CARSEARCH_UI_MAX_UPLOADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, compact_model: Path) -> World:
    w = build_world(tmp_path_factory.mktemp("sec-world"), compact_model)
    originals = w.settings.image_dir / "originals"  # full-size files in the image store
    originals.mkdir(parents=True)
    shutil.copy(w.photos[0], originals / "car0.png")
    return w


@pytest.fixture(scope="module")
def server(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Loopback, no login (the one-machine demo), tight limits, two methods broken."""
    yield from run_server(world, tmp_path_factory.mktemp("sec-log") / "server.log",
                          LIMITS, python_args=["-c", BROKEN])


@pytest.fixture(scope="module")
def second_world(tmp_path_factory: pytest.TempPathFactory, compact_model: Path) -> World:
    """For the servers started one after another inside a test (one process holds a
    Milvus Lite file at a time)."""
    return build_world(tmp_path_factory.mktemp("sec-world2"), compact_model)


def _get(url: str, headers: dict[str, str] | None = None,
         method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read(200_000) if method != "HEAD" else b""
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _raw(server: Server, target: str, method: str = "GET",
         headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, bytes]:
    """One request with its target sent byte for byte (no client-side normalising)."""
    host = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=20)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body and "Content-Length" not in (headers or {}):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return resp.status, resp.read(200_000)
    finally:
        conn.close()


def _thumbnail(world: World, client: Client) -> Path:
    client.predict("a car", 2, *NO_FILTERS, api_name="/search")  # makes thumbnails
    thumbs = sorted((world.settings.image_dir / "_thumbs").rglob("*.jpg"))
    thumbs = [t for t in thumbs if t.name != "missing.jpg" and not t.is_symlink()]
    assert thumbs
    return thumbs[0]


def _multipart(name: str, payload: bytes) -> tuple[bytes, str]:
    boundary = "carsearch-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n").encode()
    body += payload + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


# -- files --------------------------------------------------------------------------------
def test_only_the_thumbnail_store_is_served(server: Server, world: World) -> None:
    client = Client(server.url, verbose=False)
    thumb = _thumbnail(world, client)
    image_dir = world.settings.image_dir.resolve()
    status, body = _raw(server, f"/gradio_api/file={thumb}")
    assert status == 200 and body[:3] == b"\xff\xd8\xff"

    original = image_dir / "originals" / "car0.png"
    store = image_dir / "_thumbs"
    (store / "aa").mkdir(exist_ok=True)
    inward = store / "aa" / "to-original.jpg"
    inward.unlink(missing_ok=True)
    inward.symlink_to(original)
    outward = store / "aa" / "to-database.jpg"
    outward.unlink(missing_ok=True)
    database = Path(world.settings.database_url.removeprefix("sqlite:///"))
    outward.symlink_to(database)
    refused = {
        "original": f"/gradio_api/file={original}",
        "original, old route": f"/gradio_api/file/{original}",
        "../": f"/gradio_api/file={store}/../originals/car0.png",
        "../ from a subfolder": f"/gradio_api/file={thumb.parent}/../../originals/car0.png",
        "%2e%2e": f"/gradio_api/file={store}/%2e%2e/originals/car0.png",
        "%2E%2E and %2F": f"/gradio_api/file={store}%2F%2E%2E%2Foriginals%2Fcar0.png",
        "double encoded": f"/gradio_api/file={store}/%252e%252e/originals/car0.png",
        "symlink to an original": f"/gradio_api/file={inward}",
        "symlink out of the store": f"/gradio_api/file={outward}",
        "absolute path elsewhere": f"/gradio_api/file={database}",
        "this test file": f"/gradio_api/file={Path(__file__).resolve()}",
        "relative path": "/gradio_api/file=tests/test_security.py",
    }
    for what, target in refused.items():
        status, body = _raw(server, target)
        assert status == 403, (what, status, body[:200])
        assert b"\x89PNG" not in body and b"SQLite" not in body, what


def test_originals_are_served_only_when_the_setting_allows(tmp_path: Path) -> None:
    closed = Settings(data_dir=tmp_path)
    opened = Settings(data_dir=tmp_path, ui_serve_originals=True)
    image_dir = closed.image_dir.resolve()
    assert served_roots(closed) == (image_dir / "_thumbs",)
    assert served_roots(opened) == (image_dir,)


# -- errors -------------------------------------------------------------------------------
def test_an_internal_error_shows_a_request_id_and_no_trace(server: Server) -> None:
    client = Client(server.url, verbose=False)
    _gallery, status, *_ = client.predict("1", 4, *NO_FILTERS, api_name="/more_like_this")
    found = re.fullmatch(r"\*\*Error:\*\* internal error \(request id ([0-9a-f]{12})\)", status)
    assert found, status
    assert SECRET not in status and "RuntimeError" not in status
    # A handler with no status line of its own: the error toast carries the same.
    with pytest.raises(Exception) as err:
        client.predict(api_name="/status")
    shown = str(err.value)
    second = re.search(r"internal error \(request id ([0-9a-f]{12})\)", shown)
    assert second and SECRET not in shown and "Traceback" not in shown, shown
    log = server.log.read_text()
    for rid in (found.group(1), second.group(1)):
        at = log.index(f"request id {rid}")
        assert "Traceback" in log[at:] and SECRET in log[at:]


# -- size and rate limits -----------------------------------------------------------------
def _refused_from_headers(server: Server, path: str, length: int) -> tuple[int, bytes]:
    """Only the headers, claiming `length` bytes that never come: the answer must not
    wait for them."""
    host = urllib.parse.urlsplit(server.url)
    with socket.create_connection((host.hostname, host.port), timeout=15) as s:
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: {host.netloc}\r\n"
                   "Content-Type: multipart/form-data; boundary=x\r\n"
                   f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_oversized_requests_are_refused_before_they_are_read(server: Server) -> None:
    for path, length in (("/gradio_api/upload", 200 * 1024**2),
                         ("/gradio_api/queue/join", 50 * 1024**2)):
        t0 = time.monotonic()
        status, head = _refused_from_headers(server, path, length)
        assert status == 413, head
        assert time.monotonic() - t0 < 10
    # A body sent without a Content-Length is counted as it comes and cut off.
    host = urllib.parse.urlsplit(server.url)
    with socket.create_connection((host.hostname, host.port), timeout=15) as s:
        s.sendall((f"POST /gradio_api/queue/join HTTP/1.1\r\nHost: {host.netloc}\r\n"
                   "Content-Type: application/json\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n").encode())
        chunk = b"x" * 256 * 1024
        try:
            for _ in range(16):  # 4 MiB, past the 1 MB limit
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while the rest was still coming
        assert s.recv(4096).split(b"\r\n")[0].split(b" ")[1] == b"413"


def test_concurrent_uploads_are_capped_per_client(server: Server, world: World) -> None:
    payload = world.photos[1].read_bytes()
    body, ctype = _multipart("car1.png", payload)
    host = urllib.parse.urlsplit(server.url)
    held = socket.create_connection((host.hostname, host.port), timeout=20)
    try:  # one upload in flight: its headers and half its body
        held.sendall((f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host.netloc}\r\n"
                      f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                     + body[: len(body) // 2])
        deadline = time.monotonic() + 15
        while True:
            status, answer = _get(server.url + "gradio_api/upload", {"Content-Type": ctype},
                                  "POST", body)
            if status == 429 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 429, (status, answer[:300])
        assert "too many uploads at once" in json.loads(answer)["detail"]
        held.sendall(body[len(body) // 2:])  # the held one finishes and is accepted
        assert b" 200 " in held.recv(4096).split(b"\r\n")[0]
    finally:
        held.close()
    deadline = time.monotonic() + 15
    while (status := _get(server.url + "gradio_api/upload", {"Content-Type": ctype},
                          "POST", body)[0]) == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200  # the slot came back


def test_a_burst_of_searches_gets_a_one_line_refusal(server: Server, world: World) -> None:
    client = Client(server.url, verbose=False)
    # The bucket holds 4 and refills 0.2 a second; the tests before spent 2.
    statuses = [client.predict("blue ford", 2, *NO_FILTERS, api_name="/search")[1]
                for _ in range(8)]
    served = [s for s in statuses if "results for" in s]
    refused = [s for s in statuses if s.startswith("**Error:** too many searches")]
    assert served and refused and len(served) + len(refused) == len(statuses), statuses
    assert all("\n" not in s and "Traceback" not in s for s in refused)
    # Image searches spend the same tokens.
    _g, status, *_ = client.predict(handle_file(str(world.photos[2])), 2, *NO_FILTERS,
                                    api_name="/image_search")
    assert status.startswith("**Error:** too many searches"), status


# -- login --------------------------------------------------------------------------------
def test_every_route_refuses_a_client_without_credentials(auth_server: Server) -> None:
    server = auth_server  # the run's page behind a login (tests/fixtures/pages.py)
    with pytest.raises(Exception):  # noqa: B017 - gradio_client's own error type
        Client(server.url, verbose=False)
    authed = Client(server.url, verbose=False, auth=("ann", "s3cret"))
    thumb = _thumbnail(server.world, authed)

    status, page = _get(server.url)  # the login page, and nothing of the app
    assert status == 200 and b"auth_required" in page
    for leak in (b"image_search", b"more_like_this", b"Describe a vehicle"):
        assert leak not in page, leak
    post = {"Content-Type": "application/json"}
    refused = [
        ("GET", "config", None), ("GET", "gradio_api/info", None),
        ("GET", "gradio_api/openapi.json", None),
        ("GET", f"gradio_api/file={thumb}", None),
        ("GET", "gradio_api/app_id", None),
        ("GET", "gradio_api/heartbeat/abc", None), ("GET", "gradio_api/user", None),
        ("GET", "gradio_api/queue/data?session_hash=abc", None),
        ("POST", "gradio_api/queue/join", b'{"data": [], "fn_index": 0}'),
        ("POST", "gradio_api/call/search", b'{"data": ["a car", 2]}'),
        ("POST", "gradio_api/run/search", b'{"data": ["a car", 2]}'),
        ("POST", "gradio_api/upload", b"x"), ("POST", "gradio_api/cancel", b"{}"),
    ]
    for method, path, data in refused:
        status, body = _get(server.url + path, post if data else None, method, data)
        assert status in (401, 403), (method, path, status, body[:200])
        assert b"Describe a vehicle" not in body and b"image_search" not in body

    # The same routes answer once logged in.
    status, _ = _get(server.url + "login", {"Content-Type":
                                            "application/x-www-form-urlencoded"},
                     "POST", b"username=ann&password=wrong")
    assert status == 400
    cookie = _login(server, "ann", "s3cret")
    assert _get(server.url + "gradio_api/info", {"Cookie": cookie})[0] == 200
    status, body = _get(server.url + f"gradio_api/file={thumb}", {"Cookie": cookie})
    assert status == 200 and body[:3] == b"\xff\xd8\xff"
    status, page = _get(server.url, {"Cookie": cookie})
    assert status == 200 and b"image_search" in page
    gallery, status_line, *_ = authed.predict("blue ford", 2, *NO_FILTERS,
                                              api_name="/search")
    assert gallery and "results for" in status_line


def _login(server: Server, user: str, password: str) -> str:
    req = urllib.request.Request(
        server.url + "login", method="POST",
        data=urllib.parse.urlencode({"username": user, "password": password}).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=20) as r:
        cookies = [h.split(";", 1)[0] for h in r.headers.get_all("Set-Cookie") or []]
    assert cookies
    return "; ".join(cookies)


# -- starting -----------------------------------------------------------------------------
def test_serving_the_network_without_a_login_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARSEARCH_UI_AUTH")}
    env.update({"CARSEARCH_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"})
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        res = subprocess.run(
            [sys.executable, "-m", "carsearch.cli", "serve", "--host", host,
             "--port", str(free_port())],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, (host, res.stdout, res.stderr)
        assert res.stderr.strip() == (
            f"error: refusing to serve {host} without a login: set "
            "CARSEARCH_UI_AUTH=user:password, or pass --no-auth to open the page to "
            "anyone who can reach it"), res.stderr
        assert "Traceback" not in res.stderr + res.stdout


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.0.1", True), ("localhost", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("::", False), ("", False),
    ("10.0.0.5", False), ("example.org", False),
])
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_no_auth_starts_on_the_network_and_the_page_says_so(second_world: World,
                                                          tmp_path: Path) -> None:
    servers = run_server(second_world, tmp_path / "server.log",
                         args=["--host", "0.0.0.0", "--no-auth"])
    server = next(servers)
    try:
        status, body = _get(server.url + "config")
        assert status == 200
        config: dict[str, Any] = json.loads(body)
        texts = [c.get("props", {}).get("value") for c in config["components"]]
        assert NO_AUTH_BANNER in texts
        status, page = _get(server.url)
        assert status == 200 and b"no-auth-banner" in page
        gallery, status_line, *_ = Client(server.url, verbose=False).predict(
            "blue ford", 2, *NO_FILTERS, api_name="/search")
        assert gallery and "results for" in status_line
        assert "with no login (--no-auth)" in server.log.read_text()
    finally:
        servers.close()


def test_a_person_logs_in_through_the_gate_in_chromium(auth_server: Server) -> None:
    """What the login page needs is let through the gate: the form, then the page with
    its thumbnails, in a real browser."""
    from fixtures.browser import ARGS, CHROMIUM, _need

    _need(Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is not None,
          f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    server = auth_server  # the run's page behind a login (tests/fixtures/pages.py)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(server.url)
            page.get_by_label("username").fill("ann")
            page.get_by_label("password").fill("s3cret")
            page.get_by_role("button", name="Login").click()
            expect(page.locator("#header")).to_contain_text("Serving model base")
            box = page.locator("#query textarea, #query input").first
            box.fill("a car")
            box.press("Enter")
            expect(page.locator("#status")).to_contain_text("results for 'a car'")
            thumbs = page.locator("#results img")
            expect(thumbs).to_have_count(8)
            expect(thumbs.first).to_be_visible()
            # The file comes through the gate: wait for it to be decoded (a 401/403
            # never is), rather than read it the moment the element shows.
            page.wait_for_function(
                "() => { const i = document.querySelector('#results img');"
                " return !!i && i.complete && i.naturalWidth > 0; }", timeout=60_000)
        finally:
            browser.close()


# -- issue 22: login throttling (item 11) and forwarded headers (item 12) -----------------
# The served process with the login throttle's clock made to jump: the test writes how
# many seconds to add to a file, so "after the window" needs no waiting.
SKEWED_CLOCK = (
    "import os, runpy, time\n"
    "import carsearch.ui.guard as guard\n"
    "def clock():\n"
    "    try:\n"
    "        with open(os.environ['TEST_CLOCK_SKEW']) as fh:\n"
    "            return time.monotonic() + float(fh.read() or 0)\n"
    "    except OSError:\n"
    "        return time.monotonic()\n"
    "base = guard.LoginThrottle.__init__\n"
    "def init(self, failures, window_s, clock_=None):\n"
    "    base(self, failures, window_s, clock)\n"
    "guard.LoginThrottle.__init__ = init\n"
    "runpy.run_module('carsearch.cli', run_name='__main__')\n"
)


def _try_login(server: Server, user: str, password: str,
               headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(status, Retry-After, cookies) of one POST /login."""
    req = urllib.request.Request(
        server.url + "login", method="POST",
        data=urllib.parse.urlencode({"username": user, "password": password}).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            cookies = [h.split(";", 1)[0] for h in r.headers.get_all("Set-Cookie") or []]
            return r.status, "", "; ".join(cookies)
    except urllib.error.HTTPError as err:
        detail = err.read()
        if err.code == 429:
            assert json.loads(detail)["detail"].startswith("too many failed logins")
        return err.code, err.headers.get("Retry-After", ""), ""


def _rest_search(server: Server, headers: dict[str, str]) -> str:
    """One /search through Gradio's REST API with `headers`; the status line it shows.
    Every input of the event is sent (the REST route fills none): query, k, the filters,
    collection, min_prob, diversity."""
    data = json.dumps({"data": ["blue ford", 2, *NO_FILTERS, "", 0, 0]}).encode()
    status, body = _get(server.url + "gradio_api/call/search",
                        {"Content-Type": "application/json", **headers}, "POST", data)
    assert status == 200, body[:300]
    event = json.loads(body)["event_id"]
    status, stream = _get(server.url + f"gradio_api/call/search/{event}", headers)
    assert status == 200, stream[:300]
    lines = stream.decode().splitlines()
    at = lines.index("event: complete")
    outputs = json.loads(lines[at + 1].removeprefix("data: "))
    return str(outputs[1])


def test_login_guessing_is_throttled_per_client_and_per_user(second_world: World,
                                                           tmp_path: Path) -> None:
    """Issue 22 item 11: 5 failures allowed in the window. 40 wrong passwords sent 8 at a
    time: 5 are checked (400), 35 refused with 429 unchecked, so the right password is
    refused too while the client is locked out, and so is the user name from another
    client (a named proxy's X-Forwarded-For makes one); a fresh client and user are still
    checked. After the window (the server's throttle clock is moved on) the right
    password works. With that proxy named, a rotated header does make other clients:
    each of four searches gets its own bucket (the positive side of item 12)."""
    from concurrent.futures import ThreadPoolExecutor

    skew = tmp_path / "clock-skew"
    servers = run_server(second_world, tmp_path / "server.log", {
        "CARSEARCH_UI_AUTH": "ann:s3cret", "CARSEARCH_UI_LOGIN_FAILURES": "5",
        "CARSEARCH_UI_LOGIN_WINDOW_S": "600", "CARSEARCH_UI_TRUSTED_PROXIES": "127.0.0.1",
        "CARSEARCH_UI_SEARCHES_PER_S": "0.001", "CARSEARCH_UI_SEARCH_BURST": "2",
        "TEST_CLOCK_SKEW": str(skew)}, python_args=["-c", SKEWED_CLOCK])
    server = next(servers)
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: _try_login(server, "ann", f"guess{i}"),
                                    range(40)))
        statuses = [a[0] for a in answers]
        assert statuses.count(400) == 5 and statuses.count(429) == 35, statuses
        assert all(1 <= int(a[1]) <= 600 for a in answers if a[0] == 429)
        assert _try_login(server, "ann", "s3cret")[0] == 429  # not even checked
        other = {"X-Forwarded-For": "198.51.100.7"}
        assert _try_login(server, "ann", "s3cret", other)[0] == 429  # the user is held
        assert _try_login(server, "carl", "nope", {"X-Forwarded-For": "198.51.100.8"})[0] \
            == 400
        skew.write_text("601")  # the window has passed
        status, _, cookie = _try_login(server, "ann", "s3cret")
        assert status == 200 and cookie
        assert _get(server.url + "gradio_api/info", {"Cookie": cookie})[0] == 200
        served = [_rest_search(server, {"Cookie": cookie,
                                        "X-Forwarded-For": f"203.0.113.{i}"})
                  for i in range(4)]
        assert all("results for" in s for s in served), served
    finally:
        servers.close()
    assert "login refused for client 127.0.0.1" in (tmp_path / "server.log").read_text()


def test_a_rotated_forwarded_header_does_not_make_a_new_client(second_world: World,
                                                              tmp_path: Path) -> None:
    """Issue 22 item 12: with no proxy named (the default), X-Forwarded-For from loopback
    is not believed: four searches, each with another address in the header, share the
    loopback client's bucket of 2, so the third is refused as it is without the header."""
    servers = run_server(second_world, tmp_path / "server.log", {
        "CARSEARCH_UI_SEARCHES_PER_S": "0.001", "CARSEARCH_UI_SEARCH_BURST": "2"})
    server = next(servers)
    try:
        statuses = [_rest_search(server, {"X-Forwarded-For": f"203.0.113.{i}"})
                    for i in range(4)]
    finally:
        servers.close()
    assert ["results for" in s for s in statuses] == [True, True, False, False], statuses
    assert statuses[2].startswith("**Error:** too many searches"), statuses
