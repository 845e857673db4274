"""The Gradio search page: layout and event wiring over `SearchPage`.

Tabs: Search (query box, chips read from the query and the exclusions read from "not …",
filters, sort, folding near-duplicates, results gallery with "more results", image upload
and "more like this" with an optional "…but" text, thumbs up/down that re-rank at once),
Classify (zero-shot labels for an upload), Status (serving version, index size, ingest
queue, last drift report, ANN audit, versions) and Evaluation (the latest metrics, and the
served view of the serving version: ui/served_eval.py).
Every handler turns a `CarsearchError` into its one-line message on the page (a toast
and the status line) and any other exception into "internal error (request id ...)",
logging the trace under that id; no exception text reaches a browser. Searches and
uploads are held to per-client limits (ui/guard.py), and the app runs behind
`RequestGate` (login on every route, login attempts throttled, only the thumbnail store
served, body size cap). A client's address is the connection's peer; forwarded headers
count only from the proxies CARSEARCH_UI_TRUSTED_PROXIES names.

The JSON API (ui/api.py) is mounted at /api/v1 on the same server, behind the same gate.

API names (for `gradio_client`): /search, /refine, /search_controlled, /more_results,
/image_search, /more_like_this,
/select_result, /classify, /vote_up, /vote_down, /page_info, /status, /evaluation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from carsearch.platform.errors import CarsearchError, ConfigError
from carsearch.platform.runtime import Platform
from carsearch.platform.thumbnails import THUMB_DIR
from carsearch.ui.api import ApiMount, build_api
from carsearch.ui.guard import ClientLimits, GateConfig, LoginThrottle, RequestGate, parse_size
from carsearch.ui.page import (
    ANY,
    Labeller,
    PageResult,
    PickedFilters,
    SearchControls,
    SearchPage,
)
from carsearch.ui.render import evaluation_table, page_header, status_markdown
from carsearch.ui.served_eval import served_section

log = logging.getLogger(__name__)

SORTS = ("score", "year", "arrival")
DEFAULT_K = 12
MAX_K_ON_PAGE = 100
CSS = "#status {min-height: 1.5em} #results .caption-label {white-space: normal}"
NO_AUTH_BANNER = ("**No login:** this page was started with `--no-auth` and answers anyone "
                  "who can reach it.")


@dataclass(frozen=True)
class LaunchOptions:
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None
    max_file_size: str = "20mb"
    quiet: bool = True
    # Started with --no-auth on a non-loopback address: the page says so.
    no_auth: bool = False


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """CARSEARCH_UI_AUTH "user:password" -> (user, password); empty -> None."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError("CARSEARCH_UI_AUTH must be user:password (both non-empty)")
    return user, password


