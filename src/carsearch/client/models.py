"""The JSON API's request and response bodies, as pydantic models: the server validates
requests and writes responses with them, the OpenAPI document is generated from them,
and the client parses with them. Requests forbid unknown fields (a misspelt option is an
error, not silently ignored); responses allow new fields (an older client keeps working
against a newer server)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

# The most results one query may page through, and one page's largest size.
MAX_K = 1000
Sort = Literal["score", "year", "arrival"]
Values = list[Annotated[str, Field(max_length=64)]] | Annotated[str, Field(max_length=64)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class Filters(_Request):
    """Metadata filters: each list means "any of"; years are inclusive."""

    make: Values | None = None
    body: Values | None = None
    colour: Values | None = None
    source: Values | None = None
    year_min: StrictInt | None = None
    year_max: StrictInt | None = None

    def as_dict(self) -> dict[str, object]:
        return self.model_dump(exclude_none=True)


class SearchOptions(_Request):
    """What every search takes, text or image."""

    k: Annotated[StrictInt, Field(ge=1, le=MAX_K, description="results per page")] = 10
    cursor: Annotated[str, Field(max_length=4096)] | None = Field(
        default=None, description="next_cursor of the previous page: the page after it")
    filters: Filters | None = Field(default=None, description="hard filters (never relaxed)")
    exclude: Filters | None = Field(
        default=None, description="values no hit may have (never relaxed)")
    min_prob: Annotated[StrictFloat | StrictInt, Field(ge=0.0, le=1.0)] | None = Field(
        default=None, description="drop text hits whose model probability is lower")
    sort: Sort = Field(default="score", description="order of what passed the cut-off")
    collapse_duplicates: StrictBool = Field(
        default=False, description="near-duplicates as one hit with a count")
    collection: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="image collection (default: vehicles, or the only one)")
    keep_chips: Annotated[list[Annotated[str, Field(max_length=100)]],
                          Field(max_length=32)] | None = Field(
        default=None, description="filter chips read from the text to keep, by key "
        "(make=Ford); None: all of them")
    drop_exclusions: Annotated[list[Annotated[str, Field(max_length=100)]],
                               Field(max_length=32)] = Field(
        default_factory=list, description="exclusions read from the text to ignore, by "
        "key (colour!=red)")
    liked: Annotated[list[StrictInt], Field(max_length=100)] = Field(
        default_factory=list, description="image ids marked thumbs-up in this session")
    disliked: Annotated[list[StrictInt], Field(max_length=100)] = Field(
        default_factory=list, description="image ids marked thumbs-down in this session")
    diversity: Annotated[StrictFloat | StrictInt, Field(ge=0.0, le=1.0)] = Field(
        default=0.0, description="0-1: re-rank the best matches by maximal marginal "
        "relevance, trading relevance for hits unlike those above them (0: off; with sort "
        "score only)")


class ImageSearchOptions(SearchOptions):
    """POST /api/v1/search/image's ``options`` part: an uploaded image, optionally with a
    text ("but blue")."""

    query: Annotated[str, Field(max_length=10_000)] | None = None
    image_weight: Annotated[StrictFloat | StrictInt, Field(ge=0.0, le=1.0)] | None = Field(
        default=None, description="weight of the image against the text (image + text)")


class SearchQuery(ImageSearchOptions):
    """POST /api/v1/search: a text query, an indexed image (``image_id``), or both
    ("like this but blue")."""

    image_id: StrictInt | None = None


class Chip(_Response):
    key: str
    label: str
    field: str
    value: str


class RelaxedTier(_Response):
    """A search run after the first, with some of the text's filters dropped."""

    kept: list[str]
    dropped: list[str]
    hits: int


class Hit(_Response):
    rank: int
    score: float
    image_id: int
    make: str | None = None
    model: str | None = None
    year: int | None = None
    body_type: str | None = None
    colour: str | None = None
    class_name: str | None = None
    source: str | None = None
    unmet: list[str] = Field(default_factory=list)
    probability: float | None = None
    description: str | None = None
    photographer: str | None = None
    box: list[int] | None = None
    duplicates: int = 0
    duplicate_ids: list[int] = Field(default_factory=list)
    thumbnail_url: str


class SearchResponse(_Response):
    hits: list[Hit]
    next_cursor: str | None = None
    filters: dict[str, object] = Field(default_factory=dict)
    relaxed: list[RelaxedTier] = Field(default_factory=list)
    relaxed_note: str | None = None
    chips: list[Chip] = Field(default_factory=list)
    exclusions: list[Chip] = Field(default_factory=list)
    negative_terms: list[str] = Field(default_factory=list)
    ignored: list[str] = Field(default_factory=list)
    version: str
    collection: str
    query: str | None = None
    kind: str
    query_log_id: int | None = None
    latency_ms: float


class Feedback(_Request):
    """POST /api/v1/feedback: a thumbs-up (1) or -down (-1) on a hit of a search."""

    image_id: StrictInt
    vote: Literal[1, -1]
    query_log_id: StrictInt | None = None
    query: Annotated[str, Field(max_length=2000)] | None = None


class FeedbackResult(_Response):
    id: int


class ImageInfo(_Response):
    id: int
    collection: str
    status: str
    source: str | None = None
    make: str | None = None
    model: str | None = None
    year: int | None = None
    body_type: str | None = None
    colour: str | None = None
    class_name: str | None = None
    width: int | None = None
    height: int | None = None
    box: list[int] | None = None
    description: str | None = None
    photographer: str | None = None
    ingested_at: str | None = None
    thumbnail_url: str


class Health(_Response):
    status: str  # "ok", or "no-model" while nothing serves
    version: str | None = None
    collection: str | None = None
    detail: str | None = None
    api: str


class ErrorBody(_Response):
    """Every error: one line, and the id under which the server logged it."""

    detail: str
    request_id: str
