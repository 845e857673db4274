"""Images given as URLs: manifests that carry them, and a careful downloader.

Manifests: Unsplash Lite's `photos.tsv*` (tab-separated; `photo_id`,
`photo_image_url`, `photo_description`, `ai_description`, `photographer_username`, ...)
and a generic CSV or JSONL with a `url` column (other columns become metadata, as in a
path manifest). `read_url_manifest` turns either into `UrlRow`s.

The downloader fetches with bounded concurrency (a thread pool), a timeout per request,
retries with exponential backoff (and jitter) on what may pass (timeouts, connection
errors, truncated bodies, HTTP 5xx and 429), a size cap enforced while streaming (a
`Content-Length` over it is refused before any byte is read), a content-type check
(image/*), a decode check with the platform's safe decoder (size and decompression-bomb
limits), at most `max_redirects` redirects, and a progress bar. A fetched file goes to
the content-addressed image store (``IMAGE_DIR/ab/<sha256>.ext``).

Bodies are asked for and read as they are sent: the request says ``Accept-Encoding:
identity`` and a response with any other ``Content-Encoding`` (gzip, br, ...) is refused
unread, so the size cap counts the bytes that would be stored and a few hundred
compressed bytes cannot inflate to gigabytes in memory. Connections go only to public
addresses and the networks a setting allows (ingest/netguard.py), checked on the address
each connection, redirect hops included, is opened to.

Resume: every outcome is appended to a ledger (JSON lines, one per attempt's result).
A URL whose fetched file is still in the store with its hash is not fetched again; a
URL that failed for good (HTTP 4xx, not an image, too large, a redirect loop) is not
asked again either unless ``retry_failed``; one that failed for a reason that may pass
is tried again on the next run. Each failure keeps its reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from carsearch.ingest.netguard import AddressPolicy, AddressRefused, IPNetwork, guarded_transport
from carsearch.platform.errors import CarsearchError, ImageRejectedError
from carsearch.platform.images import load_image_bytes, sha256_file

log = logging.getLogger(__name__)

_SUFFIX = {"image/jpeg": ".jpg", "image/jpg": ".jpg", "image/png": ".png",
           "image/webp": ".webp", "image/gif": ".gif", "image/bmp": ".bmp",
           "image/tiff": ".tif"}
# Unsplash Lite's columns and what the platform calls them.
_UNSPLASH = {"photo_id": "photo_id", "photo_url": "page_url",
             "photographer_username": "photographer", "ai_description": "ai_description"}


@dataclass(frozen=True)
class UrlRow:
    """One manifest row that names its image by URL."""

    line: int
    url: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Fetched:
    """What became of one URL: ``fetched`` now, ``cached`` (fetched before, still in the
    store), or ``failed`` with its reason (``final`` when asking again would not help)."""

    url: str
    status: Literal["fetched", "cached", "failed"]
    path: str | None = None
    sha256: str | None = None
    bytes: int = 0
    attempts: int = 0
    reason: str | None = None
    final: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Permanent(Exception):
    """A failure asking again will not fix."""


class _Transient(Exception):
    """A failure that may pass."""


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def read_url_manifest(path: Path) -> list[UrlRow]:
    """Rows of an Unsplash `photos.tsv*` or of a CSV / JSONL with a `url` column.
    CarsearchError for a manifest that is not one of those; a row without a usable URL
    is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise CarsearchError(f"no manifest at {path}")
    name = path.name.lower()
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open(newline="", encoding="utf-8") as fh:
        if ".tsv" in name or ".csv" in name:
            dialect = "excel-tab" if ".tsv" in name else "excel"
            reader = csv.DictReader(fh, dialect=dialect)
            rows = [(n, dict(r)) for n, r in enumerate(reader, 2)]
        else:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise CarsearchError(f"{path}:{n}: not JSON ({exc.msg})") from None
    out: list[UrlRow] = []
    for n, row in rows:
        url = str(row.get("photo_image_url") or row.get("url") or "").strip()
        if not _is_url(url):
            raise CarsearchError(f"{path}:{n}: no http(s) URL in 'url' or 'photo_image_url'")
        meta: dict[str, Any] = {}
        for key, value in row.items():
            if key in (None, "url", "photo_image_url") or value in ("", None):
                continue
            if key == "photo_description":
                meta["description"] = value
            elif key in _UNSPLASH:
                meta[_UNSPLASH[key]] = value
            elif "photo_image_url" not in row:  # a generic manifest keeps every column
                meta[key] = value
        if "description" not in meta and meta.get("ai_description"):
            meta["description"] = meta["ai_description"]
        meta["url"] = url
        out.append(UrlRow(n, url, meta))
    return out


