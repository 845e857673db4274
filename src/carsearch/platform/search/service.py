"""The search service: text or image in, ranked hits with metadata out.

`SearchService.search(SearchRequest) -> SearchResult` is the one path of a text query:
cleaning, reading filters from the text, validation, relaxation, the probability cut-off,
the query log, and the chips and effective filters in the result. The page, the CLI and
any later API or evaluation are thin adapters over it (`search_text` is the same call for
callers that pass chips themselves).

Uses the serving model version: its encoder (loaded once per version, after the
artifact's hash is checked, and released when the version stops serving), its
collection in the vector store (through the VectorStore Protocol only), and metadata
joined from the database. Every query is written to `query_log`.
"""

from __future__ import annotations

import hashlib
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
from carsearch.platform.db import (
    Database,
    Image,
    ModelVersion,
    QueryFeedback,
    QueryLog,
    images,
)
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
    ParsedQuery,
    VocabularyCache,
    check_contradictions,
    describe_chips,
    exclusion_filters,
    filters_from_chips,
    merge_filters,
    parse_query,
    relaxation_tiers,
)
from carsearch.platform.search.paging import decode_cursor, encode_cursor, fingerprint
from carsearch.platform.search.querymix import (
    combine,
    mmr_order,
    normalise,
    rocchio,
    subtract,
)
from carsearch.platform.settings import Settings
from carsearch.platform.telemetry import METRICS
from carsearch.platform.vectors.filters import SearchFilters
from carsearch.platform.vectors.protocol import VectorStore
from carsearch.platform.vehicles import body_category

log = logging.getLogger(__name__)

MAX_K = 1000
SORTS = ("score", "year", "arrival")
# The image vector's share in an image + text query (measured on the fine-tuned demo
# model: docs/BENCHMARKS.md, "Search defaults re-measured").
IMAGE_WEIGHT = 0.25
# The weight of a negated concept's text vector subtracted from the query vector
# (measured on the fine-tuned demo model: docs/BENCHMARKS.md, "Search defaults re-measured").
NEGATIVE_WEIGHT = 0.6
# Cosine at or above which two images are near-duplicates (measured: docs/BENCHMARKS.md).
DUPLICATE_COSINE = 0.95
# Rocchio: query, liked-centroid and disliked-centroid weights, and the most ids of each.
ROCCHIO = (1.0, 0.75, 0.25)
MAX_FEEDBACK_IDS = 50
# Diversity (maximal marginal relevance) re-ranks a pool of this many times the page's
# size (at least MMR_POOL_MIN more than the page) of the best hits.
MMR_POOL_FACTOR = 4
MMR_POOL_MIN = 20
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
    # With ``collapse_duplicates``: how many near-duplicates of this hit were folded into
    # it (cosine at or above `DUPLICATE_COSINE`, or the same content), and their ids.
    duplicates: int = 0
    duplicate_ids: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["unmet"] = list(self.unmet)
        d["duplicate_ids"] = list(self.duplicate_ids)
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
    # The next page's cursor (pass it back as ``SearchRequest.cursor`` with the same
    # query), None on the last page or at the `search_max_results` setting.
    next_cursor: str | None = None
    # Exclusions read from the text ("not red", "no pickups", "except Ford"), as chips
    # the person can untick (keys "colour!=red", distinct from the filter chips' "="),
    # and negated words with no facet ("no roof rack") that were subtracted from the
    # query vector.
    exclusions: tuple[FilterChip, ...] = ()
    negative_terms: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hits"] = [h.to_dict() for h in self.hits]
        d["chips"] = [c.key for c in self.chips]
        d["exclusions"] = [c.key for c in self.exclusions]
        d["negative_terms"] = list(self.negative_terms)
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
    # The person's own exclusions (colours, makes, body types, sources, a year range):
    # hard, never relaxed, never contradicted by a filter read from the text.
    exclude: SearchFilters | None = None
    # Exclusion chips read from the text that the person unticked (their keys,
    # "colour!=red"); every other exclusion read from the text applies.
    drop_exclusions: Sequence[str] = ()
    # Image + text: an indexed image (its stored vector) or an uploaded one, combined
    # with the text's words that are not filters; ``query`` may then be None or empty.
    image_id: Any = None
    image: PILImage.Image | None = None
    # The image vector's share of the combined query vector (0-1; the rest is the text's).
    image_weight: Any = IMAGE_WEIGHT
    # The cursor of the previous page (SearchResult.next_cursor); None: the first page.
    cursor: str | None = None
    # The order of what passed the cut-off: "score" (best first), "year" (newest first)
    # or "arrival" (latest ingested first).
    sort: str = "score"
    # Fold near-duplicates into one hit (SearchHit.duplicates / duplicate_ids).
    collapse_duplicates: bool = False
    # In-session feedback: image ids the person liked / disliked; the query vector moves
    # toward the liked and away from the disliked (Rocchio, bounded) at once.
    liked: Sequence[int] = ()
    disliked: Sequence[int] = ()
    # Diversity of the page, 0-1 (0: off): maximal marginal relevance over the stored
    # vectors of the best hits re-ranks them, trading relevance for hits unlike those
    # above them (`querymix.mmr_order`); with sort "score" only.
    diversity: Any = 0.0


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
    _check_filters(kind, collection, filters.exclude)
    used = filters.model_dump(exclude_defaults=True)
    used.pop("exclude", None)
    foreign = [f for f in used if f not in kind.filters]
    if foreign:
        raise QueryError(f"the {kind.name} collection {collection} has no "
                         f"{', '.join(foreign)} filter (it filters on "
                         f"{', '.join(kind.filters)})")


