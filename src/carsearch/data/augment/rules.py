"""The vocabulary of the guardrail judge: what a query may and may not claim about a label.

Shared by the offline generator (so it only writes what the judge accepts) and the
judge (so both read the same words the same way). Matching is on whole words of the
lower-cased query; a term that also occurs in the label's own class name is never held
against it ("Plymouth Neon" may say "neon", "GMC Terrain" may say "terrain", "AM General
Hummer" may say "hummer", "Silverado 1500 Classic" may say "classic").

Year phrasing (the collection spans 1991–2012, so relative words are read against 2012):

- an explicit year ("2012", "'12") must equal the label's year;
- a decade ("90s", "2000s", "'90s") must contain it; "early" means years 0–3 of the
  decade, "mid" 4–6, "late" 7–9 ("late 2000s" fits 2007–2009);
- "old", "older", "older model" fit years up to OLD_MAX_YEAR (2008);
- "classic", "vintage", "retro" fit years up to CLASSIC_MAX_YEAR (1999);
- "new", "newer", "recent", "modern", "late model", "latest" fit years from
  NEW_MIN_YEAR (2011);
- a label without a year supports no year phrasing at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache

from carsearch.platform.vehicles import (
    COLOUR_ALIASES,
    MAKE_ALIASES,
    SHORT_YEAR,
    YEAR,
    VehicleLabel,
)

MAX_QUERY_CHARS = 120
OLD_MAX_YEAR = 2008
CLASSIC_MAX_YEAR = 1999
NEW_MIN_YEAR = 2011

# Colour words beyond the canonical table: naming any of them is a colour claim too.
EXTRA_COLOURS: dict[str, str] = {
    "pink": "pink",
    "teal": "teal",
    "turquoise": "teal",
    "bronze": "bronze",
    "champagne": "beige",
    "charcoal": "grey",
    "gunmetal": "grey",
    "magenta": "purple",
    "lime": "green",
    "olive": "green",
    "scarlet": "red",
    "ivory": "white",
    "pearl": "white",
}

SCENE_TERMS: tuple[str, ...] = (
    "parking lot", "parking garage", "parking", "parked", "car park", "lot",
    "beach", "street", "road", "roadside", "highway", "freeway", "motorway", "traffic",
    "snow", "snowy", "ice", "icy", "rain", "rainy", "wet", "fog", "foggy",
    "garage", "driveway", "showroom", "dealership", "dealer lot", "car show",
    "night", "at night", "sunset", "sunrise", "dusk", "dawn", "sky",
    "desert", "forest", "woods", "field", "grass", "mountain", "mountains", "lake",
    "river", "bridge", "city", "downtown", "building", "house", "tree", "trees",
    "mud", "muddy", "dirt", "background", "scene", "indoors", "outdoors",
    "race track", "racetrack", "in front of", "next to",
)

AFTERMARKET_TERMS: tuple[str, ...] = (
    "spoiler", "rims", "custom rims", "chrome rims", "spinners", "aftermarket",
    "lift kit", "lifted", "lowered", "slammed", "roof rack", "roof box", "bike rack",
    "decal", "decals", "sticker", "stickers", "tint", "tinted", "window tint",
    "body kit", "bull bar", "bullbar", "light bar", "racing stripe", "racing stripes",
    "wrap", "wrapped", "vinyl", "custom paint", "custom", "tow hitch", "hitch",
    "snorkel", "exhaust", "underglow", "neon", "hood scoop", "tonneau", "bed cover",
    "winch", "mud tires", "off-road tires",
)

# Make aliases that are everyday words ("I am", "mini van", "smart looking"); only their
# longer forms ("aston martin", "mini cooper", "smart car") count as naming the make.
AMBIGUOUS_MAKE_ALIASES: frozenset[str] = frozenset({"am", "mini", "smart", "eagle", "roller"})

OLD_WORDS: tuple[str, ...] = ("older model", "older", "old")
CLASSIC_WORDS: tuple[str, ...] = ("classic", "vintage", "retro")
NEW_WORDS: tuple[str, ...] = ("late model", "brand new", "newer", "new", "recent", "modern",
                              "latest")

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})
_DECADE = re.compile(r"(?:\b(early|mid|late)[\s-]+)?(?<![\w])'?((?:19|20)?\d0)s\b")
_FULL_YEAR = re.compile(rf"(?<![\w'])({YEAR})(?![\w])")
_SHORT_YEAR = re.compile(rf"(?<![\w]){SHORT_YEAR}(?![\w])")


def normalise(text: str) -> str:
    """Lower case, straight quotes, single spaces."""
    return " ".join(text.translate(_QUOTES).lower().split())


@cache
def _term_pattern(term: str) -> re.Pattern[str]:
    return re.compile(r"(?<![a-z0-9])" + re.escape(term) + r"(?![a-z0-9])")


def has_term(text: str, term: str) -> bool:
    """Whether `term` occurs in normalised `text` as whole words."""
    return _term_pattern(term).search(text) is not None


def found_terms(text: str, terms: Iterable[str], label: VehicleLabel) -> list[str]:
    """The terms that occur in `text` and not in the label's own class name."""
    own = normalise(label.class_name)
    return [t for t in terms if has_term(text, t) and not has_term(own, t)]