def error_message(exc: BaseException, where: str) -> str:
    """The one line a person sees: a platform error's own message, or for anything else
    a generic line with a request id, the trace logged under that id."""
    if isinstance(exc, CarsearchError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    rid = uuid.uuid4().hex[:12]
    log.error("internal error (request id %s) in %s", rid, where, exc_info=exc)
    return f"internal error (request id {rid})"


def _error(exc: Exception, where: str = "page") -> str:
    msg = error_message(exc, where)
    gr.Warning(msg)
    return f"**Error:** {msg}"


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A handler's last line of defence: an exception it did not answer itself becomes
    gr.Error with the one-line message (shown with show_error off; no trace text)."""

    @functools.wraps(fn)
    def handler(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise gr.Error(error_message(exc, fn.__name__)) from None

    return handler


def _client(request: gr.Request | None) -> str:
    client = getattr(request, "client", None)
    return str(getattr(client, "host", None) or "local")


def _picked(make: Any, body: Any, colour: Any, source: Any, y0: Any, y1: Any,
            collection: Any = None, min_prob: Any = None) -> PickedFilters:
    def tup(v: Any) -> tuple[str, ...]:
        if v is None or v == "":
            return ()
        if isinstance(v, list | tuple | set):
            return tuple(str(x) for x in v)
        return (str(v),)  # one value, whatever a client sent

    return PickedFilters(tup(make), tup(body), tup(colour), tup(source), y0, y1,
                         collection or None, min_prob)


class PageHandlers:
    """Gradio callbacks: unpack widgets, call `SearchPage`, shape updates, catch errors.

    The searching handlers take the filter widgets by name and, last, the request
    Gradio injects (None when called directly): its client's search tokens and upload
    slots are checked first."""

    def __init__(self, page: SearchPage, limits: ClientLimits | None = None) -> None:
        self.page = page
        self.limits = limits

    def _outputs(self, res: PageResult) -> tuple[Any, ...]:
        """gallery, status, hits, query log id, selected, detail, and three states: the
        next page's cursor, the exclusions read from the text (label, key), the items
        shown (for "more results" to add to)."""
        return (res.items, res.status, res.hits, res.query_log_id, "", "", res.next_cursor,
                [(c.label, c.key) for c in res.exclusions], res.items)

    def _failed(self, exc: Exception, where: str) -> tuple[Any, ...]:
        return [], _error(exc, where), [], None, "", "", None, [], []

    def _admit(self, request: gr.Request | None) -> None:
        if self.limits is not None:
            self.limits.take_search(_client(request))

    def _upload_slot(self, request: gr.Request | None) -> Any:
        if self.limits is None:
            return contextlib.nullcontext()
        return self.limits.upload_slot(_client(request))

    def search(self, query: str, k: int, make: Any = None, body: Any = None,
               colour: Any = None, source: Any = None, year_from: Any = None,
               year_to: Any = None, collection: Any = None, min_prob: Any = None,
               diversity: Any = None,
               request: gr.Request | None = None) -> tuple[Any, ...]:
        """A new query: read its chips (all ticked) and search."""
        picked = (make, body, colour, source, year_from, year_to, collection, min_prob)
        try:
            self._admit(request)
            res = self.page.search_text(query, k, _picked(*picked),
                                        controls=SearchControls(diversity=_share(diversity)))
        except Exception as exc:
            return (*self._failed(exc, "search"), gr.update(choices=[], value=[]))
        assert res.parsed is not None
        choices = [(c.label, c.key) for c in res.parsed.chips]
        chips = gr.update(choices=choices, value=res.parsed.keys())
        return (*self._outputs(res), chips)

    def refine(self, query: str, chips: list[str] | None, k: int, make: Any = None,
               body: Any = None, colour: Any = None, source: Any = None,
               year_from: Any = None, year_to: Any = None, collection: Any = None,
               min_prob: Any = None, diversity: Any = None,
               request: gr.Request | None = None) -> tuple[Any, ...]:
        """The same query with only the ticked chips (a chip was removed or put back)."""
        picked = (make, body, colour, source, year_from, year_to, collection, min_prob)
        try:
            self._admit(request)
            res = self.page.search_text(query, k, _picked(*picked),
                                        keep_chips=list(chips or []),
                                        controls=SearchControls(diversity=_share(diversity)))
        except Exception as exc:
            return self._failed(exc, "refine")
        return self._outputs(res)

    def image_search(self, upload: str | None, k: int, make: Any = None, body: Any = None,
                     colour: Any = None, source: Any = None, year_from: Any = None,
                     year_to: Any = None, collection: Any = None, min_prob: Any = None,
                     text: Any = None,
                     request: gr.Request | None = None) -> tuple[Any, ...]:
        """An upload, with the "…but" text if any (image + text)."""
        picked = (make, body, colour, source, year_from, year_to, collection, min_prob)
        try:
            self._admit(request)
            with self._upload_slot(request):
                res = self.page.search_image_text(_text(text), k, _picked(*picked),
                                                  upload=upload)
        except Exception as exc:
            return (*self._failed(exc, "image_search"), gr.update(choices=[], value=[]))
        return (*self._outputs(res), gr.update(choices=[], value=[]))

    def more_like_this(self, image_id: str | None, k: int, make: Any = None,
                       body: Any = None, colour: Any = None, source: Any = None,
                       year_from: Any = None, year_to: Any = None, collection: Any = None,
                       min_prob: Any = None, text: Any = None,
                       request: gr.Request | None = None) -> tuple[Any, ...]:
        """The selected result as the query, with the "…but" text if any."""
        picked = (make, body, colour, source, year_from, year_to, collection, min_prob)
        try:
            self._admit(request)
            res = self.page.search_image_text(_text(text), k, _picked(*picked),
                                              image_id=image_id)
        except Exception as exc:
            return (*self._failed(exc, "more_like_this"), gr.update(choices=[], value=[]))
        return (*self._outputs(res), gr.update(choices=[], value=[]))

    def classify(self, upload: str | None, labels: str | None, template: str | None,
                 request: gr.Request | None = None) -> tuple[Any, str]:
        try:
            self._admit(request)
            with self._upload_slot(request):
                probs, note = self.page.classify_upload(upload, labels, template)
        except Exception as exc:
            return None, _error(exc, "classify")
        return probs, note

    def select(self, hits: list[dict[str, Any]], evt: gr.SelectData) -> tuple[str, str]:
        idx = evt.index if isinstance(evt.index, int) else int(evt.index[0])
        if not hits or not 0 <= idx < len(hits):
            return "", ""
        h = hits[idx]
        detail = (
            f"Selected #{h['rank']}: **{h.get('class_name') or h.get('make') or 'unlabelled'}**"
            f" · score {h['score']:.3f} · colour {h.get('colour') or '?'}"
            f" · source {h.get('source') or '?'} · id {h['image_id']}"
        )
        dups = [str(i) for i in h.get("duplicate_ids") or []]
        if dups:  # the near-duplicates folded into it, on demand
            detail += f"\n\nFolded into it: {len(dups)} near-duplicate" \
                      f"{'s' if len(dups) > 1 else ''} (ids {', '.join(dups)})"
        return str(h["image_id"]), detail

    def vote(self, vote: int) -> Callable[..., str]:
        def handler(image_id: str | None, query_log_id: int | None, query: str | None) -> str:
            try:
                self.page.feedback(query_log_id, image_id, vote, query or None)
            except Exception as exc:
                return _error(exc, "vote")
            word = "up" if vote > 0 else "down"
            gr.Info(f"thumbs-{word} saved for image {image_id}")
            return f"thumbs-{word} saved for image {image_id}"

        return handler

    # -- the controls beyond the query (exclusions, sort, duplicates, pages, thumbs) -----
    def controlled(self, query: str, chips: list[str] | None, exclusions: list[str] | None,
                   read: list[Any] | None, sort: Any, collapse: Any, liked: list[int] | None,
                   disliked: list[int] | None, k: int, make: Any = None, body: Any = None,
                   colour: Any = None, source: Any = None, year_from: Any = None,
                   year_to: Any = None, collection: Any = None, min_prob: Any = None,
                   diversity: Any = None,
                   request: gr.Request | None = None) -> tuple[Any, ...]:
        """The query again with the controls: an exclusion unticked (``read``: those the
        text gave), another order, duplicates folded, the session's thumbs, diversity."""
        picked = (make, body, colour, source, year_from, year_to, collection, min_prob)
        try:
            self._admit(request)
            controls = _diverse(_controls(exclusions, read, sort, collapse, liked, disliked),
                                diversity)
            res = self.page.search_text(query, k, _picked(*picked),
                                        keep_chips=self._kept(query, chips), controls=controls)
        except Exception as exc:
            return self._failed(exc, "controlled")
        return self._outputs(res)

    def more_results(self, query: str, chips: list[str] | None,
                     exclusions: list[str] | None, read: list[Any] | None, sort: Any,
                     collapse: Any, liked: list[int] | None, disliked: list[int] | None,
                     cursor: str | None, shown: list[Any] | None, hits: list[Any] | None,
                     k: int, make: Any = None, body: Any = None, colour: Any = None,
                     source: Any = None, year_from: Any = None, year_to: Any = None,
                     collection: Any = None, min_prob: Any = None, diversity: Any = None,
                     request: gr.Request | None = None) -> tuple[Any, ...]:
        """The next page of the text query, added below the results shown."""
        shown, hits = list(shown or []), list(hits or [])
        if not cursor:
            note = "**No more results** for this query."
            return shown, note, hits, gr.update(), cursor, shown
        picked = (make, body, colour, source, year_from, year_to, collection, min_prob)
        try:
            self._admit(request)
            controls = _diverse(replace(_controls(exclusions, read, sort, collapse, liked,
                                                  disliked), cursor=str(cursor)), diversity)
            res = self.page.search_text(query, k, _picked(*picked),
                                        keep_chips=self._kept(query, chips), controls=controls)
        except Exception as exc:
            return shown, _error(exc, "more_results"), hits, gr.update(), cursor, shown
        items = shown + list(res.items)
        status = f"{len(items)} results shown · " + res.status
        return items, status, hits + res.hits, res.query_log_id, res.next_cursor, items

    def _kept(self, query: str, chips: list[str] | None) -> list[str] | None:
        """The chips ticked (None before any were read). The cursor belongs to the chips
        the search used, so every chip ticked continues the new search's pages."""
        del query  # the service reads the chips from the query itself
        return [str(c) for c in chips] if isinstance(chips, list) else None

    def rerank(self, vote: int) -> Callable[..., tuple[Any, ...]]:
        """After a thumbs-up or -down: the selected result joins the session's liked or
        disliked ids and the text query runs again with them (Rocchio, in the service)."""

        def handler(image_id: str | None, liked: list[int] | None,
                    disliked: list[int] | None, query: str, chips: list[str] | None,
                    exclusions: list[str] | None, read: list[Any] | None, sort: Any,
                    collapse: Any, k: int, *filters: Any) -> tuple[Any, ...]:
            up, down = [int(i) for i in liked or []], [int(i) for i in disliked or []]
            try:
                iid = self.page.service.check_image_id(image_id)
            except CarsearchError:
                return (*[gr.update()] * 9, up, down)
            up, down = [i for i in up if i != iid], [i for i in down if i != iid]
            (up if vote > 0 else down).append(iid)
            if not (query or "").strip():  # an image query: the vote is stored, no re-rank
                return (*[gr.update()] * 9, up, down)
            out = self.controlled(query, chips, exclusions, read, sort, collapse, up, down,
                                  k, *filters)
            return (*out, up, down)

        return handler

    @staticmethod
    def show_exclusions(read: list[Any] | None) -> Any:
        """The exclusion chips of a new search, all ticked."""
        choices = [tuple(c) for c in read or []]
        return gr.update(choices=choices, value=[key for _label, key in choices],
                         visible=bool(choices))

    @staticmethod
    def new_session() -> tuple[list[int], list[int]]:
        """A new query forgets the thumbs of the last one."""
        return [], []

    # -- page data ---------------------------------------------------------------------
    def page_info(self) -> tuple[Any, ...]:
        """Header and the filter choices, fresh from the database on each page load."""
        vocab = self.page.vocabulary()
        years = [ANY, *[str(y) for y in vocab.years]]
        return (
            page_header(self.page.platform),
            gr.update(choices=sorted(vocab.makes)),
            gr.update(choices=sorted(vocab.bodies)),
            gr.update(choices=sorted(vocab.colours)),
            gr.update(choices=sorted(vocab.sources)),
            gr.update(choices=years, value=ANY),
            gr.update(choices=years, value=ANY),
        )

    def collection_picked(self, name: str | None) -> tuple[Any, ...]:
        """The vehicle filters show only for a collection of vehicles."""
        try:
            vehicles = self.page.service.kind(name or None).vehicle_labels
        except CarsearchError as exc:
            _error(exc)
            vehicles = True
        return tuple(gr.update(visible=vehicles) for _ in range(5))

    def collection_choices(self) -> Any:
        names, default = self.page.collections()
        return gr.update(choices=names, value=default, visible=len(names) > 1)

    def label_choices(self) -> Any:
        try:
            choices = self.page.label_tasks()
        except CarsearchError:
            return gr.update(choices=[], value=None)
        return gr.update(choices=choices, value=choices[0][1] if choices else None)

    def label_show(self, task_id: Any) -> tuple[Any, ...]:
        if task_id in (None, ""):
            return [], "no open labelling task", "", "", "", "", ""
        try:
            items, sug, note = self.page.label_task(task_id)
        except Exception as exc:
            return [], _error(exc, "label_task"), "", "", "", "", ""
        return (items, note, sug.get("make", ""), sug.get("model", ""),
                str(sug.get("year", "") or ""), sug.get("body_type", ""), "")

    def label_apply(self, task_id: Any, make: Any, model: Any, year: Any, body: Any,
                    colour: Any) -> tuple[Any, str]:
        try:
            note = self.page.apply_labels(task_id, {"make": make, "model": model,
                                                    "year": year, "body_type": body,
                                                    "colour": colour})
        except Exception as exc:
            return gr.update(), _error(exc, "label_apply")
        gr.Info(note)
        return self.label_choices(), note

    def status(self) -> str:
        return status_markdown(self.page.platform)

    def evaluation(self) -> tuple[str, Any]:
        note, frame = evaluation_table(self.page.platform)
        return note, frame


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _ids(values: Any) -> tuple[int, ...]:
    out = []
    for v in values if isinstance(values, list | tuple) else []:
        if isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
    return tuple(out[-50:])


def _share(value: Any) -> float:
    """A slider's 0-1 value (anything else: 0, off)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    v = float(value)
    return v if 0.0 <= v <= 1.0 else 0.0


def _diverse(controls: SearchControls, diversity: Any) -> SearchControls:
    """The diversity slider's value on the controls; it re-ranks the best matches, so
    with another order chosen it is off (the page does not refuse the pair)."""
    share = _share(diversity) if controls.sort == "score" else 0.0
    return replace(controls, diversity=share)


def _controls(exclusions: Any, read: Any, sort: Any, collapse: Any, liked: Any,
              disliked: Any) -> SearchControls:
    """The controls' widget values as SearchControls: the exclusions read from the text
    that are no longer ticked are dropped."""
    ticked = {str(x) for x in exclusions or []} if isinstance(exclusions, list) else set()
    keys = [str(c[1]) for c in (read if isinstance(read, list | tuple) else [])
            if isinstance(c, list | tuple) and len(c) == 2]
    sort_by = sort if sort in SORTS else "score"
    return SearchControls(drop_exclusions=tuple(k for k in keys if k not in ticked),
                          sort=sort_by, collapse_duplicates=collapse is True,
                          liked=_ids(liked), disliked=_ids(disliked))


class _Guarded:
    """PageHandlers as the Blocks wire them: every callable wrapped by `_guarded`."""

    def __init__(self, handlers: PageHandlers) -> None:
        self._handlers = handlers

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._handlers, name)
        return _guarded(attr) if callable(attr) else attr

    def vote(self, vote: int) -> Callable[..., str]:
        return _guarded(self._handlers.vote(vote))

    def rerank(self, vote: int) -> Callable[..., tuple[Any, ...]]:
        return _guarded(self._handlers.rerank(vote))


def build_app(page: SearchPage, *, limits: ClientLimits | None = None,
              no_auth: bool = False) -> gr.Blocks:
    """The Blocks page over a SearchPage (not launched); ``no_auth`` shows the banner of
    a page that was started open to the network on purpose."""
    h = _Guarded(PageHandlers(page, limits))
    with gr.Blocks(title="carsearch", analytics_enabled=False) as demo:
        if no_auth:
            gr.Markdown(NO_AUTH_BANNER, elem_id="no-auth-banner")
        header = gr.Markdown("carsearch", elem_id="header")
        with gr.Tab("Search"):
            with gr.Row():
                query = gr.Textbox(
                    label="Describe a vehicle", placeholder="red 2012 chevy pickup",
                    scale=5, elem_id="query", lines=1, max_lines=1, submit_btn=False,
                )
                go = gr.Button("Search", variant="primary", scale=1, elem_id="search-btn")
            chips = gr.CheckboxGroup(
                choices=[], value=[], elem_id="chips",
                label="Filters read from your query (untick to remove)",
            )
            exclusions = gr.CheckboxGroup(
                choices=[], value=[], elem_id="exclusions", visible=False,
                label="Excluded, read from 'not …' in your query (untick to allow)")
            status = gr.Markdown("", elem_id="status")
            with gr.Row():
                with gr.Column(scale=1, min_width=240):
                    # "" is the default collection (vehicles, or the only one), also for
                    # API clients that send no collection.
                    collection = gr.Dropdown([], value="", allow_custom_value=True,
                                             label="Collection", elem_id="collection",
                                             visible=False)
                    k = gr.Slider(1, MAX_K_ON_PAGE, value=DEFAULT_K, step=1,
                                  label="Results (top-k)", elem_id="top-k")
                    min_prob = gr.Slider(
                        0.0, 1.0, value=0.0, step=0.01, elem_id="min-prob",
                        label="Minimum probability (text queries; 0: no cut-off)",
                        info="Hides hits whose model probability that the text describes "
                             "the photo, sigmoid(scale * cosine + bias), is lower. How "
                             "well p matches the observed share of right hits is measured "
                             "per version (`carsearch evaluate` prints ECE): read it as a "
                             "score, not a guarantee.")
                    sort = gr.Dropdown([("best match", "score"), ("newest model year", "year"),
                                        ("latest added", "arrival")], value="score",
                                       label="Sort what passed", elem_id="sort")
                    collapse = gr.Checkbox(False, label="Fold near-duplicates into one",
                                           elem_id="collapse-duplicates")
                    diversity = gr.Slider(
                        0.0, 1.0, value=0.0, step=0.05, elem_id="diversity",
                        label="Diversity (text queries, best match order; 0: off)",
                        info="Re-ranks the best matches by maximal marginal relevance: "
                             "higher trades relevance for results unlike those above "
                             "them.")
                    make = gr.Dropdown([], multiselect=True, allow_custom_value=True, label="Make")
                    body = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                       label="Body type")
                    colour = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                         label="Colour")
                    source = gr.Dropdown([], multiselect=True, allow_custom_value=True,
                                         label="Source")
                    with gr.Row():
                        year_from = gr.Dropdown([ANY], value=ANY, allow_custom_value=True,
                                                label="Year from")
                        year_to = gr.Dropdown([ANY], value=ANY, allow_custom_value=True,
                                              label="Year to")
                    upload = gr.File(label="Search by image", type="filepath", elem_id="upload")
                    image_text = gr.Textbox(
                        label="…but (with an image: 'but blue', 'newer')", max_lines=1,
                        elem_id="image-text", placeholder="but blue")
                    upload_btn = gr.Button("Search with this image", elem_id="image-search-btn")
                with gr.Column(scale=3):
                    gallery = gr.Gallery(
                        label="Results", columns=4, height="auto", allow_preview=False,
                        elem_id="results", object_fit="contain",
                    )
                    more_results = gr.Button("More results", elem_id="more-results")
                    detail = gr.Markdown("Click a result to select it.", elem_id="detail")
                    with gr.Row():
                        selected = gr.Textbox(label="Selected image id", interactive=False,
                                              elem_id="selected-id", scale=2)
                        more = gr.Button("More like this", elem_id="more-like-this", scale=1)
                        up = gr.Button("Thumbs up", elem_id="thumbs-up", scale=1)
                        down = gr.Button("Thumbs down", elem_id="thumbs-down", scale=1)
        with gr.Tab("Classify"), gr.Row():
            with gr.Column(scale=1):
                cls_upload = gr.File(label="Image", type="filepath", elem_id="cls-upload")
                cls_labels = gr.Textbox(label="Labels (comma-separated)",
                                        placeholder="sedan, pickup, suv, convertible",
                                        elem_id="cls-labels")
                cls_template = gr.Textbox(label="Prompt template ({} is the label)",
                                          value="a photo of a {}.", elem_id="cls-template")
                cls_btn = gr.Button("Classify", variant="primary", elem_id="cls-btn")
            with gr.Column(scale=2):
                cls_out = gr.Label(label="Probability of each label (independent)",
                                   num_top_classes=10, elem_id="cls-out")
                cls_note = gr.Markdown("", elem_id="cls-note")
        with gr.Tab("Label"):
            lab_task = gr.Dropdown([], label="Labelling task (an isolated drift cluster)",
                                   elem_id="label-task")
            lab_note = gr.Markdown("", elem_id="label-note")
            lab_gallery = gr.Gallery(label="Its images still to label", columns=6,
                                     height="auto", allow_preview=False,
                                     elem_id="label-images")
            with gr.Row():
                lab_make = gr.Textbox(label="Make", elem_id="label-make")
                lab_model = gr.Textbox(label="Model", elem_id="label-model")
                lab_year = gr.Textbox(label="Year", elem_id="label-year")
                lab_body = gr.Textbox(label="Body type", elem_id="label-body")
                lab_colour = gr.Textbox(label="Colour (optional)", elem_id="label-colour")
            lab_btn = gr.Button("Label these images", variant="primary", elem_id="label-btn")
            lab_refresh = gr.Button("Refresh tasks", elem_id="label-refresh")
        with gr.Tab("Status"):
            status_md = gr.Markdown("", elem_id="system-status")
            refresh = gr.Button("Refresh", elem_id="status-refresh")
        with gr.Tab("Evaluation"):
            eval_note = gr.Markdown("")
            eval_df = gr.Dataframe(interactive=False, wrap=True)
            served_section(demo, page.platform, _guarded)
        hits = gr.State([])
        qlog = gr.State(None)
        cursor = gr.State(None)  # the next page's
        read = gr.State([])  # the exclusions read from the query: (label, key)
        shown = gr.State([])  # the gallery's items, for "more results" to add to
        liked = gr.State([])  # this query's thumbs, for re-ranking at once
        disliked = gr.State([])

        filters = [make, body, colour, source, year_from, year_to, collection, min_prob]
        results = [gallery, status, hits, qlog, selected, detail, cursor, read, shown]
        for event, api in ((go.click, "search"), (query.submit, None)):
            visible = {"api_name": api} if api else {"api_visibility": "private"}
            event(h.search, [query, k, *filters, diversity], [*results, chips],
                  **visible).then(
                h.show_exclusions, [read], exclusions, api_visibility="private").then(
                h.new_session, None, [liked, disliked], api_visibility="private")
        chips.input(h.refine, [query, chips, k, *filters, diversity], results,
                    api_name="refine")
        upload_btn.click(h.image_search, [upload, k, *filters, image_text], [*results, chips],
                         api_name="image_search")
        upload.upload(h.image_search, [upload, k, *filters, image_text], [*results, chips],
                      api_visibility="private")
        more.click(h.more_like_this, [selected, k, *filters, image_text], [*results, chips],
                   api_name="more_like_this")
        controls = [query, chips, exclusions, read, sort, collapse, liked, disliked]
        exclusions.input(h.controlled, [*controls, k, *filters, diversity], results,
                         api_name="search_controlled")
        for widget in (sort, collapse, diversity):
            widget.input(h.controlled, [*controls, k, *filters, diversity], results,
                         api_visibility="private")
        more_results.click(h.more_results,
                           [*controls, cursor, shown, hits, k, *filters, diversity],
                           [gallery, status, hits, qlog, cursor, shown],
                           api_name="more_results")
        gallery.select(h.select, [hits], [selected, detail], api_name="select_result")
        cls_btn.click(h.classify, [cls_upload, cls_labels, cls_template], [cls_out, cls_note],
                      api_name="classify")
        rerank_in = [selected, liked, disliked, query, chips, exclusions, read, sort, collapse,
                     k, *filters, diversity]
        for button, vote, api in ((up, 1, "vote_up"), (down, -1, "vote_down")):
            button.click(h.vote(vote), [selected, qlog, query], status, api_name=api).then(
                h.rerank(vote), rerank_in, [*results, liked, disliked],
                api_visibility="private")
        demo.load(h.page_info, None, [header, make, body, colour, source, year_from, year_to],
                  api_name="page_info")
        demo.load(h.collection_choices, None, collection, api_visibility="private")
        collection.change(h.collection_picked, [collection],
                          [make, body, colour, year_from, year_to], api_visibility="private")
        lab_fields = [lab_make, lab_model, lab_year, lab_body, lab_colour]
        demo.load(h.label_choices, None, lab_task, api_name="label_tasks")
        lab_refresh.click(h.label_choices, None, lab_task, api_visibility="private")
        lab_task.change(h.label_show, [lab_task], [lab_gallery, lab_note, *lab_fields],
                        api_name="label_task")
        lab_btn.click(h.label_apply, [lab_task, *lab_fields], [lab_task, lab_note],
                      api_name="label_apply")
        demo.load(h.status, None, status_md, api_name="status")
        refresh.click(h.status, None, status_md, api_visibility="private")
        demo.load(h.evaluation, None, [eval_note, eval_df], api_name="evaluation")
    return demo


def served_roots(settings: Any) -> tuple[Path, ...]:
    """What the file routes may serve: the thumbnail store, and the originals in
    image_dir only when CARSEARCH_UI_SERVE_ORIGINALS allows it."""
    image_dir = Path(settings.image_dir).resolve()
    return (image_dir,) if settings.ui_serve_originals else (image_dir / THUMB_DIR,)


def trust_forwarded_from(proxies: str) -> None:
    """Believe X-Forwarded-For / -Proto only from `proxies` (comma-separated addresses or
    CIDRs; empty: from nobody). Gradio starts uvicorn without a say in its
    forwarded_allow_ips, which uvicorn then reads from FORWARDED_ALLOW_IPS, defaulting to
    loopback: any local process could pick its client address by rotating the header
    (and so its own per-client limits). The variable is set here, before the server
    starts, to the setting's value."""
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(
        p.strip() for p in proxies.split(",") if p.strip())
    log.info("forwarded headers believed from: %s", os.environ["FORWARDED_ALLOW_IPS"] or "none")


def launch(platform: Platform, options: LaunchOptions, *, block: bool = True,
           labeller: Labeller | None = None) -> gr.Blocks:
    """Build and start the page behind `RequestGate`; serves only the thumbnail store
    (and the originals where the settings allow it). ``labeller`` backs the Label tab
    (none: the tab says labelling is not available)."""
    settings = platform.settings
    max_bytes = parse_size(options.max_file_size)
    page = SearchPage(platform, labeller=labeller, max_upload_bytes=max_bytes)
    page.warm_up()
    limits = ClientLimits(settings.ui_searches_per_s, settings.ui_search_burst,
                          settings.ui_max_uploads)
    demo = build_app(page, limits=limits, no_auth=options.no_auth)
    roots = served_roots(settings)
    for root in roots:
        root.mkdir(parents=True, exist_ok=True)
    login = LoginThrottle(settings.ui_login_failures, settings.ui_login_window_s)
    gate = Middleware(RequestGate, config=GateConfig(roots, max_bytes, limits, login=login))
    # The JSON API beside the page, behind the same gate (login, caps, limits).
    api = ApiMount(build_api(page, limits))
    trust_forwarded_from(settings.ui_trusted_proxies)
    demo.queue(default_concurrency_limit=4)
    log.info("search page on http://%s:%d (serving files only from %s)",
             options.host, options.port, ", ".join(map(str, roots)))
    demo.launch(
        server_name=options.host,
        server_port=options.port,
        auth=options.auth,
        allowed_paths=[str(r) for r in roots],
        max_file_size=max_bytes,
        show_error=False,
        quiet=options.quiet,
        prevent_thread_lock=not block,
        ssr_mode=False,
        css=CSS,
        inbrowser=False,
        share=False,
        app_kwargs={"middleware": [gate], "routes": [api]},
    )
    log_http_stack(demo)
    return demo


def log_http_stack(demo: gr.Blocks) -> str:
    """Log (and return) what uvicorn serves the page and the API with. Gradio starts
    uvicorn with its defaults, which pick httptools and uvloop when they are installed
    (both are dependencies of the project) and otherwise fall back to the pure-Python h11
    and asyncio: about 0.1-0.2 ms more per API call (docs/BENCHMARKS.md, "The JSON API's
    transport"), so the fallback is a warning."""
    import uvicorn.config

    config = getattr(getattr(demo, "server", None), "config", None)
    proto = getattr(getattr(config, "http_protocol_class", None), "__name__", "unknown")
    factory = str(uvicorn.config.LOOP_FACTORIES.get(str(getattr(config, "loop", "auto")), ""))
    loop = "uvloop" if "uvloop" in factory else "asyncio"
    if "loops.auto" in factory:  # uvicorn's "auto": uvloop when it is installed
        try:
            import uvloop  # noqa: F401
        except ImportError:
            loop = "asyncio"
        else:
            loop = "uvloop"
    line = f"HTTP: uvicorn {proto} on {loop}"
    if proto == "H11Protocol" or loop != "uvloop":
        log.warning("%s: install httptools and uvloop for the faster HTTP stack", line)
    else:
        log.info(line)
    return line