def _check_hard_contradictions(hard: SearchFilters, ex: SearchFilters) -> None:
    """The person's own filters asking only for what an exclusion leaves out."""
    for name in ("make", "body", "colour", "source"):
        wanted = {v.lower() for v in getattr(hard, name)}
        if wanted and wanted <= {v.lower() for v in getattr(ex, name)}:
            raise QueryError(f"contradictory search: the {name} filter "
                             f"({', '.join(sorted(wanted))}) is excluded; remove one of them")
    lo, hi, xlo, xhi = hard.year_min, hard.year_max, ex.year_min, ex.year_max
    if (lo is not None or hi is not None) and (xlo is not None or xhi is not None) and (
            (xlo is None or (lo is not None and lo >= xlo))
            and (xhi is None or (hi is not None and hi <= xhi))):
        raise QueryError("contradictory search: the year filter lies inside the excluded "
                         "years; remove one of them")


def _keys(keys: Any, what: str) -> set[str]:
    """Chip keys as given by an adapter (a list of strings)."""
    if isinstance(keys, str | bytes) or not isinstance(keys, Sequence | set | frozenset):
        raise QueryError(f"{what} is a list of chip keys")
    if not all(isinstance(key, str) for key in keys):
        raise QueryError(f"{what} is a list of chip keys")
    return set(keys)


# Milvus answers at most this many hits per search call.
_TOPK = 16_384


@dataclass(frozen=True)
class _Plan:
    """Which page of a query, in which order, with or without folding duplicates."""

    sort: str = "score"
    collapse: bool = False
    seen: frozenset[int] = frozenset()  # already shown (earlier pages) or disliked
    shown: int = 0
    max_results: int = MAX_K
    fingerprint: bytes | None = None  # None: no cursor is given out
    diversity: float = 0.0


@dataclass(frozen=True)
class _Prepared:
    name: str
    text: str | None
    kind: str
    k: int
    cut: float | None
    hard: SearchFilters
    soft: list[FilterChip]
    chips: tuple[FilterChip, ...]
    ignored: tuple[str, ...]
    exclusions: tuple[FilterChip, ...]
    negative: tuple[str, ...]
    vector_text: str | None
    image_id: int | None
    image: PILImage.Image | None
    weight: float
    liked: tuple[int, ...]
    disliked: tuple[int, ...]
    plan: _Plan


