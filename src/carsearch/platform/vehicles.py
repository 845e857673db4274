"""The platform's domain: vehicle labels, the one vocabulary every part shares.

A class name follows the Stanford Cars pattern "Make Model [Body] Year"
("Chevrolet Silverado 1500 Extended Cab 2012"). `parse_class_name` splits it into
typed fields; the alias and colour tables serve query augmentation (training) and
natural-language filters (search) alike, so both read the same words the same way.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

# Makes whose name is more than one word; every other make is the first word.
MULTI_WORD_MAKES: tuple[str, ...] = ("AM General", "Aston Martin", "Land Rover")

# Body types, longest first so that "Crew Cab" wins over a bare "Cab".
BODY_TYPES: tuple[str, ...] = (
    "Extended Cab",
    "Regular Cab",
    "Crew Cab",
    "Quad Cab",
    "Club Cab",
    "SuperCab",
    "Convertible",
    "Hatchback",
    "Minivan",
    "Sedan",
    "Coupe",
    "Wagon",
    "Pickup",
    "SUV",
    "Van",
)

# The coarse category a person means by "pickup", "truck", "suv" ...
BODY_CATEGORY: dict[str, str] = {
    "Extended Cab": "pickup",
    "Regular Cab": "pickup",
    "Crew Cab": "pickup",
    "Quad Cab": "pickup",
    "Club Cab": "pickup",
    "SuperCab": "pickup",
    "Pickup": "pickup",
    "Convertible": "convertible",
    "Hatchback": "hatchback",
    "Minivan": "minivan",
    "Sedan": "sedan",
    "Coupe": "coupe",
    "Wagon": "wagon",
    "SUV": "suv",
    "Van": "van",
}

BODY_CATEGORIES: tuple[str, ...] = tuple(sorted(set(BODY_CATEGORY.values())))
_BODY_BY_LOWER = {k.lower(): v for k, v in BODY_CATEGORY.items()}


def body_category(body_type: str | None) -> str:
    """The filterable body category of a body type, whatever its case ("" for none).

    Stanford's "Regular Cab" and a sidecar's "pickup" both become "pickup"; a body type
    with no category is kept, lower-cased, so it can still be filtered on.
    """
    if not body_type:
        return ""
    key = body_type.strip().lower()
    return _BODY_BY_LOWER.get(key, key)

# Words people type for a body category.
BODY_ALIASES: dict[str, str] = {
    "pickup": "pickup",
    "pick-up": "pickup",
    "pick up": "pickup",
    "truck": "pickup",
    "crew cab": "pickup",
    "extended cab": "pickup",
    "regular cab": "pickup",
    "convertible": "convertible",
    "cabrio": "convertible",
    "cabriolet": "convertible",
    "roadster": "convertible",
    "drop top": "convertible",
    "droptop": "convertible",
    "hatchback": "hatchback",
    "hatch": "hatchback",
    "minivan": "minivan",
    "mini van": "minivan",
    "people carrier": "minivan",
    "sedan": "sedan",
    "saloon": "sedan",
    "coupe": "coupe",
    "coupé": "coupe",
    "wagon": "wagon",
    "estate": "wagon",
    "station wagon": "wagon",
    "suv": "suv",
    "crossover": "suv",
    "4x4": "suv",
    "van": "van",
    "cargo van": "van",
}

# Canonical makes (as Stanford Cars spells them) and the words people use for them.
MAKE_ALIASES: dict[str, tuple[str, ...]] = {
    "AM General": ("am general", "amg hummer"),
    "Acura": ("acura",),
    "Aston Martin": ("aston martin", "aston", "am"),
    "Audi": ("audi",),
    "BMW": ("bmw", "bimmer", "beemer", "beamer"),
    "Bentley": ("bentley",),
    "Bugatti": ("bugatti",),
    "Buick": ("buick",),
    "Cadillac": ("cadillac", "caddy", "caddie"),
    "Chevrolet": ("chevrolet", "chevy", "chev"),
    "Chrysler": ("chrysler",),
    "Daewoo": ("daewoo",),
    "Dodge": ("dodge",),
    "Eagle": ("eagle",),
    "FIAT": ("fiat",),
    "Ferrari": ("ferrari", "ferarri"),
    "Fisker": ("fisker",),
    "Ford": ("ford",),
    "GMC": ("gmc",),
    "Geo": ("geo",),
    "HUMMER": ("hummer",),
    "Honda": ("honda",),
    "Hyundai": ("hyundai", "hyundia"),
    "Infiniti": ("infiniti", "infinity"),
    "Isuzu": ("isuzu",),
    "Jaguar": ("jaguar", "jag"),
    "Jeep": ("jeep",),
    "Lamborghini": ("lamborghini", "lambo"),
    "Land Rover": ("land rover", "landrover"),
    "Lincoln": ("lincoln",),
    "MINI": ("mini", "mini cooper"),
    "Maybach": ("maybach",),
    "Mazda": ("mazda",),
    "McLaren": ("mclaren",),
    "Mercedes-Benz": ("mercedes-benz", "mercedes benz", "mercedes", "merc", "benz", "mb"),
    "Mitsubishi": ("mitsubishi",),
    "Nissan": ("nissan",),
    "Plymouth": ("plymouth",),
    "Porsche": ("porsche", "porche"),
    "Ram": ("ram",),
    "Rolls-Royce": ("rolls-royce", "rolls royce", "rolls", "roller"),
    "Scion": ("scion",),
    "Spyker": ("spyker",),
    "Suzuki": ("suzuki",),
    "Tesla": ("tesla",),
    "Toyota": ("toyota", "yota"),
    "Volkswagen": ("volkswagen", "vw", "vdub"),
    "Volvo": ("volvo",),
    "smart": ("smart", "smart car"),
}

# Canonical colours and the words that mean them.
COLOUR_ALIASES: dict[str, tuple[str, ...]] = {
    "red": ("red", "maroon", "burgundy", "crimson"),
    "blue": ("blue", "navy", "dark blue", "light blue"),
    "green": ("green", "dark green"),
    "yellow": ("yellow",),
    "orange": ("orange",),
    "black": ("black",),
    "white": ("white",),
    "silver": ("silver",),
    "grey": ("grey", "gray"),
    "brown": ("brown", "tan"),
    "beige": ("beige", "cream"),
    "gold": ("gold",),
    "purple": ("purple", "violet"),
}

COLOURS: tuple[str, ...] = tuple(COLOUR_ALIASES)

# How a model year is written, for every part that reads years out of text (class names,
# query filters, the augmentation judge): four digits 1800-2099, or 'NN.
YEAR = r"(?:1[89]|20)\d{2}"
SHORT_YEAR = r"'(\d{2})"
_YEAR = re.compile(rf"^{YEAR}$")


@dataclass(frozen=True)
class VehicleLabel:
    """The typed fields of one labelled vehicle."""

    class_name: str
    make: str
    model: str
    body_type: str | None
    year: int | None
    colour: str | None = None

    @property
    def body_category(self) -> str | None:
        return BODY_CATEGORY.get(self.body_type) if self.body_type else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split_make(words: list[str]) -> tuple[str, list[str]]:
    text = " ".join(words)
    for make in MULTI_WORD_MAKES:
        if text == make or text.startswith(make + " "):
            return make, words[len(make.split()) :]
    return words[0], words[1:]


def _split_body(words: list[str]) -> tuple[list[str], str | None]:
    for body in BODY_TYPES:
        n = len(body.split())
        if len(words) > n and " ".join(words[-n:]) == body:
            return words[:-n], body
    return words, None


def parse_class_name(class_name: str, colour: str | None = None) -> VehicleLabel:
    """Split "Make Model [Body] Year" into a VehicleLabel.

    Raises ValueError for an empty name. The year is None where the last word is not
    a four-digit year; the body type is None where the name carries none
    ("Chevrolet Corvette ZR1 2012").
    """
    words = class_name.split()
    if not words:
        raise ValueError("empty class name")
    year: int | None = None
    if _YEAR.match(words[-1]):
        year = int(words[-1])
        words = words[:-1]
    if not words:
        raise ValueError(f"class name has no make: {class_name!r}")
    make, rest = _split_make(words)
    rest, body = _split_body(rest)
    model = " ".join(rest)
    return VehicleLabel(
        class_name=class_name.strip(),
        make=make,
        model=model,
        body_type=body,
        year=year,
        colour=colour,
    )


def canonical_colour(word: str) -> str | None:
    """The canonical colour a word names ("gray" -> "grey"), or None."""
    w = word.strip().lower()
    for colour, aliases in COLOUR_ALIASES.items():
        if w in aliases:
            return colour
    return None


def canonical_make(text: str) -> str | None:
    """The canonical make a word or phrase names ("chevy" -> "Chevrolet"), or None."""
    w = text.strip().lower()
    for make, aliases in MAKE_ALIASES.items():
        if w == make.lower() or w in aliases:
            return make
    return None