@cache
def colour_terms() -> dict[str, str]:
    """Every colour word -> the colour it names."""
    table = {alias: colour for colour, aliases in COLOUR_ALIASES.items() for alias in aliases}
    table.update({w: c for w, c in EXTRA_COLOURS.items() if w not in table})
    return table


@cache
def make_terms() -> dict[str, str]:
    """Every unambiguous word or phrase for a make -> the canonical make."""
    table: dict[str, str] = {}
    for make, aliases in MAKE_ALIASES.items():
        for alias in (make.lower(), *aliases):
            if alias not in AMBIGUOUS_MAKE_ALIASES:
                table[alias] = make
    return table


def other_colours(text: str, label: VehicleLabel) -> list[str]:
    """Colour words in `text` the label does not support (any, where it has no colour)."""
    table = colour_terms()
    return [t for t in found_terms(text, table, label) if table[t] != label.colour]


def other_makes(text: str, label: VehicleLabel) -> list[str]:
    """Words in `text` that name a make other than the label's."""
    table = make_terms()
    return [t for t in found_terms(text, table, label) if table[t] != label.make]


def _decade_range(qualifier: str | None, digits: str) -> tuple[int, int]:
    start = int(digits)
    if len(digits) == 2:
        start += 2000 if start < 30 else 1900
    offsets = {"early": (0, 3), "mid": (4, 6), "late": (7, 9)}
    lo, hi = offsets.get(qualifier or "", (0, 9))
    return start + lo, start + hi


def _short_year(digits: str) -> int:
    value = int(digits)
    return value + (2000 if value < 30 else 1900)


def year_claims(text: str, label: VehicleLabel) -> list[tuple[str, tuple[int, int]]]:
    """Every year claim in `text` as (words, inclusive year range it allows)."""
    claims: list[tuple[str, tuple[int, int]]] = []
    rest = text
    for m in _DECADE.finditer(text):
        claims.append((m.group(0), _decade_range(m.group(1), m.group(2))))
    rest = _DECADE.sub(" ", rest)
    model_words = set(normalise(label.model).split())
    for m in _FULL_YEAR.finditer(rest):
        if m.group(1) not in model_words:
            year = int(m.group(1))
            claims.append((m.group(0), (year, year)))
    for m in _SHORT_YEAR.finditer(rest):
        year = _short_year(m.group(1))
        claims.append((m.group(0), (year, year)))
    for words, span in (
        (CLASSIC_WORDS, (0, CLASSIC_MAX_YEAR)),
        (OLD_WORDS, (0, OLD_MAX_YEAR)),
        (NEW_WORDS, (NEW_MIN_YEAR, 9999)),
    ):
        claims.extend((w, span) for w in found_terms(rest, words, label))
    return claims


def bad_year_claims(text: str, label: VehicleLabel) -> list[str]:
    """Year claims in `text` that the label's year does not satisfy."""
    bad = []
    for words, (lo, hi) in year_claims(text, label):
        if label.year is None or not lo <= label.year <= hi:
            bad.append(words)
    return bad


def year_phrases(year: int | None) -> list[str]:
    """Ways a person might type `year`, each one `bad_year_claims` accepts."""
    if year is None:
        return []
    decade = year - year % 10
    part = "early" if year % 10 <= 3 else "mid" if year % 10 <= 6 else "late"
    phrases = [str(year), str(year), f"'{year % 100:02d}", f"{part} {decade}s"]
    if decade < 2000:
        phrases += [f"{decade % 100}s", f"'{decade % 100}s"]
    if year <= CLASSIC_MAX_YEAR:
        phrases += ["classic", "vintage"]
    if year <= OLD_MAX_YEAR:
        phrases += ["older model", "older", "old"]
    if year >= NEW_MIN_YEAR:
        phrases += ["newer", "new", "late model", "recent"]
    return phrases