@dataclass
class _Picked:
    """A hit gathered for the page, before its rank is known."""

    tier: int
    found: Any  # the vector store's Hit
    row: Image
    unmet: tuple[str, ...]
    prob: float | None
    dups: list[int] = field(default_factory=list)

    @property
    def hit_id(self) -> int:
        return int(self.found.id)

    def hit(self, rank: int) -> SearchHit:
        row = self.row
        return SearchHit(
            rank=rank, score=round(self.found.score, 6), image_id=self.hit_id,
            path=row.path, make=row.make, model=row.model, year=row.year,
            body_type=row.body_type, colour=row.colour, class_name=row.class_name,
            source=row.source, unmet=self.unmet,
            probability=None if self.prob is None else round(self.prob, 6),
            description=_extra_text(row.extra, "description"),
            photographer=_extra_text(row.extra, "photographer"),
            box=list(row.box) if getattr(row, "box", None) else None,
            duplicates=len(self.dups), duplicate_ids=tuple(self.dups),
        )


def _arrival(p: _Picked) -> float:
    at = p.row.ingested_at
    return at.timestamp() if at is not None else float("-inf")


# Within each relaxation tier (exact matches stay first): newest model year first, or
# latest ingested first; then by score.
_SORT_KEYS: dict[str, Any] = {
    "year": lambda p: (p.tier, -(p.row.year or -10**6), -p.found.score),
    "arrival": lambda p: (p.tier, -_arrival(p), -p.found.score),
}


