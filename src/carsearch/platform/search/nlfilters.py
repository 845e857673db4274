"""Structured filters from a natural-language query ("red 2012 chevy pickup").

The query is split into words (lower-cased, hyphens read as spaces) and scanned left
to right for the longest known phrase at each position, so "mini van" is a body type
before "mini" could be a make, and "dark blue" is one colour. Phrases come from the
shared alias tables in `vehicles`; years come from a small grammar (below).

Every candidate is then checked by a Pydantic model against the values that exist in
the database (`FilterVocabulary`, read from the images table and cached with a TTL): a
make, colour or body type nobody has indexed, or a year range with no indexed vehicle
in it, is dropped with a note instead of turning the search into an empty one. A query
that names nothing known gives empty filters: a pure vector search. The full text is
never shortened: it still ranks by vector similarity; the filters only narrow.

Year forms (conservative on purpose; anything else is left to the vector ranking):

    2012, '12                     that year
    2010s, '90s, 90s              the decade (2010-2019, 1990-1999)
    early / mid / late 2000s      2000-2003 / 2004-2006 / 2007-2009 of that decade
    2008-2012, 2008 to 2012,      the range, ends included
    between 2008 and 2012
    before 2005, pre 2005         up to 2004
    after 2010, post 2010         from 2011
    since 2010, 2010 or newer     from 2010
    2010 or older                 up to 2010

Several year mentions give the range spanning them.

Vague time words are read against the model years the collection holds (its distinct
years, oldest first; n of them; a third is ceil(n / 3) years, a tenth ceil(n / 10)):

    older model, old model, older, old      the oldest third of those years
    classic, vintage                        the oldest tenth
    newer model, new model, newer, recent,  the newest third
    late model
    latest, newest                          the newest tenth

so on Stanford Cars (16 distinct years, 1991-2012) "older model" is 1991-1999 (the first
6 of them), "classic" 1991-1993 and "newer" 2007-2012. A vague word becomes a year chip
like any other (removable on the page), marked vague: it is the first filter relaxed when
too few vehicles match. A query that names a year explicitly ignores its vague words.
"new" alone gives nothing (the "New Beetle", "brand new").

Filters read from text are preferences (see `relaxation_tiers`): when they leave fewer
than k results the search relaxes them, the least certain first, in the order
vague year, colour, year, body, make (colours are the sparsest and least reliable
labels, a stated year is often off by one, a body type is visible in the photo, and a
make is named on purpose).

Negation (`split_negations`): "not", "no", "non", "without", "except", "excluding",
"minus" and "other than" ("but not", "except for" read the same) take the facet phrases or
year expressions right after them, joined by "or" ("pickup not red or blue", "no
pickups", "except Ford", "not before 2005"): those become exclusion chips (negated, key
"colour!=red"), which the search never relaxes; a filter the same query asks for and
excludes is refused as contradictory. When no facet follows, up to three words up to a
boundary ("no roof rack") are a negated concept, subtracted from the query vector. The
negated words never reach the query vector.

Ambiguous single words that are also plain English ("mini", "smart", "ram", "eagle",
"caddy", "estate", "hatch", "tan", ...) count only when the same query names something
unambiguous too ("red mini" filters on MINI; "mini" alone stays a vector search). "am"
(Aston Martin) is never used: "I am looking for ..." is far more common.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from carsearch.platform.db import Database, Image, images
from carsearch.platform.errors import QueryError
from carsearch.platform.vectors.filters import SearchFilters
from carsearch.platform.vehicles import (
    BODY_ALIASES,
    BODY_CATEGORY,
    COLOUR_ALIASES,
    MAKE_ALIASES,
    SHORT_YEAR,
    YEAR,
    body_category,
)

FieldName = Literal["make", "colour", "body", "year"]

# Aliases that are ordinary English words: used only beside an unambiguous mention.
AMBIGUOUS: frozenset[str] = frozenset(
    {"mini", "smart", "ram", "eagle", "roller", "rolls", "caddy", "caddie", "estate",
     "hatch", "tan", "cream", "jag", "merc", "mb", "geo"}
)
# Aliases never used as filters at all.
NEVER: frozenset[str] = frozenset({"am"})

_TOKEN = re.compile(r"[^\W_][\w']*(?:-\d+)?|'\d{2}s?")
_FULL_YEAR = re.compile(rf"^({YEAR})$")
_SHORT_YEAR = re.compile(rf"^{SHORT_YEAR}$")
_DECADE = re.compile(r"^'?(1[89]\d0|20\d0|\d0)'?s$")
_RANGE = re.compile(rf"^({YEAR})-({YEAR})$")
_PART = {"early": (0, 3), "mid": (4, 6), "late": (7, 9)}


# -- vocabulary --------------------------------------------------------------------------
@dataclass(frozen=True)
class FilterVocabulary:
    """The filter values that exist among the indexed images."""

    makes: frozenset[str] = frozenset()
    colours: frozenset[str] = frozenset()
    bodies: frozenset[str] = frozenset()
    sources: frozenset[str] = frozenset()
    years: tuple[int, ...] = ()

    def has_year_in(self, lo: int | None, hi: int | None) -> bool:
        low = lo if lo is not None else -(10**9)
        high = hi if hi is not None else 10**9
        return any(low <= y <= high for y in self.years)

    def values(self, name: str) -> frozenset[str]:
        return {"make": self.makes, "colour": self.colours, "body": self.bodies,
                "source": self.sources}[name]


def load_vocabulary(db: Database) -> FilterVocabulary:
    """Distinct makes, colours, body categories, sources and years of indexed images."""

    def distinct_of(col: Any) -> list[Any]:
        return images.distinct_values(db, col)

    bodies = {body_category(b) for b in distinct_of(Image.body_type)}
    return FilterVocabulary(
        makes=frozenset(distinct_of(Image.make)),
        colours=frozenset(c.lower() for c in distinct_of(Image.colour)),
        bodies=frozenset(bodies),
        sources=frozenset(distinct_of(Image.source)),
        years=tuple(sorted(int(y) for y in distinct_of(Image.year) if int(y) > 0)),
    )


class VocabularyCache:
    """`load_vocabulary` re-read at most every `ttl_s` seconds (thread-safe)."""

    def __init__(
        self,
        db: Database,
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._value: FilterVocabulary | None = None
        self._at = 0.0

    def get(self) -> FilterVocabulary:
        with self._lock:
            now = self._clock()
            if self._value is None or now - self._at >= self.ttl_s:
                self._value = load_vocabulary(self.db)
                self._at = now
            return self._value

    def invalidate(self) -> None:
        with self._lock:
            self._value = None


# -- validated filters -------------------------------------------------------------------
class KnownFilters(BaseModel):
    """Filters whose every value exists in the database (context key "vocab").

    Used for the parsed chips and for the values a person picks on the page alike;
    a value outside the vocabulary is a validation error naming the known values.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    make: tuple[str, ...] = ()
    body: tuple[str, ...] = ()
    colour: tuple[str, ...] = ()
    source: tuple[str, ...] = ()
    year_min: int | None = None
    year_max: int | None = None

    @field_validator("make", "body", "colour", "source", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        if v is None:
            return ()
        return (v,) if isinstance(v, str) else tuple(v)

    @field_validator("make", "body", "colour", "source")
    @classmethod
    def _known(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        vocab = _vocab_of(info)
        known = vocab.values(str(info.field_name))
        for item in v:
            if item not in known:
                shown = ", ".join(sorted(known)[:12]) or "none indexed"
                raise ValueError(f"unknown {info.field_name} {item!r} (known: {shown})")
        return tuple(dict.fromkeys(v))

    @model_validator(mode="after")
    def _years(self, info: ValidationInfo) -> KnownFilters:
        lo, hi = self.year_min, self.year_max
        if lo is None and hi is None:
            return self
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"year range {lo}-{hi} is backwards")
        if not _vocab_of(info).has_year_in(lo, hi):
            raise ValueError(f"no indexed vehicle from {_year_label(lo, hi)}")
        return self

    def to_search_filters(self) -> SearchFilters:
        return SearchFilters(**self.model_dump())


def _vocab_of(info: ValidationInfo) -> FilterVocabulary:
    vocab = (info.context or {}).get("vocab")
    if not isinstance(vocab, FilterVocabulary):
        raise ValueError("validation needs the vocabulary in the context")
    return vocab


def validate_filters(data: dict[str, Any], vocab: FilterVocabulary) -> SearchFilters:
    """Filters a person picked, checked against the vocabulary; QueryError if unknown."""
    from pydantic import ValidationError

    try:
        known = KnownFilters.model_validate(data, context={"vocab": vocab})
        return known.to_search_filters()
    except ValidationError as exc:
        msgs = [str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()]
        raise QueryError("; ".join(msgs)) from None


# -- parsing -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FilterChip:
    """One filter read from the query, shown to the person as a removable chip."""

    field: FieldName
    value: str  # "Chevrolet", "red", "pickup", "2012", "2007-2009", "2005-", "-2004"
    phrase: str  # the words of the query it came from
    vague: bool = False  # a year range from a vague word ("older model")
    negated: bool = False  # an exclusion ("not red"): rows with this value are left out
    # Taken from the query image's labels ("like this but blue": its body type), not the
    # text: the first relaxed.
    inferred: bool = False

    @property
    def key(self) -> str:
        return f"{self.field}{'!=' if self.negated else '='}{self.value}"

    @property
    def label(self) -> str:
        head = f"not {self.field}" if self.negated else self.field
        if self.vague:
            return f"{head}: {self.value} ({self.phrase})"
        return f"{head}: {self.value}"

    @property
    def unit(self) -> str:
        """What relaxation drops together: a field, "vague year" or "inferred"."""
        if self.inferred:
            return "inferred"
        return "vague year" if self.vague else self.field

    def matches(self, make: str | None, body_type: str | None, colour: str | None,
                year: int | None) -> bool:
        """Whether a vehicle with this metadata passes this chip's filter."""
        if self.field == "make":
            return make == self.value
        if self.field == "body":
            return body_category(body_type) == self.value
        if self.field == "colour":
            return (colour or "").lower() == self.value
        lo, hi = self.year_bounds()
        return year is not None and (lo is None or year >= lo) and (hi is None or year <= hi)

    def year_bounds(self) -> tuple[int | None, int | None]:
        return _parse_year_value(self.value)


@dataclass(frozen=True)
class ParsedQuery:
    """The query text, the filters read from it, and what was read but not used."""

    text: str
    chips: tuple[FilterChip, ...] = ()
    ignored: tuple[str, ...] = ()
    filters: SearchFilters = field(default_factory=SearchFilters)
    # Exclusions read from the text ("not red", "no pickups", "except Ford"): negated
    # chips, never relaxed.
    exclusions: tuple[FilterChip, ...] = ()
    # Negated words that name no facet ("no roof rack" -> "roof rack").
    negative: tuple[str, ...] = ()
    # The text with every negation removed (what the query vector is made from); the text
    # itself when nothing was negated.
    positive: str = ""
    # The words that are neither filters, negations nor filler ("like this but blue" ->
    # ""): an image + text query's text part.
    remaining: str = ""

    def keys(self) -> list[str]:
        return [c.key for c in self.chips]

    def keep(self, keys: Iterable[str]) -> ParsedQuery:
        """The same parse with only the chips whose key is in `keys` (the rest removed).
        Exclusions are kept (they are dropped by their own keys: `drop_exclusions`)."""
        wanted = set(keys)
        chips = tuple(c for c in self.chips if c.key in wanted)
        return replace(self, chips=chips, filters=filters_from_chips(chips))

    def drop_exclusions(self, keys: Iterable[str]) -> ParsedQuery:
        """The same parse without the exclusions whose key is in `keys`."""
        unwanted = set(keys)
        return replace(self, exclusions=tuple(c for c in self.exclusions
                                              if c.key not in unwanted))


@dataclass(frozen=True)
class _Candidate:
    field: FieldName
    value: str
    phrase: str
    ambiguous: bool = False


def _normalise(text: str) -> list[str]:
    low = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    # keep "2008-2012" together; read every other hyphen as a space
    low = re.sub(r"(?<!\d)-|-(?!\d)", " ", low)
    words = []
    for tok in _TOKEN.findall(low):
        if not re.fullmatch(r"'\d{2}s?", tok):
            tok = tok.removesuffix("'s").strip("'")
        if tok:
            words.append(tok)
    return words


def _phrase_table() -> dict[tuple[str, ...], tuple[FieldName, str]]:
    table: dict[tuple[str, ...], tuple[FieldName, str]] = {}

    def add(phrase: str, entry: tuple[FieldName, str]) -> None:
        words = tuple(_normalise(phrase))
        if words and phrase not in NEVER:
            table.setdefault(words, entry)

    for make, aliases in MAKE_ALIASES.items():
        add(make, ("make", make))
        for a in aliases:
            add(a, ("make", make))
    for colour, aliases in COLOUR_ALIASES.items():
        for a in aliases:
            add(a, ("colour", colour))
    for alias, body in BODY_ALIASES.items():
        add(alias, ("body", body))
    for body_type, category in BODY_CATEGORY.items():
        add(body_type, ("body", category))
    return table


_PHRASES = _phrase_table()
_MAX_WORDS = max(len(k) for k in _PHRASES)


def _year_from_word(word: str) -> int | None:
    if _FULL_YEAR.match(word):
        return int(word)
    m = _SHORT_YEAR.match(word)
    if m:
        return _expand_two_digits(int(m.group(1)))
    return None


def _expand_two_digits(yy: int) -> int:
    """'12 -> 2012, '95 -> 1995: the 2000s up to next year, else the 1900s."""
    pivot = (date.today().year + 1) % 100
    return 2000 + yy if yy <= pivot else 1900 + yy


def _decade(word: str) -> int | None:
    m = _DECADE.match(word)
    if not m:
        return None
    d = m.group(1)
    return int(d) if len(d) == 4 else _expand_two_digits(int(d))


def _year_candidate(words: Sequence[str], i: int) -> tuple[int, int | None, int | None]:
    """(words used, lo, hi) for a year expression at position i, or (0, None, None)."""
    w = words[i]
    nxt = words[i + 1] if i + 1 < len(words) else ""
    after = words[i + 2] if i + 2 < len(words) else ""
    if w in _PART and _decade(nxt) is not None:
        start = _decade(nxt) or 0
        a, b = _PART[w]
        return 2, start + a, start + b
    if w == "between" and _year_from_word(nxt) and after == "and" and i + 3 < len(words):
        hi = _year_from_word(words[i + 3])
        if hi is not None:
            lo = _year_from_word(nxt) or 0
            return 4, min(lo, hi), max(lo, hi)
    if w in ("before", "pre") and _year_from_word(nxt):
        return 2, None, (_year_from_word(nxt) or 0) - 1
    if w in ("after", "post") and _year_from_word(nxt):
        return 2, (_year_from_word(nxt) or 0) + 1, None
    if w == "since" and _year_from_word(nxt):
        return 2, _year_from_word(nxt), None
    m = _RANGE.match(w)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        return 1, min(lo, hi), max(lo, hi)
    year = _year_from_word(w)
    if year is not None:
        if nxt == "to" and _year_from_word(after):
            hi = _year_from_word(after) or 0
            return 3, min(year, hi), max(year, hi)
        if nxt == "or" and after in ("newer", "later", "above"):
            return 3, year, None
        if nxt == "or" and after in ("older", "earlier", "below"):
            return 3, None, year
        return 1, year, year
    decade = _decade(w)
    if decade is not None:
        return 1, decade, decade + 9
    return 0, None, None


# Vague time words: phrase -> (which end of the collection's years, fraction of them).
_VAGUE: dict[tuple[str, ...], tuple[Literal["old", "new"], int]] = {
    ("older", "model"): ("old", 3), ("old", "model"): ("old", 3),
    ("older",): ("old", 3), ("old",): ("old", 3),
    ("classic",): ("old", 10), ("vintage",): ("old", 10),
    ("newer", "model"): ("new", 3), ("new", "model"): ("new", 3), ("newer",): ("new", 3),
    ("recent",): ("new", 3), ("late", "model"): ("new", 3),
    ("latest",): ("new", 10), ("newest",): ("new", 10),
}


def _vague_at(words: Sequence[str], i: int) -> tuple[int, str, Literal["old", "new"], int]:
    """(words used, phrase, end, fraction) for a vague time word at position i."""
    for n in (2, 1):
        phrase = tuple(words[i : i + n])
        if len(phrase) == n and phrase in _VAGUE:
            end, part = _VAGUE[phrase]
            return n, " ".join(phrase), end, part
    return 0, "", "old", 0


def vague_years(end: Literal["old", "new"], part: int, years: Sequence[int]
                ) -> tuple[int, int] | None:
    """The year range a vague word means among ``years`` (the collection's model years):
    the oldest or newest ceil(n / part) distinct years; None when no year is known."""
    distinct = sorted(set(years))
    if not distinct:
        return None
    n = -(-len(distinct) // part)
    chosen = distinct[:n] if end == "old" else distinct[-n:]
    return chosen[0], chosen[-1]


def _year_label(lo: int | None, hi: int | None) -> str:
    if lo is not None and lo == hi:
        return str(lo)
    return f"{lo if lo is not None else ''}-{hi if hi is not None else ''}"


def _parse_year_value(value: str) -> tuple[int | None, int | None]:
    if "-" not in value:
        return int(value), int(value)
    lo, hi = value.split("-", 1)
    return (int(lo) if lo else None), (int(hi) if hi else None)


@dataclass(frozen=True)
class _Vague:
    phrase: str
    end: Literal["old", "new"]
    part: int


def _indexed_makes(vocab: FilterVocabulary) -> dict[tuple[str, ...], tuple[FieldName, str]]:
    """Phrases for the indexed makes the built-in table does not know: a make a person
    labelled through the queue ("Zephyr") is read from a query like the built-in ones."""
    extra: dict[tuple[str, ...], tuple[FieldName, str]] = {}
    for make in vocab.makes:
        words = tuple(_normalise(make))
        if words and words not in _PHRASES and make not in NEVER:
            extra[words] = ("make", make)
    return extra


def _lookup(phrase: tuple[str, ...], extra: dict[tuple[str, ...], tuple[FieldName, str]],
            ) -> tuple[FieldName, str] | None:
    """The facet a phrase names; a plural ("pickups", "SUVs", "sedans") reads as its
    singular (the last word less its "s", words of four letters or more)."""
    entry = _PHRASES.get(phrase) or extra.get(phrase)
    last = phrase[-1]
    if entry is None and len(last) > 3 and last.endswith("s"):
        single = (*phrase[:-1], last[:-1])
        entry = _PHRASES.get(single) or extra.get(single)
    return entry


def _candidates(
    words: list[str],
    extra: dict[tuple[str, ...], tuple[FieldName, str]] | None = None,
) -> tuple[list[_Candidate], list[tuple[int | None, int | None]], list[_Vague]]:
    extra = extra or {}
    longest = max([_MAX_WORDS, *(len(k) for k in extra)])
    found: list[_Candidate] = []
    years: list[tuple[int | None, int | None]] = []
    vague: list[_Vague] = []
    i = 0
    while i < len(words):
        used, lo, hi = _year_candidate(words, i)
        if used:
            years.append((lo, hi))
            i += used
            continue
        used, phrase, end, part = _vague_at(words, i)
        if used:
            vague.append(_Vague(phrase, end, part))
            i += used
            continue
        for n in range(min(longest, len(words) - i), 0, -1):
            phrase = tuple(words[i : i + n])
            entry = _lookup(phrase, extra)
            if entry is not None:
                text = " ".join(phrase)
                found.append(_Candidate(entry[0], entry[1], text, text in AMBIGUOUS))
                i += n
                break
        else:
            i += 1
    return found, years, vague


def _merge_years(years: list[tuple[int | None, int | None]]) -> tuple[int | None, int | None]:
    los = [lo for lo, _ in years]
    his = [hi for _, hi in years]
    lo = None if any(v is None for v in los) else min(v for v in los if v is not None)
    hi = None if any(v is None for v in his) else max(v for v in his if v is not None)
    return lo, hi


def parse_query(text: str, vocab: FilterVocabulary) -> ParsedQuery:
    """Read filters from a query; only values that exist in `vocab` become chips.
    Negations ("not red", "no pickups", "except Ford", "no roof rack") become exclusion
    chips or negative terms (`split_negations`)."""
    all_words = _normalise(text)
    extra = _indexed_makes(vocab)
    words, negated, negative = split_negations(all_words, extra)
    parsed = _parse_positive(text, words, vocab, extra)
    exclusions, ignored = _exclusions(negated, vocab, firm=bool(parsed.chips) or any(
        not c.ambiguous for c in negated if isinstance(c, _Candidate)))
    positive = text if len(words) == len(all_words) else " ".join(words)
    return replace(parsed, exclusions=exclusions, ignored=parsed.ignored + ignored,
                   negative=negative, positive=positive,
                   remaining=_remaining(words, vocab, extra))


def _parse_positive(text: str, words: list[str], vocab: FilterVocabulary,
                    extra: dict[tuple[str, ...], tuple[FieldName, str]]) -> ParsedQuery:
    """The filter chips of the words that are not negated."""
    found, years, vague = _candidates(words, extra)
    if not any(not c.ambiguous for c in found) and not years and not vague:
        found = []  # only ambiguous words: read the query as plain text
    else:
        found = [c for c in found if not c.ambiguous or _has_firm(found, years or vague)]
    chips: list[FilterChip] = []
    ignored: list[str] = []
    for c in found:
        if c.value in vocab.values(c.field):
            chip = FilterChip(c.field, c.value, c.phrase)
            if chip not in chips:
                chips.append(chip)
        else:
            ignored.append(f"'{c.phrase}' ({c.field} {c.value}): none indexed")
    if years:
        lo, hi = _merge_years(years)
        label = _year_label(lo, hi)
        if vocab.has_year_in(lo, hi):
            chips.append(FilterChip("year", label, label))
        else:
            ignored.append(f"year {label}: no indexed vehicle from then")
        ignored.extend(f"'{v.phrase}': the query names a year" for v in vague)
    elif vague:
        spans = [vague_years(v.end, v.part, vocab.years) for v in vague]
        if any(span is None for span in spans):
            ignored.append(f"'{vague[0].phrase}': no indexed vehicle has a year")
        else:
            lo = min(span[0] for span in spans if span is not None)
            hi = max(span[1] for span in spans if span is not None)
            phrase = " ".join(dict.fromkeys(v.phrase for v in vague))
            chips.append(FilterChip("year", _year_label(lo, hi), phrase, vague=True))
    chips_t = tuple(chips)
    return ParsedQuery(text, chips_t, tuple(ignored), filters_from_chips(chips_t))


# -- negation ----------------------------------------------------------------------------
# Words that negate what follows them ("non-red" reads as "non red"); "but not" and
# "except for" are these after a filler word.
NEGATORS: frozenset[str] = frozenset(
    {"not", "no", "non", "without", "except", "excluding", "exclude", "minus", "nor"})
_NEG_FILLER = frozenset({"a", "an", "any", "the", "for", "than", "of"})
_NEG_JOIN = frozenset({"or", "nor"})
# Words that end a negated concept with no facet ("no roof rack, with a spoiler").
_BOUNDARY = frozenset({"and", "but", "with", "or", "nor", "in", "from", "that", "which",
                       "please", "only", "just"} | NEGATORS)
_MAX_NEGATIVE_WORDS = 3
# Words an image + text query's text leaves out ("like this one but blue" -> nothing).
FILLER: frozenset[str] = frozenset(
    {"like", "this", "that", "these", "one", "ones", "but", "and", "a", "an", "the",
     "in", "of", "with", "same", "similar", "to", "more", "show", "me", "find", "i",
     "want", "looking", "for", "photo", "photos", "picture", "pictures", "image", "car",
     "cars", "vehicle", "vehicles", "please", "it", "is", "only", "just", "as", "other",
     "another", "version", "instead", "model", "some", "any"})


@dataclass(frozen=True)
class _NegYear:
    lo: int | None
    hi: int | None
    phrase: str


def _facet_at(words: Sequence[str], i: int,
              extra: dict[tuple[str, ...], tuple[FieldName, str]],
              ) -> tuple[int, _Candidate | _NegYear | None]:
    """(words used, what) for a facet phrase or a year expression at position i; a
    plural ("pickups", "SUVs") reads as its singular."""
    used, lo, hi = _year_candidate(words, i)
    if used:
        return used, _NegYear(lo, hi, " ".join(words[i:i + used]))
    longest = max([_MAX_WORDS, *(len(k) for k in extra)])
    for n in range(min(longest, len(words) - i), 0, -1):
        phrase = tuple(words[i:i + n])
        entry = _lookup(phrase, extra)
        if entry is not None:
            text = " ".join(phrase)
            return n, _Candidate(entry[0], entry[1], text, text in AMBIGUOUS)
    return 0, None


def split_negations(
    words: list[str], extra: dict[tuple[str, ...], tuple[FieldName, str]] | None = None,
) -> tuple[list[str], list[_Candidate | _NegYear], tuple[str, ...]]:
    """(the words outside every negation, the negated facets and years, the negated
    concepts with no facet).

    A negator ("not", "no", "non", "without", "except", "excluding", "minus") takes the
    facet phrases or year expressions right after it, joined by "or" ("not red or
    blue"); when none follows, the next words up to a boundary (at most three: "no roof
    rack") are a negated concept instead. "but not", "except for", "other than" and "anything
    but" read the same way."""
    extra = extra or {}
    kept: list[str] = []
    facets: list[_Candidate | _NegYear] = []
    concepts: list[str] = []
    i = 0
    n = len(words)
    while i < n:
        w = words[i]
        negates = w in NEGATORS or (w == "other" and i + 1 < n and words[i + 1] == "than")
        if not negates:
            kept.append(w)
            i += 1
            continue
        j = i + 1
        while j < n and words[j] in _NEG_FILLER:
            j += 1
        got = False
        while j < n:
            used, what = _facet_at(words, j, extra)
            if what is None:
                break
            facets.append(what)
            got = True
            j += used
            if j + 1 < n and words[j] in _NEG_JOIN:
                nxt = _facet_at(words, j + 1, extra)[1]
                if nxt is not None:
                    j += 1
                    continue
            break
        if not got:
            start = j
            while (j < n and j - start < _MAX_NEGATIVE_WORDS and words[j] not in _BOUNDARY
                   and _facet_at(words, j, extra)[1] is None):
                j += 1
            concept = " ".join(words[start:j])
            if concept:
                concepts.append(concept)
            elif j == i + 1:  # a bare negator ("not" at the end): keep it as text
                kept.append(w)
        i = max(j, i + 1)
    return kept, facets, tuple(dict.fromkeys(concepts))


def _exclusions(negated: Sequence[_Candidate | _NegYear], vocab: FilterVocabulary,
                firm: bool) -> tuple[tuple[FilterChip, ...], tuple[str, ...]]:
    """Exclusion chips for the negated facets that exist in ``vocab`` (an ambiguous word
    counts only beside a firm mention, as for filters), and notes for the rest."""
    chips: list[FilterChip] = []
    ignored: list[str] = []
    years = [x for x in negated if isinstance(x, _NegYear)]
    for c in negated:
        if not isinstance(c, _Candidate):
            continue
        if c.ambiguous and not firm:
            ignored.append(f"'not {c.phrase}': ambiguous alone, not excluded")
        elif c.value in vocab.values(c.field):
            chip = FilterChip(c.field, c.value, c.phrase, negated=True)
            if chip not in chips:
                chips.append(chip)
        else:
            ignored.append(f"'not {c.phrase}' ({c.field} {c.value}): none indexed")
    if years:
        lo, hi = _merge_years([(y.lo, y.hi) for y in years])
        # Within the years a filter can name (1886-2100): beyond them nothing is excluded.
        lo = None if lo is None or lo <= 1886 else min(lo, 2100)
        hi = None if hi is None or hi >= 2100 else max(hi, 1886)
        label = _year_label(lo, hi)
        phrase = " ".join(y.phrase for y in years)
        if not vocab.has_year_in(lo, hi):
            ignored.append(f"'not {phrase}': no indexed vehicle from then")
        elif lo is None and hi is None:
            ignored.append(f"'not {phrase}': that would exclude every year")
        else:
            chips.append(FilterChip("year", label, phrase, negated=True))
    return tuple(chips), tuple(ignored)


def _remaining(words: Sequence[str], vocab: FilterVocabulary,
               extra: dict[tuple[str, ...], tuple[FieldName, str]]) -> str:
    """The words that are not a facet with an indexed value, a year, a vague time word
    or filler."""
    out: list[str] = []
    i = 0
    while i < len(words):
        used, what = _facet_at(words, i, extra)
        if isinstance(what, _Candidate) and what.value not in vocab.values(what.field):
            used = 0  # nothing indexed filters on it: its words still rank
        if not used:
            used = _vague_at(words, i)[0]
        if used:
            i += used
            continue
        if words[i] not in FILLER:
            out.append(words[i])
        i += 1
    return " ".join(out)


def exclusion_filters(chips: Iterable[FilterChip]) -> SearchFilters:
    """The exclusion (as a SearchFilters of the values to leave out) of negated chips."""
    return filters_from_chips(c for c in chips if c.negated)


def check_contradictions(chips: Sequence[FilterChip], exclude: SearchFilters) -> None:
    """A QueryError when a filter asks for what an exclusion leaves out ("red ... not
    red"), naming both."""
    for c in chips:
        if c.field == "year":
            lo, hi = c.year_bounds()
            xlo, xhi = exclude.year_min, exclude.year_max
            if xlo is None and xhi is None:
                continue
            inside = ((xlo is None or (lo is not None and lo >= xlo))
                      and (xhi is None or (hi is not None and hi <= xhi)))
            if inside:
                raise QueryError(
                    f"contradictory query: it asks for year {c.value} and excludes "
                    f"{_year_label(xlo, xhi)}; remove one of them")
            continue
        values = {v.lower() for v in getattr(exclude, c.field)}
        if c.value.lower() in values:
            raise QueryError(
                f"contradictory query: it asks for {c.field} {c.value} and excludes it "
                f"('not {c.value}'); remove one of them")


def _has_firm(found: list[_Candidate], years: list[Any]) -> bool:
    return bool(years) or any(not c.ambiguous for c in found)


def filters_from_chips(chips: Iterable[FilterChip]) -> SearchFilters:
    """The search filters a set of chips stands for (same-field values mean "any of")."""
    data: dict[str, list[str]] = {"make": [], "colour": [], "body": []}
    year_min: int | None = None
    year_max: int | None = None
    for chip in chips:
        if chip.field == "year":
            year_min, year_max = chip.year_bounds()
        else:
            data[chip.field].append(chip.value)
    return SearchFilters(
        make=tuple(data["make"]), colour=tuple(data["colour"]), body=tuple(data["body"]),
        year_min=year_min, year_max=year_max,
    )


def merge_filters(parsed: SearchFilters, picked: SearchFilters) -> SearchFilters:
    """Filters picked on the page override parsed ones, field by field."""
    out = parsed.model_dump()
    chosen = picked.model_dump()
    for name in ("make", "body", "colour", "source"):
        if chosen[name]:
            out[name] = chosen[name]
    if chosen["year_min"] is not None or chosen["year_max"] is not None:
        out["year_min"], out["year_max"] = chosen["year_min"], chosen["year_max"]
    if chosen["exclude"] is not None:
        out["exclude"] = chosen["exclude"]
    return SearchFilters(**out)


# -- relaxation --------------------------------------------------------------------------
# Most certain first; relaxation drops from the end (see the module docstring).
CERTAINTY: tuple[str, ...] = ("make", "body", "year", "colour", "vague year", "inferred")


def relaxation_tiers(chips: Sequence[FilterChip]) -> list[tuple[FilterChip, ...]]:
    """Every subset of the chips' units (a field, or the vague year), as the chips to
    keep, in the order a search tries them: all of them first, none last, and in between
    a subset before another when it keeps a more certain unit (so "Mercedes-Benz coupe"
    gives Mercedes-Benz coupes, then Mercedes-Benz of any body, then coupes, then the
    nearest vehicles). Same-field chips ("red or blue") go together."""
    units = [u for u in CERTAINTY if any(c.unit == u for c in chips)]
    weight = {u: 2 ** (len(CERTAINTY) - i) for i, u in enumerate(CERTAINTY)}
    subsets = [
        {u for j, u in enumerate(units) if mask >> j & 1} for mask in range(2 ** len(units))
    ]
    subsets.sort(key=lambda kept: -sum(weight[u] for u in kept))
    return [tuple(c for c in chips if c.unit in kept) for kept in subsets]


_ANY = {"make": "make", "body": "body", "colour": "colour", "year": "year",
        "vague year": "year", "inferred": "body"}


def describe_chips(chips: Sequence[FilterChip], dropped: Sequence[FilterChip] = ()) -> str:
    """Chips as a phrase: "red Chevrolet pickup from 2012", "Mercedes-Benz of any body",
    "the nearest vehicles" (none kept)."""
    def values(name: str) -> str:
        return " or ".join(c.value for c in chips if c.field == name)

    year = next((c for c in chips if c.field == "year"), None)
    if not chips:
        return "the nearest vehicles"
    what = " ".join(v for v in (values("make"), values("body")) if v) or "vehicles"
    noun = " ".join(v for v in (values("colour"), what) if v)
    if year is not None:
        lo, hi = year.year_bounds()
        when = (f"from {lo}" if lo == hi else f"from {lo}-{hi}" if lo and hi
                else f"from {lo} on" if lo else f"up to {hi}")
        noun = f"{noun} {when}"
    gone = [_ANY[u] for u in dict.fromkeys(c.unit for c in dropped)
            if not any(k.field == _ANY[u] for k in chips)]
    if gone:
        noun += " of any " + " or ".join(dict.fromkeys(gone))
    return noun
