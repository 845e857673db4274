"""What the search page does, without any Gradio: plain functions over the platform.

`SearchPage` turns the page's inputs (query text, picked filters, an upload, a
selected result) into calls on the platform's search service and shapes the answer
for display: gallery items (thumbnail path, caption), a one-line status, the filter
chips read from the query. Retrieval itself is the search service's; this module only
parses, validates, calls and formats. Errors a person can fix come back as
`PageError` (a CarsearchError) with the message the page shows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image as PILImage
from pydantic import ValidationError

from carsearch.platform.errors import CarsearchError, ImageRejectedError, QueryError
from carsearch.platform.images import DECODE_MAX_SIDE, load_image_bytes
from carsearch.platform.runtime import Platform
from carsearch.platform.search.nlfilters import (
    FilterChip,
    FilterVocabulary,
    ParsedQuery,
    VocabularyCache,
    filters_from_chips,
    validate_filters,
)
from carsearch.platform.search.service import SearchHit, SearchRequest, SearchResult
from carsearch.platform.thumbnails import ThumbnailCache
from carsearch.platform.vectors.filters import SearchFilters

log = logging.getLogger(__name__)

ANY = "any"
DEFAULT_MAX_UPLOAD_BYTES = 20_000_000


class PageError(CarsearchError):
    """A problem the page shows as a message (bad input, no model, unusable upload)."""


class Labeller(Protocol):
    """The labelling queue as the Label tab uses it (lifecycle.labelling.PlatformLabeller,
    handed in by `serve`: the ui imports only the platform)."""

    def open_tasks(self) -> list[dict[str, Any]]: ...

    def apply(self, task_id: int, fields: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class PickedFilters:
    """The filter widgets' values as the page sends them."""

    make: tuple[str, ...] = ()
    body: tuple[str, ...] = ()
    colour: tuple[str, ...] = ()
    source: tuple[str, ...] = ()
    year_from: str | int | None = None
    year_to: str | int | None = None
    # Which image collection (None: vehicles, or the only one) and the relevance cut-off
    # on text hits' model probability (None or 0: none).
    collection: str | None = None
    min_prob: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "make": self.make, "body": self.body, "colour": self.colour, "source": self.source,
            "year_min": _year_or_none(self.year_from, "from"),
            "year_max": _year_or_none(self.year_to, "to"),
        }