class _Reps:
    """The representatives of a page's duplicate groups: a hit folds into the first one
    whose vector's cosine with it is at least `DUPLICATE_COSINE`, or whose content is
    the same (sha256)."""

    def __init__(self, collection: str, store: VectorStore) -> None:
        self.collection = collection
        self.store = store
        self.vectors: dict[int, np.ndarray] = {}
        self.count = 0
        self.kept: list[np.ndarray] = []  # the representatives' vectors ...
        self.index: list[int] = []  # ... and their places among the representatives
        self.hashes: dict[str, int] = {}

    def load(self, ids: list[int]) -> None:
        missing = [i for i in ids if i not in self.vectors]
        if missing:
            found, vecs = self.store.vectors(self.collection, missing)
            self.vectors.update({int(i): v for i, v in zip(found.tolist(), vecs,
                                                           strict=True)})

    def fold(self, image_id: int, sha256: str | None) -> int | None:
        """The index of the representative ``image_id`` folds into, or None (it becomes
        the next representative)."""
        if sha256 and sha256 in self.hashes:
            return self.hashes[sha256]
        vec = self.vectors.get(image_id)
        if vec is not None and self.kept:
            cos = np.stack(self.kept) @ vec
            best = int(np.argmax(cos))
            if float(cos[best]) >= DUPLICATE_COSINE:
                return self.index[best]
        index = self.count
        self.count += 1
        if vec is not None:
            self.kept.append(vec)
            self.index.append(index)
        if sha256:
            self.hashes[sha256] = index
        return None


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
        # Distinct values over every image row: read once per TTL, not once per query.
        self.vocabulary = VocabularyCache(db, ttl_s=settings.search_vocabulary_ttl_s)

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
            # Every collection's serving version, not only those searched here yet
            # (`warm` readied them all).
            now_serving = [*self.registry.all_serving(), version]
            self.store.retain(v.collection for v in now_serving)
            self._release_encoders({v.name for v in now_serving})
        return version

    def _release_encoders(self, keep: set[str]) -> None:
        """Forget the encoders of versions that no longer serve (after a promotion or a
        rollback), so that a long-running page does not hold every version it ever
        served: their weights are freed once no caller holds them either."""
        with self._lock:
            for name in [n for n in self._encoders if n not in keep]:
                log.info("releasing the encoder of %s: it no longer serves", name)
                del self._encoders[name]

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
            self.store.prepare([v.collection], wait=wait)
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
        """The one search path every adapter takes: text, or image + text.

        The query is cleaned and checked (k, min_prob, the filters and exclusions against
        the collection's kind); filters and exclusions are read from the text
        (``request.parse``; a collection without vehicle labels reads none) or the chips
        taken from ``request.preferred``. The person's filters and every exclusion are
        hard; the chips are met where k vehicles meet them, otherwise relaxed in
        `relaxation_tiers` order until the page is full, exact matches first, and the
        result says what was relaxed. A chip whose field the hard filters set is overridden
        by them; a chip an exclusion contradicts is refused. The query vector is the
        text's (without its negations), or the image's combined with the text's remaining
        words (``image_weight``); negated concepts with no facet are subtracted from it,
        and liked / disliked images move it (Rocchio). ``min_prob`` drops text hits whose
        model probability is lower. ``cursor`` continues a previous page; ``sort`` orders
        what passed; ``collapse_duplicates`` folds near-duplicates. The query is logged
        (`query_log`) and counted."""
        with _counted():
            prep = self._prepare(request)
            t0 = time.perf_counter()
            version = self.serving(prep.name)
            vec = self._query_vector(version, prep)
            result = self._finish(version, vec, prep.kind, prep.text, prep.k, prep.hard, t0,
                                  prep.soft, prep.cut, prep.plan)
            log.debug("%s search %r in %s: %d hits, %d chips, %d exclusions", prep.kind,
                      prep.text, prep.name, len(result.hits), len(prep.chips),
                      len(prep.exclusions))
            return replace(result, chips=prep.chips, ignored=prep.ignored,
                           effective=merge_filters(filters_from_chips(prep.chips), prep.hard),
                           exclusions=prep.exclusions, negative_terms=prep.negative)

    def _prepare(self, request: SearchRequest) -> _Prepared:
        """Every check of a request, and what the search runs with."""
        has_image = request.image_id is not None or request.image is not None
        if request.image_id is not None and request.image is not None:
            raise QueryError("give an image id or an image, not both")
        if request.image is not None and not isinstance(request.image, PILImage.Image):
            raise QueryError("the image is not a picture")
        empty = request.query is None or (isinstance(request.query, str)
                                          and not request.query.strip())
        text = None if has_image and empty else self.clean_query(request.query)
        k = self.check_k(request.k)
        cut = self.check_min_prob(request.min_prob)
        sort = request.sort
        if not isinstance(sort, str) or sort not in SORTS:
            raise QueryError(f"sort is one of {', '.join(SORTS)}, got {sort!r}"[:200])
        weight = self.check_share(request.image_weight, "image_weight")
        diversity = (0.0 if request.diversity is None
                     else self.check_share(request.diversity, "diversity"))
        if diversity > 0.0 and sort != "score":
            raise QueryError(f"diversity re-ranks the best matches: it does not combine "
                             f"with sort {sort}")
        image_id = self.check_image_id(request.image_id) if request.image_id is not None \
            else None
        liked = self._feedback_ids(request.liked, "liked")
        disliked = self._feedback_ids(request.disliked, "disliked")
        if set(liked) & set(disliked):
            raise QueryError("an image is both liked and disliked: keep one")
        if not isinstance(request.collapse_duplicates, bool):
            raise QueryError("collapse_duplicates is true or false")
        name = self.collection(request.collection)
        kind = self.kind(name)
        _check_filters(kind, name, request.filters)
        _check_filters(kind, name, request.exclude)
        parsed = self._parse(request, text)
        labels = kind.vehicle_labels
        chips = parsed.chips if labels else ()
        drop = _keys(request.drop_exclusions, "drop_exclusions")
        exclusions = tuple(c for c in parsed.exclusions if c.key not in drop) if labels else ()
        hard = (request.filters or SearchFilters()).excluding(request.exclude).excluding(
            exclusion_filters(exclusions))
        ex = hard.exclude or SearchFilters()
        check_contradictions(chips, ex)
        _check_hard_contradictions(hard, ex)
        if image_id is not None and labels:
            chips = chips + self._like_this(image_id, chips, hard)
        if has_image:
            vector_text = parsed.remaining or None
        else:
            vector_text = parsed.positive or ("a photo of a vehicle" if labels else "a photo")
        plan = self._plan(request, name, k, sort, image_id, weight, liked, disliked,
                          kept=tuple(sorted(parsed.keys())), diversity=diversity)
        return _Prepared(
            name=name, text=text, kind="image" if has_image else "text", k=k, cut=cut,
            hard=hard, soft=[c for c in chips if not _overridden(c, hard)], chips=chips,
            ignored=parsed.ignored, exclusions=exclusions, negative=parsed.negative,
            vector_text=vector_text, image_id=image_id, image=request.image, weight=weight,
            liked=liked, disliked=disliked, plan=plan)

    def _like_this(self, image_id: int, chips: tuple[FilterChip, ...],
                   hard: SearchFilters) -> tuple[FilterChip, ...]:
        """"Like this": the query image's body type as a chip relaxed before any other,
        where neither the text nor the person's filters name a body and the image has a
        labelled one ("like this but blue" from a pickup: blue pickups first)."""
        if any(c.field == "body" for c in chips) or hard.body:
            return ()
        with self.db.session() as s:
            row = s.get(Image, image_id)
        category = body_category(row.body_type) if row is not None and row.body_type else None
        if not category or category in (hard.exclude.body if hard.exclude else ()):
            return ()
        return (FilterChip("body", category, "like this", inferred=True),)

    def _parse(self, request: SearchRequest, text: str | None) -> ParsedQuery:
        """The text read for filters, exclusions and negated terms (nothing read with
        ``parse`` off or chips given as ``preferred``)."""
        if text is None:
            return ParsedQuery("")
        if request.preferred is not None:
            return ParsedQuery(text, tuple(request.preferred), positive=text, remaining=text)
        if not request.parse:
            return ParsedQuery(text, positive=text, remaining=text)
        vocab = request.vocabulary
        parsed = parse_query(text, self.vocabulary.get() if vocab is None else vocab)
        if request.keep_chips is not None:
            parsed = parsed.keep(_keys(request.keep_chips, "keep_chips"))
        return parsed

    def _plan(self, request: SearchRequest, name: str, k: int, sort: str,
              image_id: int | None, weight: float, liked: tuple[int, ...],
              disliked: tuple[int, ...], kept: tuple[str, ...] = (),
              diversity: float = 0.0) -> _Plan:
        """Paging, order and folding of a request; the cursor checked against it. The
        cursor belongs to the chips the search used (``kept``), not to how the request
        named them: every chip ticked and no ``keep_chips`` are the same query."""
        limit = self.settings.search_max_results
        image_hash = None
        if request.image is not None:
            image_hash = hashlib.blake2b(request.image.tobytes(), digest_size=16).hexdigest()
        fp = fingerprint({
            "q": request.query, "f": (request.filters or SearchFilters()).model_dump(),
            "x": (request.exclude or SearchFilters()).model_dump(),
            "keep": list(kept),
            "pref": [c.key for c in request.preferred or ()], "parse": bool(request.parse),
            "drop": sorted(request.drop_exclusions), "c": name, "p": request.min_prob,
            "i": image_id, "ih": image_hash, "w": weight, "s": sort,
            "d": request.collapse_duplicates, "l": liked, "dl": disliked,
            **({"dv": diversity} if diversity else {}),
        })
        seen: frozenset[int] = frozenset(disliked)
        shown = 0
        if request.cursor is not None:
            state = decode_cursor(request.cursor, fp)
            seen, shown = seen | state.seen, state.shown
        return _Plan(sort=sort, collapse=request.collapse_duplicates, seen=seen, shown=shown,
                     max_results=limit, fingerprint=fp, diversity=diversity)

    @staticmethod
    def check_share(value: Any, name: str) -> float:
        """A share from 0 to 1 (`image_weight`, `diversity`), else a one-line QueryError."""
        try:
            x = float(value)
        except (TypeError, ValueError, OverflowError):
            x = float("nan")
        if isinstance(value, bool) or not 0.0 <= x <= 1.0:
            raise QueryError(f"{name} is a share from 0 to 1, got {value!r}"[:200])
        return x

    def _feedback_ids(self, ids: Any, what: str) -> tuple[int, ...]:
        if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | set | frozenset):
            raise QueryError(f"{what} is a list of image ids")
        if len(ids) > MAX_FEEDBACK_IDS:
            raise QueryError(f"at most {MAX_FEEDBACK_IDS} {what} images per query, "
                             f"got {len(ids)}")
        return tuple(dict.fromkeys(self.check_image_id(i) for i in ids))

    def _query_vector(self, version: ModelVersion, prep: _Prepared) -> np.ndarray:
        """The text's vector, or the image's combined with the remaining words'; negated
        concepts subtracted; liked / disliked images applied (platform/search/querymix).
        Its time is the search's "encode" stage."""
        t_enc = time.perf_counter()
        try:
            return self._mixed_vector(version, prep)
        finally:
            METRICS.search_stage.labels("encode").observe(time.perf_counter() - t_enc)

    def _mixed_vector(self, version: ModelVersion, prep: _Prepared) -> np.ndarray:
        encoder = self.encoder_for(version)
        image = None
        if prep.image_id is not None:
            image = self._stored_or_encoded(version, prep.image_id)
        elif prep.image is not None:
            try:
                rgb = prep.image.convert("RGB")
            except (OSError, ValueError) as exc:
                raise QueryError(f"the image cannot be read: {exc}"[:200]) from None
            image = encoder.encode_images([rgb], [None])
        texts = ([prep.vector_text] if prep.vector_text else []) + list(prep.negative)
        tv = encoder.encode_text(texts) if texts else None
        first = tv[:1] if tv is not None and prep.vector_text else None
        if image is None:
            assert first is not None  # a text query always has text to encode
            vec = normalise(first)
        else:
            vec = combine(image, first, prep.weight)
        if prep.negative and tv is not None:
            vec = subtract(vec, tv[1 if prep.vector_text else 0:], NEGATIVE_WEIGHT)
        if prep.liked or prep.disliked:
            _, liked = self.store.vectors(version.collection, list(prep.liked))
            _, disliked = self.store.vectors(version.collection, list(prep.disliked))
            vec = rocchio(vec, liked, disliked, ROCCHIO)
        return vec

    def _stored_or_encoded(self, version: ModelVersion, image_id: int) -> np.ndarray:
        """An indexed image's stored vector, or its file encoded where the collection
        does not hold it yet."""
        found, vec = self.store.vectors(version.collection, [image_id])
        if len(found):
            return np.asarray(vec[:1], dtype=np.float32)
        with self.db.session() as s:
            row = s.get(Image, image_id)
        if row is None:
            raise QueryError(f"no image with id {image_id}")
        img = load_image(Path(row.path), max_pixels=self.settings.max_image_pixels,
                         max_side=DECODE_MAX_SIDE)
        return self.encoder_for(version).encode_images([img.convert("RGB")], [row.box])

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
        plan: _Plan | None = None,
    ) -> SearchResult:
        plan = plan or _Plan()
        hard = filters or SearchFilters()
        scale = bias = 0.0
        if kind == "text":
            encoder = self.encoder_for(version)
            scale, bias = encoder.logit_scale, encoder.logit_bias
        tiers = relaxation_tiers(soft) if soft else [()]
        room = max(0, plan.max_results - plan.shown)
        page_k = min(k, room)
        # What is gathered: the page, or for another order everything the query may still
        # page through (sorted below, within each relaxation tier).
        want = page_k if plan.sort == "score" else room
        if plan.diversity > 0.0:  # a pool of the best to re-rank by MMR
            want = min(room, max(page_k * MMR_POOL_FACTOR, page_k + MMR_POOL_MIN))
        picked: list[_Picked] = []
        seen: set[int] = set(plan.seen)
        ran: list[dict[str, Any]] = []
        reps = _Reps(version.collection, self.store) if plan.collapse else None
        ann_s = meta_s = 0.0
        for tier, kept in enumerate(tiers):
            if len(picked) >= want:
                break
            tier_filters = merge_filters(filters_from_chips(kept), hard)
            dropped = [c for c in soft if c not in kept]
            added = 0
            # Earlier tiers' and pages' hits come back too (a tier's vehicles include the
            # ones that also meet what it dropped): ask for enough to still find the rest,
            # and more while folded duplicates leave the page short.
            limit = min(want + len(seen), _TOPK)
            while True:
                t_ann = time.perf_counter()
                hits = self.store.search(version.collection, vec, limit, tier_filters)[0]
                fresh = [h for h in hits if h.id not in seen]
                t_meta = time.perf_counter()
                rows = self._metadata([h.id for h in fresh])
                ann_s += t_meta - t_ann
                meta_s += time.perf_counter() - t_meta
                if reps is not None:
                    reps.load([h.id for h in fresh])
                stop = False
                for h in fresh:
                    if len(picked) >= want:
                        break
                    row = rows.get(h.id)
                    seen.add(h.id)
                    if row is None:  # a vector whose row is gone: reconcile repairs it
                        log.warning("vector %d in %s has no database row", h.id,
                                    version.collection)
                        continue
                    prob = (float(probability(h.score, scale, bias)) if kind == "text"
                            else None)
                    if min_prob is not None and prob is not None and prob < min_prob:
                        seen.discard(h.id)
                        stop = True  # hits come best first: the rest is lower still
                        break
                    if reps is not None:
                        rep = reps.fold(h.id, row.sha256)
                        if rep is not None:
                            picked[rep].dups.append(h.id)
                            continue
                    added += 1
                    unmet = tuple(c.label for c in dropped if not c.matches(
                        row.make, row.body_type, row.colour, row.year))
                    picked.append(_Picked(tier, h, row, unmet, prob))
                if (stop or len(picked) >= want or len(hits) < limit or limit >= _TOPK):
                    break
                limit = min(limit * 2, _TOPK)
            ran.append({"kept": [c.key for c in kept], "dropped": [c.key for c in dropped],
                        "hits": added})
        if plan.sort != "score":
            picked.sort(key=_SORT_KEYS[plan.sort])
        if plan.diversity > 0.0:
            page = self._diverse(version.collection, picked, page_k, plan.diversity)
        else:
            page = picked[:page_k]
        out = [p.hit(plan.shown + n + 1) for n, p in enumerate(page)]
        latency = (time.perf_counter() - t0) * 1000.0
        METRICS.search_stage.labels("vector_search").observe(ann_s)
        METRICS.search_stage.labels("metadata").observe(meta_s)
        METRICS.search_latency.labels(kind, self.store.search_path(version.collection)).observe(
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
        cursor = None
        shown = plan.shown + len(out)
        more = len(picked) > len(page) if plan.sort != "score" else len(out) == k
        if plan.fingerprint is not None and out and more and shown < plan.max_results:
            done = set(plan.seen) | {i for p in page for i in (p.hit_id, *p.dups)}
            cursor = encode_cursor(plan.fingerprint, shown, sorted(done))
        qid = self._log(version, kind, text, fdict, k, latency, [h.image_id for h in out])
        return SearchResult(text, kind, version.name, k, fdict, round(latency, 3), out, qid,
                            note, ran if soft else [], version.image_collection,
                            next_cursor=cursor)

    def _diverse(self, collection: str, pool: list[_Picked], k: int,
                 diversity: float) -> list[_Picked]:
        """``k`` of the pool by maximal marginal relevance over their stored vectors,
        the exact matches still before the relaxed ones (by tier, then MMR's order)."""
        if not pool:
            return []
        ids = [p.hit_id for p in pool]
        found, vecs = self.store.vectors(collection, ids)
        at = {int(i): n for n, i in enumerate(found.tolist())}
        dim = vecs.shape[1] if len(found) else 1
        matrix = np.zeros((len(pool), dim), dtype=np.float32)
        for n, i in enumerate(ids):
            if i in at:
                matrix[n] = vecs[at[i]]
        order = mmr_order(np.array([p.found.score for p in pool]), matrix, k, diversity)
        return sorted((pool[n] for n in order), key=lambda p: p.tier)

    # -- feedback ----------------------------------------------------------------------
    def record_feedback(self, query_log_id: Any, image_id: Any, vote: Any,
                        query: Any = None) -> int:
        """Store a thumbs-up (+1) / thumbs-down (-1) on a result for training
        (`query_feedback`, what training/feedback.py reads); returns the row id. The text
        is the logged query's where ``query_log_id`` names one. Re-ranking in the session
        is the next search's ``liked`` / ``disliked``."""
        if isinstance(vote, bool) or vote not in (1, -1):
            raise QueryError("a vote is +1 or -1")
        if image_id in (None, "", 0):
            raise QueryError("select a result first, then vote on it")
        iid = self.check_image_id(image_id)
        qid: int | None = None
        if query_log_id is not None:
            try:
                qid = self.check_image_id(query_log_id)  # the same id range
            except QueryError:
                qid = None  # a stale or odd client state: the vote is kept without it
        if not isinstance(query, str):
            query = None
        else:
            query = query.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")[:2000]
        with self.db.session() as s:
            logged = s.get(QueryLog, qid) if qid is not None else None
            if logged is not None and logged.query:
                query = logged.query  # the text that produced the result
            row = QueryFeedback(query_log_id=qid if logged is not None else None,
                                image_id=iid, vote=int(vote), query=query)
            s.add(row)
            s.flush()
            return int(row.id)

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
