"""The offline query generator: deterministic rules that type like a hurried person.

Every call draws from its own `random.Random`, seeded by (seed, key, label), so the
same image always gets the same queries whatever ran before it, in any process. It
only uses facts the label carries: make aliases ("chevy", "merc", "vw", "bimmer"),
the model or its first word, body aliases ("truck", "pickup", "suv"), the colour where
the label has one, and year phrasing that fits the year ("2012", "'12", "late 2000s",
"older model", "newer"); then it drops words, shuffles them, and adds typos.
"""

from __future__ import annotations

import random

from carsearch.data.augment.rules import AMBIGUOUS_MAKE_ALIASES, year_phrases
from carsearch.platform.vehicles import (
    BODY_ALIASES,
    COLOUR_ALIASES,
    MAKE_ALIASES,
    VehicleLabel,
)

PREFIXES: tuple[str, ...] = ("", "", "", "", "a ", "looking for ", "show me ", "pics of ",
                             "any ", "photo of a ")
_GENERIC = ("car", "vehicle")


def make_phrases(label: VehicleLabel) -> list[str]:
    """Words for the label's make, the canonical name weighted twice."""
    aliases = [a for a in MAKE_ALIASES.get(label.make, ()) if a not in AMBIGUOUS_MAKE_ALIASES]
    return [label.make.lower(), label.make.lower(), *aliases]


def model_phrases(label: VehicleLabel) -> list[str]:
    """The model, and its first word when it has several ("silverado 1500" -> "silverado")."""
    model = label.model.lower()
    if not model:
        return []
    words = model.split()
    return [model, words[0]] if len(words) > 1 else [model]


def body_phrases(label: VehicleLabel) -> list[str]:
    """Words for the body (the plain category weighted up); a cab alias only for its cab."""
    category = label.body_category
    if category is None:
        return list(_GENERIC)
    own = (label.body_type or "").lower()
    return [category, *(["truck"] if category == "pickup" else [])] + [
        alias
        for alias, cat in BODY_ALIASES.items()
        if cat == category and ("cab" not in alias or alias == own)
    ]


def colour_phrases(label: VehicleLabel) -> list[str]:
    return list(COLOUR_ALIASES.get(label.colour, ())) if label.colour else []


def typo(word: str, rng: random.Random) -> str:
    """Swap two neighbouring letters, drop one, or double one."""
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
    if kind == 1:
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]


class OfflineGenerator:
    """Deterministic, rule-based query generator; no network."""

    name = "offline"

    def __init__(self, seed: int = 0, typo_rate: float = 0.15, max_tries: int = 20) -> None:
        self.seed = seed
        self.typo_rate = typo_rate
        self.max_tries = max_tries

    def _rng(self, label: VehicleLabel, key: str) -> random.Random:
        return random.Random(f"{self.seed}|{key}|{label.class_name}|{label.colour}")

    def generate(self, label: VehicleLabel, n: int, *, key: str = "") -> list[str]:
        """Up to `n` distinct queries for `label`; `key` (the image id) varies them."""
        rng = self._rng(label, key)
        out: list[str] = []
        seen: set[str] = set()
        for _ in range(n * self.max_tries):
            if len(out) >= n:
                break
            query = self._one(label, rng)
            if query and query.lower() not in seen:
                seen.add(query.lower())
                out.append(query)
        return out

    def _slots(self, label: VehicleLabel, rng: random.Random) -> dict[str, str]:
        options = {
            "colour": colour_phrases(label),
            "year": year_phrases(label.year),
            "make": make_phrases(label),
            "model": model_phrases(label),
            "body": body_phrases(label),
        }
        keep = {"colour": 0.8, "year": 0.6, "make": 0.75, "model": 0.6, "body": 0.6}
        slots = {k: rng.choice(v) for k, v in options.items() if v and rng.random() < keep[k]}
        if not {"make", "model"} & slots.keys():
            core = "make" if rng.random() < 0.6 or not options["model"] else "model"
            slots[core] = rng.choice(options[core])
        return slots

    def _one(self, label: VehicleLabel, rng: random.Random) -> str:
        slots = self._slots(label, rng)
        order = ["colour", "year", "make", "model", "body"]
        if rng.random() < 0.3:
            rng.shuffle(order)
        elif rng.random() < 0.3:  # the year typed last: "chevy silverado 2012"
            order.remove("year")
            order.append("year")
        words = " ".join(slots[k] for k in order if k in slots).split()
        words = [
            typo(w, rng) if w.isalpha() and len(w) >= 4 and rng.random() < self.typo_rate else w
            for w in words
        ]
        prefix = rng.choice(PREFIXES)
        if prefix.endswith("a ") and words and words[0][0] in "aeiou8'":
            prefix = prefix[:-2] + "an "
        text = prefix + " ".join(words)
        if rng.random() < 0.1:
            text = text.capitalize()
        return text