def _year_or_none(value: str | int | float | None, which: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", ANY)):
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        raise PageError(f"year {which} must be a year like 2012, not {value!r}") from None


@dataclass
class PageResult:
    """One answer, shaped for the page."""

    items: list[tuple[str, str]]  # (thumbnail path, caption)
    hits: list[dict[str, Any]]
    status: str
    query_log_id: int | None = None
    parsed: ParsedQuery | None = None
    notes: list[str] = field(default_factory=list)
    # Exclusions read from the text (chips the person can untick), and the cursor of the
    # next page (None: the last one).
    exclusions: tuple[FilterChip, ...] = ()
    next_cursor: str | None = None


@dataclass(frozen=True)
class SearchControls:
    """The page's controls beyond the query and the filters: the exclusion chips the
    person unticked, the order, folding near-duplicates, the thumbs given in this
    session (re-ranking at once), the next page's cursor, and the image's weight in an
    image + text query. The defaults are the plain search."""

    drop_exclusions: tuple[str, ...] = ()
    sort: str = "score"
    collapse_duplicates: bool = False
    liked: tuple[int, ...] = ()
    disliked: tuple[int, ...] = ()
    cursor: str | None = None
    image_weight: float | None = None
    diversity: float = 0.0

    def is_plain(self) -> bool:
        return self == SearchControls()

    def options(self) -> dict[str, Any]:
        """The SearchRequest fields these set."""
        out: dict[str, Any] = {
            "drop_exclusions": self.drop_exclusions, "sort": self.sort,
            "collapse_duplicates": self.collapse_duplicates, "liked": self.liked,
            "disliked": self.disliked, "cursor": self.cursor,
            "diversity": self.diversity}
        if self.image_weight is not None:
            out["image_weight"] = self.image_weight
        return out


def caption(hit: SearchHit) -> str:
    """"#1 · 0.812 · Chevrolet Silverado 1500 2012 · red · stanford", and for a hit of a
    relaxed search what it does not meet ("· not body: coupe"), then for a text query the
    model's probability ("· p=0.031"), the photographer, what was embedded ("box
    12,30,200,150" or "whole frame") and the description if any."""
    name = " ".join(str(p) for p in (hit.make, hit.model, hit.year) if p) or "unlabelled"
    parts = [f"#{hit.rank}", f"{hit.score:.3f}", name]
    if hit.body_type:
        parts.append(hit.body_type)
    parts.append(hit.colour or "colour ?")
    if hit.source:
        parts.append(hit.source)
    if hit.unmet:
        parts.append("not " + ", ".join(hit.unmet))
    if hit.probability is not None:
        parts.append(f"p={hit.probability:.3g}")  # three significant digits
    if hit.duplicates:
        parts.append(f"+{hit.duplicates} duplicate{'s' if hit.duplicates > 1 else ''}")
    if hit.photographer:
        parts.append(f"by {hit.photographer}")
    # what the vector was embedded from: the vehicle's box, or the whole frame
    parts.append("box " + ",".join(str(v) for v in hit.box) if hit.box else "whole frame")
    if hit.description:
        text = " ".join(hit.description.split())
        parts.append(text if len(text) <= 90 else text[:89] + "…")
    return " · ".join(parts)


def describe_filters(filters: SearchFilters) -> str:
    bits: list[str] = []
    for name in ("make", "body", "colour", "source"):
        values = getattr(filters, name)
        if values:
            bits.append(f"{name} {' / '.join(values)}")
    lo, hi = filters.year_min, filters.year_max
    if lo is not None or hi is not None:
        bits.append(f"year {lo}" if lo == hi else f"years {lo or '…'}–{hi or '…'}")
    return ", ".join(bits) or "none"


class SearchPage:
    """The page's actions over one Platform. Thread-safe: Gradio calls it from a pool."""

    def __init__(
        self,
        platform: Platform,
        *,
        vocab_ttl_s: float = 60.0,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        labeller: Labeller | None = None,
    ) -> None:
        self.platform = platform
        self.labeller = labeller
        self.settings = platform.settings
        self.service = platform.search
        self.vocab_cache = VocabularyCache(platform.db, ttl_s=vocab_ttl_s)
        self.thumbs = ThumbnailCache.for_settings(self.settings)
        self.max_upload_bytes = max_upload_bytes

    def warm_up(self) -> None:
        """Load the serving encoder now, so the first query does not wait for it, and
        start building the search mirror (platform/vectors/mirror.py) where one is used."""
        try:
            self.service.warm()
        except CarsearchError as exc:  # no model yet: the page says so on each search
            log.warning("search page starts without a usable model: %s", exc)

    # -- inputs ----------------------------------------------------------------------------
    def vocabulary(self) -> FilterVocabulary:
        return self.vocab_cache.get()

    def picked_filters(self, picked: PickedFilters) -> SearchFilters:
        try:
            return validate_filters(picked.as_dict(), self.vocabulary())
        except QueryError as exc:
            raise PageError(f"filter: {exc}") from None

    # -- searches --------------------------------------------------------------------------
    def search_text(
        self,
        query: str,
        k: int,
        picked: PickedFilters,
        keep_chips: list[str] | None = None,
        controls: SearchControls | None = None,
    ) -> PageResult:
        """Text search; `keep_chips` (keys) drops the parsed filters the person removed. A
        collection without vehicle labels reads no filters from the text. ``controls``:
        the exclusions unticked, sort, duplicates, thumbs, next page (search_controls)."""
        collection = self._collection(picked)
        extra = (controls or SearchControls()).options()
        request = SearchRequest(query, k, self.picked_filters(picked), keep_chips=keep_chips,
                                min_prob=picked.min_prob or None, collection=collection,
                                vocabulary=self.vocabulary(), **extra)
        result = self._guard(lambda: self.service.search(request))
        parsed = ParsedQuery(result.query or "", result.chips, result.ignored,
                             filters_from_chips(result.chips))
        notes = [f"not filtered on {n}" for n in result.ignored]
        return self._shape(result, result.effective or SearchFilters(), parsed=parsed,
                           notes=notes)

    def search_upload(self, upload: str | Path | None, k: int, picked: PickedFilters) -> PageResult:
        if upload is None or not isinstance(upload, str | Path):
            raise PageError("choose an image file to search with")
        img = self._read_upload(upload)
        filters = self.picked_filters(picked)
        collection = self._collection(picked)
        result = self._guard(lambda: self.service.search_image(img, k, filters, collection))
        return self._shape(result, filters)

    def classify_upload(
        self, upload: str | Path | None, labels: str | None, template: str | None = None,
    ) -> tuple[dict[str, float], str]:
        """Zero-shot: ({label: probability}, a one-line summary) for an uploaded image."""
        from carsearch.platform.search.classify import DEFAULT_TEMPLATE

        if upload is None or not isinstance(upload, str | Path):
            raise PageError("choose an image file to classify")
        if not isinstance(labels, str) or not labels.strip():
            raise PageError('give the labels, comma-separated: "sedan, pickup, suv"')
        img = self._read_upload(upload)
        scores = self.service.classify([img], labels, template or DEFAULT_TEMPLATE)[0]
        best = scores[0]
        note = (f"{len(scores)} labels, each its own probability (they need not sum to "
                f"one); most likely: {best.label} ({best.probability:.3f})")
        return {sc.label: sc.probability for sc in scores}, note

    def _read_upload(self, upload: str | Path) -> PILImage.Image:
        """An uploaded file as an image, through the size cap and the safe decoder."""
        path = Path(upload)
        try:
            size = path.stat().st_size if path.is_file() else 0
        except (OSError, ValueError):  # a name the file system refuses
            raise PageError("upload rejected: not a readable file") from None
        if size > self.max_upload_bytes:
            raise PageError(
                f"upload rejected: {size} bytes is over the limit of {self.max_upload_bytes}"
            )
        try:
            img = load_image_bytes(
                path.read_bytes(), name=path.name, max_pixels=self.settings.max_image_pixels,
                max_bytes=self.max_upload_bytes, max_side=DECODE_MAX_SIDE,
            )
        except ImageRejectedError as exc:
            raise PageError(f"upload rejected: {exc.reason}") from None
        except (OSError, ValueError):
            raise PageError("upload rejected: not a readable file") from None
        return img

    def more_like_this(
        self, image_id: int | str | None, k: int, picked: PickedFilters
    ) -> PageResult:
        if image_id in (None, "", 0):
            raise PageError("select a result first, then ask for more like it")
        filters = self.picked_filters(picked)
        collection = self._collection(picked)
        result = self._guard(lambda: self.service.search_similar(image_id, k, filters,
                                                                 collection))
        return self._shape(result, filters)

    def search_image_text(
        self, text: str | None, k: int, picked: PickedFilters, *,
        upload: str | Path | None = None, image_id: int | str | None = None,
        controls: SearchControls | None = None,
    ) -> PageResult:
        """An upload or a selected result, with a text ("but blue", "newer") and the
        controls, as one query: the text's facets filter or exclude, its other words
        move the image's vector (SearchService.search). Without text or controls it is
        the plain image search."""
        controls = controls or SearchControls()
        text = text.strip() if isinstance(text, str) else ""
        if not text and controls.is_plain():
            if upload is not None:
                return self.search_upload(upload, k, picked)
            return self.more_like_this(image_id, k, picked)
        k = self.service.check_k(k)
        img = iid = None
        if upload is not None:
            if not isinstance(upload, str | Path):
                raise PageError("choose an image file to search with")
            img = self._read_upload(upload)
        elif image_id in (None, "", 0):
            raise PageError("select a result or upload an image first")
        else:
            iid = self.service.check_image_id(image_id)
        request = SearchRequest(text or None, k, self.picked_filters(picked),
                                min_prob=picked.min_prob or None,
                                collection=self._collection(picked),
                                vocabulary=self.vocabulary(), image=img, image_id=iid,
                                **controls.options())
        result = self._guard(lambda: self.service.search(request))
        return self._shape(result, result.effective or self.picked_filters(picked))

    def collections(self) -> tuple[list[str], str | None]:
        """The collections' names and the default one (for the page's picker)."""
        from carsearch.platform import collections

        names = [c.name for c in collections.list_all(self.platform.db)]
        try:
            default: str | None = self.service.collection(None)
        except CarsearchError:
            default = names[0] if names else None
        return names, default

    @staticmethod
    def _collection(picked: PickedFilters) -> str | None:
        """The picked collection's name (None: the service's default); the service
        resolves and checks it, with k, the cut-off and the filters' kinds."""
        name = picked.collection or None
        if name is not None and not isinstance(name, str):
            raise PageError("pick a collection from the list")
        return name

    def _guard(self, call: Any) -> SearchResult:
        try:
            result: SearchResult = call()
        except ImageRejectedError as exc:
            raise PageError(f"image rejected: {exc.reason}") from None
        except ValidationError as exc:
            raise PageError(f"filter: {exc.errors()[0]['msg']}") from None
        return result

    def _shape(
        self,
        result: SearchResult,
        filters: SearchFilters,
        *,
        parsed: ParsedQuery | None = None,
        notes: list[str] | None = None,
    ) -> PageResult:
        qid = result.query_log_id
        items = [(str(self.thumbs.get(h.image_id, h.path)), caption(h)) for h in result.hits]
        what = f"'{result.query}'" if result.query else f"{result.kind} query"
        status = (
            f"{len(result.hits)} results for {what} in {result.latency_ms:.0f} ms · "
            f"filters: {describe_filters(filters)} · model {result.version}"
        )
        if result.collection != "vehicles":
            status += f" · collection {result.collection}"
        cut = result.filters.get("min_prob")
        if cut:
            status += f" · probability ≥ {cut:.3g}"
        if not result.hits:
            status += " · nothing matched the filters you picked: widen them"
        if result.relaxed:
            status += f" · {result.relaxed}"
        if notes:
            status += " · " + "; ".join(notes)
        exclusions = tuple(getattr(result, "exclusions", ()))
        if exclusions:
            status += " · excluding " + ", ".join(c.label for c in exclusions)
        negative = tuple(getattr(result, "negative_terms", ()))
        if negative:
            status += " · away from " + ", ".join(f"'{t}'" for t in negative)
        hits = [h.to_dict() for h in result.hits]
        return PageResult(items, hits, status, qid, parsed, list(notes or []),
                          exclusions, getattr(result, "next_cursor", None))

    # -- feedback --------------------------------------------------------------------------
    def feedback(
        self, query_log_id: int | None, image_id: int | str | None, vote: int,
        query: str | None = None,
    ) -> int:
        """Store a thumbs-up (+1) / thumbs-down (-1) on a result; returns the row id
        (`SearchService.record_feedback`, the call the API makes)."""
        try:
            return self.service.record_feedback(query_log_id, image_id, vote, query)
        except QueryError as exc:
            raise PageError(str(exc)) from None

    # -- labelling ---------------------------------------------------------------------------
    def _labeller(self) -> Labeller:
        if self.labeller is None:
            raise PageError("labelling is not available in this process")
        return self.labeller

    def label_tasks(self) -> list[tuple[str, int]]:
        """(choice label, task id) for each open labelling task."""
        return [(f"task {t['id']}: {t['size'] - t['labelled']} to label, nearest "
                 f"{t['nearest_class'] or '?'}", int(t["id"]))
                for t in self._labeller().open_tasks()]

    def label_task(self, task_id: int | str | None) -> tuple[list[tuple[str, str]],
                                                            dict[str, Any], str]:
        """A task's images still to label (thumbnails), its suggested label, a note."""
        tid = self._task_id(task_id)
        task = next((t for t in self._labeller().open_tasks() if t["id"] == tid), None)
        if task is None:
            raise PageError(f"no open labelling task {tid}")
        from carsearch.platform.db import images as image_rows

        rows = image_rows.by_ids(self.platform.db, task["unlabelled_ids"])
        items = [(str(self.thumbs.get(i, rows[i].path)), f"image {i}")
                 for i in task["unlabelled_ids"] if i in rows]
        note = (f"task {tid} (drift report {task['drift_report_id']}): {len(items)} of "
                f"{task['size']} images to label; nearest known class "
                f"{task['nearest_class'] or 'unknown'}. The labels apply to all of them.")
        return items, dict(task["suggested"]), note

    def apply_labels(self, task_id: int | str | None, fields: dict[str, Any]) -> str:
        tid = self._task_id(task_id)
        given = {k: v for k, v in fields.items()
                 if isinstance(v, str | int | float) and str(v).strip()}
        if not given.get("make"):
            raise PageError("give at least the make")
        try:
            report = self._labeller().apply(tid, given)
        except CarsearchError as exc:
            raise PageError(str(exc)) from None
        self.vocab_cache.invalidate()  # the new make is a filter value from now on
        self.service.vocabulary.invalidate()
        done = " · task done" if tid in report.tasks_done else ""
        return f"labelled {report.applied} image(s) of task {tid}{done}"

    @staticmethod
    def _task_id(task_id: int | str | None) -> int:
        try:
            tid = int(str(task_id))
        except ValueError:
            raise PageError("pick a labelling task first") from None
        if tid < 1:
            raise PageError("pick a labelling task first")
        return tid

    # -- helpers for timing ----------------------------------------------------------------
    def timed_search(self, query: str, k: int = 10) -> float:
        """Milliseconds for one text search through the page's path (the benchmark's unit)."""
        t0 = time.perf_counter()
        self.search_text(query, k, PickedFilters())
        return (time.perf_counter() - t0) * 1000.0
