"""Held-out phrasings: queries from a generator configuration that training never uses.

The offline generator that writes training queries (`data.augment.offline`) fills
slots in the order colour, year, make, model, body with its own prefixes ("show me",
"pics of") and letter-swap typos. This one writes whole sentences from templates that
generator never produces ("i need the grey one, a 2012 chevrolet silverado 1500",
"silverado 1500 made by chevrolet in 2012"), typos by dropping a letter, and its own seed
space, so a model that only learnt the training phrasings is not rewarded here.

Every query comes with the attributes it names (`HeldOutQuery.attributes`: make, model,
year, colour, body); an image is a positive when its labels satisfy all of them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from carsearch.platform.search.evaluation import satisfies
from carsearch.platform.vehicles import VehicleLabel

__all__ = ["HELD_OUT_SEED", "TEMPLATES", "HeldOutQuery", "held_out_query", "satisfies"]

HELD_OUT_SEED = 90_210  # never a training seed: the training generator takes --seed

# {c} colour, {y} year, {m} make, {o} model, {b} body; a template is used only when every
# slot it names is known for the label.
TEMPLATES: tuple[str, ...] = (
    "i need the {c} one, a {y} {m} {o}",
    "{o} made by {m} in {y}",
    "{m} {o}, {c} paint",
    "photos where there is a {c} {m} {o} {b}",
    "{y} model year {m} {o}",
    "the {o} from {m}",
    "{m}'s {o} {b} in {c}",
    "find me {m} {o} {y} please",
)


@dataclass(frozen=True)
class HeldOutQuery:
    text: str
    attributes: dict[str, Any] = field(default_factory=dict)


def _drop_letter(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    return word[:i] + word[i + 1:]


def held_out_query(label: VehicleLabel, key: str, seed: int = HELD_OUT_SEED,
                   typo_rate: float = 0.1) -> HeldOutQuery | None:
    """One held-out query for a label (None when no template fits it)."""
    rng = random.Random(f"heldout|{seed}|{key}|{label.class_name}|{label.colour}")
    slots = {"m": label.make.lower(), "o": label.model.lower(),
             "y": str(label.year) if label.year else None, "c": label.colour,
             "b": label.body_category}
    fitting = [t for t in TEMPLATES
               if all(slots.get(s) for s in ("m", "o", "y", "c", "b") if "{" + s + "}" in t)]
    if not fitting or not slots["o"]:
        return None
    template = rng.choice(fitting)
    text = template.format(**{k: v or "" for k, v in slots.items()})
    words = [_drop_letter(w, rng) if w.isalpha() and len(w) >= 6 and rng.random() < typo_rate
             else w for w in text.split()]
    names = {"m": "make", "o": "model", "y": "year", "c": "colour", "b": "body"}
    values = {"m": label.make, "o": label.model, "y": label.year, "c": label.colour,
              "b": label.body_category}
    attributes = {names[s]: values[s] for s in names if "{" + s + "}" in template}
    return HeldOutQuery(" ".join(words), attributes)
