"""The search service: text or image in, ranked hits with metadata out.

`SearchService.search(SearchRequest) -> SearchResult` is the one path of a text query:
cleaning, reading filters from the text, validation, relaxation, the probability cut-off,
the query log, and the chips and effective filters in the result. The page, the CLI and
any later API or evaluation are thin adapters over it (`search_text` is the same call for
callers that pass chips themselves).

Uses the serving model version: its encoder (loaded once per version, after the
artifact's hash is checked), its Milvus collection, and metadata joined from the
database. Every query is written to `query_log`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from carsearch.platform import collections
from carsearch.platform.collections import DEFAULT_COLLECTION, Kind
from carsearch.platform.db import Database, Image, ModelVersion, QueryLog, images
from carsearch.platform.errors import ImageRejectedError, QueryError
from carsearch.platform.ids import MAX_ID
from carsearch.platform.images import DECODE_MAX_SIDE, load_image
from carsearch.platform.models.encoder import Encoder
from carsearch.platform.models.registry import Registry
from carsearch.platform.search.classify import (
    DEFAULT_TEMPLATE,
    LabelScore,
    check_template,
    classify_vectors,
    parse_labels,
    probability,
)
from carsearch.platform.search.nlfilters import (
    FilterChip,
    FilterVocabulary,
    describe_chips,
    filters_from_chips,
    load_vocabulary,
    merge_filters,
    parse_query,
    relaxation_tiers,
)
from carsearch.platform.settings import Settings
from carsearch.platform.telemetry import METRICS
from carsearch.platform.vectors.mirror import MirroredStore
from carsearch.platform.vectors.store import SearchFilters, VectorStore

log = logging.getLogger(__name__)

MAX_K = 1000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class SearchHit:
    rank: int
    score: float
    image_id: int
    path: str
    make: str | None = None
    model: str | None = None
    year: int | None = None
    body_type: str | None = None
    colour: str | None = None
    class_name: str | None = None
    source: str | None = None
    # The filters read from the query text that this hit does not meet (it came from a
    # relaxed search); empty for an exact match.
    unmet: tuple[str, ...] = ()
    # For a text query: the model's probability that the text matches the image (its
    # calibration is measured per version: `carsearch evaluate` prints a reliability table),
    # sigmoid(exp(logit_scale) * score + logit_bias) (platform/search/classify.py).
    probability: float | None = None
    # A description that came with the image (a URL manifest's photo_description).
    description: str | None = None
    # Who took it, where the manifest said (Unsplash's photographer_username).
    photographer: str | None = None
    # The vehicle's box [x1, y1, x2, y2] in pixels that the vector was embedded from
    # (None: the whole frame); the thumbnail is always the whole photo.
    box: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["unmet"] = list(self.unmet)
        return d


@dataclass(frozen=True)
class SearchResult:
    query: str | None
    kind: str
    version: str
    k: int
    filters: dict[str, Any]
    latency_ms: float
    hits: list[SearchHit] = field(default_factory=list)
    query_log_id: int | None = None
    # What the search relaxed to fill the page ("no Mercedes-Benz coupe; showing ..."),
    # None when the filters read from the text were met by k vehicles (or there were none).
    relaxed: str | None = None
    # One entry per search run: the chips it kept and dropped, and the hits it added.
    tiers: list[dict[str, Any]] = field(default_factory=list)
    collection: str = DEFAULT_COLLECTION
    # The filters read from the text that the search used (after the person removed any),
    # what was read but not used ("'red' (colour red): none indexed"), and the person's
    # filters merged over the chips (what the page and the CLI show as "filters").
    chips: tuple[FilterChip, ...] = ()
    ignored: tuple[str, ...] = ()
    effective: SearchFilters | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hits"] = [h.to_dict() for h in self.hits]
        d["chips"] = [c.key for c in self.chips]
        d["ignored"] = list(self.ignored)
        d.pop("effective")
        return d


@dataclass(frozen=True)
class SearchRequest:
    """One text search, as the page, the CLI, an API or an evaluation asks for it.

    ``filters`` are the person's own (hard: never relaxed). With ``parse`` the service
    reads filters from the text (colour, make, body, year; vehicle collections only) and
    ``keep_chips`` (chip keys) keeps only those the person left; ``preferred`` gives the
    chips directly instead. ``vocabulary`` is what the text is read against (default: the
    indexed values read now; a long-running adapter passes its cache's)."""

    query: str | None
    k: Any = 10
    filters: SearchFilters | None = None
    parse: bool = True
    keep_chips: Sequence[str] | None = None
    preferred: Sequence[FilterChip] | None = None
    min_prob: Any = None
    collection: str | None = None
    vocabulary: FilterVocabulary | None = None


class _Empty(threading.local):
    flag = False


_EMPTY = _Empty()


def _extra_text(extra: dict[str, Any] | None, key: str) -> str | None:
    text = (extra or {}).get(key)
    return text if isinstance(text, str) and text.strip() else None


def _overridden(chip: FilterChip, hard: SearchFilters) -> bool:
    """Whether the person's own filters set the field a chip read from the text is on."""
    if chip.field == "year":
        return hard.year_min is not None or hard.year_max is not None
    return bool(getattr(hard, chip.field))


def _relaxation_note(
    soft: Sequence[FilterChip], tiers: list[tuple[FilterChip, ...]],
    ran: list[dict[str, Any]], k: int,
) -> str | None:
    """"no Mercedes-Benz coupe; showing Mercedes-Benz of any body, then coupe of any
    make", or None when the first search (every chip kept) filled the page."""
    if not ran or ran[0]["hits"] >= k or len(ran) == 1:
        return None
    exact = ran[0]["hits"]
    head = describe_chips(soft)
    lead = f"no {head}" if exact == 0 else f"only {exact} {head}"
    shown = [describe_chips(kept, [c for c in soft if c not in kept])
             for kept, r in zip(tiers[1:], ran[1:], strict=False) if r["hits"]]
    if not shown:
        return lead
    return f"{lead}; showing {', then '.join(shown)}"


@contextmanager
def _counted() -> Iterator[None]:
    """Count a search by outcome: ok, empty (no hits), bad_input (an unusable query,
    filter or image) or error (anything else: no model, Milvus down, a bug)."""
    _EMPTY.flag = False
    try:
        yield
    except (QueryError, ImageRejectedError):
        METRICS.queries.labels("bad_input").inc()
        raise
    except Exception:
        METRICS.queries.labels("error").inc()
        raise
    METRICS.queries.labels("empty" if _EMPTY.flag else "ok").inc()


def _check_filters(kind: Kind, collection: str, filters: SearchFilters | None) -> None:
    """A filter the collection's kind does not have is an error, not silently nothing."""
    if filters is None:
        return
    used = filters.model_dump(exclude_defaults=True)
    foreign = [f for f in used if f not in kind.filters]
    if foreign:
        raise QueryError(f"the {kind.name} collection {collection} has no "
                         f"{', '.join(foreign)} filter (it filters on "
                         f"{', '.join(kind.filters)})")


class SearchService:
    """Text and image search over the serving model version of each image collection."""

    def __init__(self, settings: Settings, db: Database, store: VectorStore) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.registry = Registry(db, settings.model_dir)
        self._encoders: dict[str, Encoder] = {}
        self._lock = threading.Lock()
        self._serving: dict[str, tuple[float, ModelVersion]] = {}
        self._kinds: dict[str, Kind] = {}
        self._default: tuple[float, str] | None = None
        self.serving_ttl_s = 2.0

    def collection(self, name: str | None = None) -> str:
        """The image collection a query means: ``name``, else vehicles, else the only one
        (platform/collections.py; re-read at most every `serving_ttl_s`)."""
        if name is not None:
            if name not in self._kinds:
                self._kinds[name] = collections.kind_of(self.db, collections.check_name(name))
            return name
        now = time.monotonic()
        if self._default is None or now - self._default[0] >= self.serving_ttl_s:
            self._default = (now, collections.resolve(self.db, None).name)
        return self._default[1]

    def kind(self, collection: str | None = None) -> Kind:
        name = self.collection(collection)
        if name not in self._kinds:
            self._kinds[name] = collections.kind_of(self.db, name)
        return self._kinds[name]

    def serving(self, collection: str | None = None) -> ModelVersion:
        """The serving version of a collection, re-read from the database at most every
        `serving_ttl_s`.

        A promotion reaches a running search process within that time; each query does
        not pay a database round trip for it.
        """
        name = self.collection(collection)
        now = time.monotonic()
        cached = self._serving.get(name)
        if cached is not None and now - cached[0] < self.serving_ttl_s:
            return cached[1]
        version = self.registry.require_serving(name)
        self._serving[name] = (now, version)
        if cached is not None and cached[1].name != version.name:
            log.info("serving version of %s is now %s (was %s)", name, version.name,
                     cached[1].name)
            if isinstance(self.store, MirroredStore):
                self.store.keep_only(v.collection for _, v in self._serving.values())
        return version

    # -- model -----------------------------------------------------------------------
    def encoder_for(self, version: ModelVersion) -> Encoder:
        """The encoder of a version, created once after checking the artifact's hash."""
        with self._lock:
            enc = self._encoders.get(version.name)
            if enc is None:
                path = self.registry.verify(version)
                if self.settings.encoder == "onnx":
                    enc = self._onnx_encoder(version, path)
                else:
                    enc = Encoder(
                        path,
                        device=self.settings.device,
                        batch_size=self.settings.encode_batch_size,
                        torch_threads=self.settings.threads.torch,
                    )
                self._encoders[version.name] = enc
            return enc

    def _onnx_encoder(self, version: ModelVersion, path: Path) -> Encoder:
        """ONNX Runtime over the version's export in MODEL_DIR/_onnx/NAME, made from the
        verified artifact on first use (platform/models/onnx.py). Every file of the
        export is checked against the sha256 recorded in the database at export, here
        and again when the graphs are opened; an export with no manifest (cut short) or
        no record (made before records were kept) is removed and made again."""
        import json
        import shutil

        from carsearch.platform.artifacts import ArtifactLedger
        from carsearch.platform.errors import ModelNotFoundError
        from carsearch.platform.models.onnx import (
            MANIFEST,
            ONNX_EXPORT,
            OnnxEncoder,
            Parity,
            export_key,
            export_onnx,
        )

        out = Path(self.settings.model_dir) / "_onnx" / version.name
        ledger = ArtifactLedger(self.registry.db)
        key = export_key(out)
        if not (out / MANIFEST).is_file() or ledger.recorded(ONNX_EXPORT, key) is None:
            log.info("exporting %s to ONNX in %s", version.name, out)
            shutil.rmtree(out, ignore_errors=True)  # what is there was not recorded
            export_onnx(path, out, ledger=ledger)

        def verify() -> None:
            ledger.verify(ONNX_EXPORT, key, out)

        verify()
        parity = json.loads((out / MANIFEST).read_text()).get("parity")
        if not parity or not Parity(**parity).ok:
            raise ModelNotFoundError(f"the ONNX export of {version.name} in {out} does not "
                                     f"match PyTorch ({parity}): use --encoder torch")
        return OnnxEncoder(out, batch_size=self.settings.encode_batch_size,  # type: ignore[return-value]
                           threads=self.settings.threads.torch, verify=verify)

    def warm(self, *, wait: bool = False) -> ModelVersion:
        """Ready the serving versions: load their encoders and, where searches are served
        from the in-memory mirror, build their collections' mirrors (in the background
        unless ``wait``) and let later versions' mirrors build on their first search.
        Returns the default collection's version."""
        version = self.serving()
        others = [v for v in self.registry.all_serving() if v.name != version.name]
        for v in [version, *others]:
            self.encoder_for(v).encode_text(["warm up"])
            if isinstance(self.store, MirroredStore):
                self.store.auto_build = True
                if self.store.has_collection(v.collection):
                    self.store.warm(v.collection, wait=wait)
        return version

    # -- queries ---------------------------------------------------------------------
    def clean_query(self, query: str | None) -> str:
        if query is not None and not isinstance(query, str):
            raise QueryError(f"a query is text, not {type(query).__name__}")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in query or ""):
            raise QueryError("the query holds characters that are not text (unpaired "
                             "surrogates): type it again")
        text = " ".join(_CONTROL.sub(" ", query or "").split())
        if not text:
            raise QueryError("empty query: describe a vehicle, e.g. 'red 2012 chevy pickup'")
        if len(text) > self.settings.max_query_chars:
            raise QueryError(
                f"query too long ({len(text)} characters; at most "
                f"{self.settings.max_query_chars}): describe the vehicle in a few words"
            )
        return text

    @staticmethod
    def check_k(k: Any) -> int:
        try:
            n = int(k)
            exact = n == k or isinstance(k, str)
        except (TypeError, ValueError, OverflowError):
            n, exact = 0, False
        if isinstance(k, bool) or not exact or not 1 <= n <= MAX_K:
            raise QueryError(f"k must be a whole number from 1 to {MAX_K}, got {k!r}"[:200])
        return n

    @staticmethod
    def check_image_id(image_id: Any) -> int:
        """An image id as the platform makes them (0 <= id < 2**63), or a QueryError."""
        try:
            iid = int(image_id)
        except (TypeError, ValueError, OverflowError):
            raise QueryError(f"not an image id: {image_id!r}"[:200]) from None
        if isinstance(image_id, bool) or not 0 <= iid <= MAX_ID or (
                isinstance(image_id, float) and iid != image_id):
            raise QueryError(f"not an image id: {image_id!r}"[:200])
        return iid

    def search(self, request: SearchRequest) -> SearchResult:
        """Text search: the one path every adapter takes.

        The query is cleaned and checked (k, min_prob, the filters against the collection's
        kind); filters are read from the text (``request.parse``; a collection without
        vehicle labels reads none) or taken from ``request.preferred``. The person's
        filters are hard; the chips are met where k vehicles meet them, otherwise relaxed
        in `relaxation_tiers` order until the page is full, exact matches first, and the
        result says what was relaxed. A chip whose field the hard filters set is overridden
        by them. ``min_prob`` drops the hits whose model text-image probability is
        lower. The query is logged (`query_log`) and counted."""
        with _counted():
            text = self.clean_query(request.query)
            k = self.check_k(request.k)
            cut = self.check_min_prob(request.min_prob)
            name = self.collection(request.collection)
            kind = self.kind(name)
            _check_filters(kind, name, request.filters)
            chips, ignored = self._chips(request, text, kind.vehicle_labels)
            t0 = time.perf_counter()
            version = self.serving(name)
            t_enc = time.perf_counter()
            vec = self.encoder_for(version).encode_text([text])
            METRICS.search_stage.labels("encode").observe(time.perf_counter() - t_enc)
            hard = request.filters or SearchFilters()
            soft = [c for c in chips if not _overridden(c, hard)]
            result = self._finish(version, vec, "text", text, k, hard, t0, soft, cut)
            log.debug("text search %r in %s: %d hits, %d chips", text, name,
                      len(result.hits), len(chips))
            return replace(result, chips=chips, ignored=ignored,
                           effective=merge_filters(filters_from_chips(chips), hard))

    def _chips(self, request: SearchRequest, text: str,
               vehicle_labels: bool) -> tuple[tuple[FilterChip, ...], tuple[str, ...]]:
        """The chips a request searches with, and what was read but not used."""
        if request.preferred is not None:
            chips, ignored = tuple(request.preferred), ()
        elif request.parse:
            vocab = request.vocabulary
            parsed = parse_query(text, load_vocabulary(self.db) if vocab is None else vocab)
            if request.keep_chips is not None:
                parsed = parsed.keep(request.keep_chips)
            chips, ignored = parsed.chips, parsed.ignored
        else:
            chips, ignored = (), ()
        return (chips if vehicle_labels else ()), ignored

    def search_text(
        self,
        query: str,
        k: int = 10,
        filters: SearchFilters | None = None,
        *,
        preferred: Sequence[FilterChip] = (),
        min_prob: float | None = None,
        collection: str | None = None,
    ) -> SearchResult:
        """`search` with the chips given (``preferred``; none read from the text): kept
        for callers that parse the query themselves."""
        return self.search(SearchRequest(query, k, filters, parse=False,
                                         preferred=tuple(preferred), min_prob=min_prob,
                                         collection=collection))

    @staticmethod
    def check_min_prob(value: Any) -> float | None:
        if value is None:
            return None
        try:
            p = float(value)
        except (TypeError, ValueError, OverflowError):
            p = float("nan")
        if isinstance(value, bool) or not 0.0 <= p <= 1.0:
            raise QueryError(f"min-prob is a probability from 0 to 1, got {value!r}"[:200])
        return p

    def classify(
        self, images: Sequence[PILImage.Image], labels: str | Sequence[str],
        template: str = DEFAULT_TEMPLATE, collection: str | None = None,
        boxes: Sequence[Sequence[float] | None] | None = None,
    ) -> list[list[LabelScore]]:
        """Zero-shot: each label's independent probability for each image, with the
        model serving ``collection`` (platform/search/classify.py); each image framed by
        that version's image policy (cropped to its box where ``boxes`` gives one)."""
        encoder = self.encoder_for(self.serving(collection))
        parse_labels(labels)  # a bad label list fails before any image is encoded
        check_template(template)
        vectors = encoder.encode_images([im.convert("RGB") for im in images], boxes)
        return classify_vectors(encoder, vectors, labels, template)

    def search_image(
        self, image: PILImage.Image, k: int = 10, filters: SearchFilters | None = None,
        collection: str | None = None, box: Sequence[float] | None = None,
    ) -> SearchResult:
        """Image search: the query image framed by the serving version's image policy
        (cropped to ``box`` where given, else the whole frame), as indexed images are."""
        with _counted():
            k = self.check_k(k)
            _check_filters(self.kind(collection), self.collection(collection), filters)
            t0 = time.perf_counter()
            version = self.serving(collection)
            t_enc = time.perf_counter()
            vec = self.encoder_for(version).encode_images([image.convert("RGB")], [box])
            METRICS.search_stage.labels("encode").observe(time.perf_counter() - t_enc)
            return self._finish(version, vec, "image", None, k, filters, t0)

    def search_similar(
        self, image_id: int, k: int = 10, filters: SearchFilters | None = None,
        collection: str | None = None,
    ) -> SearchResult:
        with _counted():
            return self._similar(self.check_image_id(image_id), k, filters, collection)

    def _similar(
        self, image_id: int, k: int, filters: SearchFilters | None,
        collection: str | None = None,
    ) -> SearchResult:
        """"More like this": image search with an indexed image as the query.

        The query is the image's stored vector in the serving collection (no decode, no
        encode); an image the collection does not hold yet is decoded and encoded.
        """
        k = self.check_k(k)
        _check_filters(self.kind(collection), self.collection(collection), filters)
        t0 = time.perf_counter()
        version = self.serving(collection)
        found, vec = self.store.vectors(version.collection, [int(image_id)])
        if len(found):
            return self._finish(version, vec, "image", None, k, filters, t0)
        with self.db.session() as s:
            row = s.get(Image, int(image_id))
        if row is None:
            raise QueryError(f"no image with id {image_id}")
        img = load_image(Path(row.path), max_pixels=self.settings.max_image_pixels,
                         max_side=DECODE_MAX_SIDE)
        return self.search_image(img, k, filters, collection, box=row.box)

    def _finish(
        self,
        version: ModelVersion,
        vec: np.ndarray,
        kind: str,
        text: str | None,
        k: int,
        filters: SearchFilters | None,
        t0: float,
        soft: Sequence[FilterChip] = (),
        min_prob: float | None = None,
    ) -> SearchResult:
        hard = filters or SearchFilters()
        scale = bias = 0.0
        if kind == "text":
            encoder = self.encoder_for(version)
            scale, bias = encoder.logit_scale, encoder.logit_bias
        tiers = relaxation_tiers(soft) if soft else [()]
        out: list[SearchHit] = []
        seen: set[int] = set()
        ran: list[dict[str, Any]] = []
        ann_s = meta_s = 0.0
        for kept in tiers:
            if len(out) >= k:
                break
            tier_filters = merge_filters(filters_from_chips(kept), hard)
            # Earlier tiers' hits come back too (a tier's vehicles include the ones that
            # also meet what it dropped): ask for enough to still find k new ones.
            limit = min(k + len(seen), MAX_K + k)
            t_ann = time.perf_counter()
            hits = self.store.search(version.collection, vec, limit, tier_filters)[0]
            fresh = [h for h in hits if h.id not in seen]
            t_meta = time.perf_counter()
            rows = self._metadata([h.id for h in fresh])
            ann_s += t_meta - t_ann
            meta_s += time.perf_counter() - t_meta
            dropped = [c for c in soft if c not in kept]
            added = 0
            for h in fresh:
                row = rows.get(h.id)
                if row is None:  # a vector whose row is gone: reconcile repairs it
                    log.warning("vector %d in %s has no database row", h.id,
                                version.collection)
                    continue
                if len(out) >= k:
                    break
                seen.add(h.id)
                prob = float(probability(h.score, scale, bias)) if kind == "text" else None
                if min_prob is not None and prob is not None and prob < min_prob:
                    break  # hits come best first: the rest of this search is lower still
                added += 1
                unmet = tuple(c.label for c in dropped
                              if not c.matches(row.make, row.body_type, row.colour, row.year))
                out.append(SearchHit(
                    rank=len(out) + 1, score=round(h.score, 6), image_id=h.id,
                    path=row.path, make=row.make, model=row.model, year=row.year,
                    body_type=row.body_type, colour=row.colour, class_name=row.class_name,
                    source=row.source, unmet=unmet,
                    probability=None if prob is None else round(prob, 6),
                    description=_extra_text(row.extra, "description"),
                    photographer=_extra_text(row.extra, "photographer"),
                    box=list(row.box) if getattr(row, "box", None) else None,
                ))
            ran.append({"kept": [c.key for c in kept], "dropped": [c.key for c in dropped],
                        "hits": added})
        latency = (time.perf_counter() - t0) * 1000.0
        METRICS.search_stage.labels("vector_search").observe(ann_s)
        METRICS.search_stage.labels("metadata").observe(meta_s)
        METRICS.search_latency.labels(kind, self._path(version.collection)).observe(
            latency / 1000.0)
        if not out:
            _EMPTY.flag = True
        first = merge_filters(filters_from_chips(soft), hard)
        fdict = first.model_dump(exclude_defaults=True)
        if min_prob is not None:
            fdict["min_prob"] = min_prob
        note = _relaxation_note(soft, tiers, ran, k) if soft else None
        if note:
            METRICS.queries_relaxed.inc()
        qid = self._log(version, kind, text, fdict, k, latency, [h.image_id for h in out])
        return SearchResult(text, kind, version.name, k, fdict, round(latency, 3), out, qid,
                            note, ran if soft else [], version.image_collection)

    def _path(self, collection: str) -> str:
        """What answered a search, for the latency histogram."""
        if isinstance(self.store, MirroredStore) and self.store.mirror(collection) is not None:
            return "mirror"
        return "milvus_lite" if self.store.is_lite else "milvus_server"

    def _metadata(self, ids: list[int]) -> dict[int, Image]:
        return images.by_ids(self.db, ids)

    def _log(
        self,
        version: ModelVersion,
        kind: str,
        text: str | None,
        filters: dict[str, Any],
        k: int,
        latency: float,
        ids: list[int],
    ) -> int:
        """Write the query_log row; its id is what feedback on a result refers to."""
        row = QueryLog(
            kind=kind,
            query=text,
            filters={key: list(v) if isinstance(v, tuple) else v for key, v in filters.items()},
            k=k,
            latency_ms=latency,
            result_ids=ids,
            model_version_id=version.id,
        )
        with self.db.session() as s:
            s.add(row)
            s.flush()
            return int(row.id)