def is_url_manifest(path: Path) -> bool:
    """Whether a manifest names its images by URL (its first row has one)."""
    path = Path(path)
    if ".tsv" in path.name.lower():
        return True
    with path.open(newline="", encoding="utf-8") as fh:
        if path.suffix.lower() == ".csv":
            header = next(csv.reader(fh), [])
            return "url" in header and "path" not in header
        for line in fh:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and "url" in first and "path" not in first
    return False


class Downloader:
    """Fetches URLs into the content-addressed image store (see the module docstring)."""

    def __init__(
        self,
        image_dir: Path,
        ledger: Path,
        *,
        concurrency: int = 4,
        timeout_s: float = 15.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_bytes: int = 20_000_000,
        max_redirects: int = 5,
        max_pixels: int = 40_000_000,
        allow_networks: Sequence[IPNetwork] | str = (),
    ) -> None:
        if concurrency < 1 or retries < 0:
            raise ValueError("concurrency must be at least 1 and retries at least 0")
        self.image_dir = Path(image_dir)
        self.ledger = Path(ledger)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.max_pixels = max_pixels
        self.policy = AddressPolicy(allow_networks)
        self._lock = threading.Lock()
        self.sleep = time.sleep  # tests make the backoff instant

    # -- the ledger ----------------------------------------------------------------------
    def known(self) -> dict[str, Fetched]:
        """The last recorded outcome of each URL."""
        out: dict[str, Fetched] = {}
        if not self.ledger.is_file():
            return out
        with self.ledger.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = Fetched(**json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    continue  # a line cut short by a crash: that URL is simply asked again
                out[rec.url] = rec
        return out

    def _record(self, rec: Fetched) -> None:
        with self._lock:
            self.ledger.parent.mkdir(parents=True, exist_ok=True)
            with self.ledger.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec.to_dict()) + "\n")

    # -- fetching ------------------------------------------------------------------------
    def fetch_all(self, urls: Sequence[str], *, progress: bool = True,
                  retry_failed: bool = False) -> dict[str, Fetched]:
        """Every URL's outcome; each distinct URL is fetched at most once per run and
        not at all when the ledger says it is done."""
        known = self.known()
        results: dict[str, Fetched] = {}
        todo: list[str] = []
        for url in dict.fromkeys(urls):
            rec = known.get(url)
            if rec is not None and rec.status != "failed" and rec.path and Path(
                    rec.path).is_file() and sha256_file(Path(rec.path)) == rec.sha256:
                results[url] = Fetched(url, "cached", rec.path, rec.sha256, rec.bytes)
            elif rec is not None and rec.status == "failed" and rec.final and not retry_failed:
                results[url] = rec
            else:
                todo.append(url)
        # One client for the run: its connection pool (one connection per worker) is
        # reused from URL to URL instead of a new connection and TLS set-up each.
        with self._client() as client, ThreadPoolExecutor(self.concurrency) as pool, tqdm(
                total=len(todo), desc="download", unit="img", disable=not progress) as bar:
            for rec in pool.map(lambda url: self._fetch_logged(url, client), todo):
                results[rec.url] = rec
                bar.update(1)
        return results

    def _client(self) -> Any:
        import httpx

        return httpx.Client(follow_redirects=True, max_redirects=self.max_redirects,
                            timeout=self.timeout_s, trust_env=False,
                            transport=guarded_transport(self.policy,
                                                        max_connections=self.concurrency))

    def _fetch_logged(self, url: str, client: Any) -> Fetched:
        rec = self.fetch(url, client)
        self._record(rec)
        if rec.status == "failed":
            log.warning("download failed: %s: %s", url, rec.reason)
        return rec

    def fetch(self, url: str, client: Any = None) -> Fetched:
        """One URL, with retries for what may pass (on ``client``, else a client of its
        own)."""
        if client is None:
            with self._client() as own:
                return self.fetch(url, own)
        attempts = 0
        while True:
            attempts += 1
            try:
                data, ctype = self._get(url, client)
                return self._keep(url, data, ctype, attempts)
            except _Permanent as exc:
                return Fetched(url, "failed", attempts=attempts, reason=str(exc), final=True)
            except _Transient as exc:
                if attempts > self.retries:
                    return Fetched(url, "failed", attempts=attempts,
                                   reason=f"{exc} (after {attempts} attempts)")
                delay = self.backoff_s * 2 ** (attempts - 1)
                self.sleep(delay * (0.5 + random.random()))  # with jitter

    def _get(self, url: str, client: Any) -> tuple[bytes, str]:
        import httpx

        try:
            with client.stream("GET", url, headers={"Accept": "image/*",
                                                    "Accept-Encoding": "identity"}) as resp:
                code = resp.status_code
                if code == 429 or code >= 500:
                    raise _Transient(f"HTTP {code}")
                if code >= 400:
                    raise _Permanent(f"HTTP {code}")
                ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if not ctype.startswith("image/"):
                    raise _Permanent(f"not an image (content-type {ctype or 'none'})")
                encodings = [e.strip().lower() for v in resp.headers.get_list(
                    "content-encoding") for e in v.split(",") if e.strip()]
                if any(e != "identity" for e in encodings):
                    raise _Permanent(f"refused: an encoded body (Content-Encoding "
                                     f"{', '.join(encodings)}); only identity is accepted")
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(
                        declared) > self.max_bytes:
                    raise _Permanent(f"too large: {declared} bytes (limit {self.max_bytes})")
                chunks, size = [], 0
                for chunk in resp.iter_raw():  # as sent: nothing is decoded
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise _Permanent(f"too large: over {self.max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks), ctype
        except AddressRefused:
            raise _Permanent(str(AddressRefused())) from None
        except httpx.TooManyRedirects:
            raise _Permanent(f"redirect loop (more than {self.max_redirects} redirects)") \
                from None
        except httpx.TimeoutException:
            raise _Transient(f"timed out after {self.timeout_s:g} s") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise _Transient(f"truncated or broken response ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed ({type(exc).__name__})") from None
        except httpx.InvalidURL as exc:
            raise _Permanent(f"not a usable URL ({exc})") from None

    def _keep(self, url: str, data: bytes, ctype: str, attempts: int) -> Fetched:
        try:
            load_image_bytes(data, name=url, max_pixels=self.max_pixels,
                             max_bytes=self.max_bytes)
        except ImageRejectedError as exc:
            raise _Permanent(f"not a usable image: {exc.reason}") from None
        digest = hashlib.sha256(data).hexdigest()
        dest = self.image_dir / digest[:2] / f"{digest}{_SUFFIX.get(ctype, '.bin')}"
        if not (dest.is_file() and sha256_file(dest) == digest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
            tmp.write_bytes(data)
            tmp.replace(dest)
        return Fetched(url, "fetched", str(dest), digest, len(data), attempts)


def failures(rows: Iterable[UrlRow], results: dict[str, Fetched]) -> list[dict[str, Any]]:
    """Per manifest row that has no image: its line, URL and reason."""
    return [{"line": r.line, "url": r.url, "reason": results[r.url].reason}
            for r in rows if results[r.url].status == "failed"]
