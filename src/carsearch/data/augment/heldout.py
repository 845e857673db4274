"""Held-out phrasings: the generator lives in `platform.search.heldout` (the served
evaluation and the page's Evaluation tab use it); re-exported here for the data tools."""

from carsearch.platform.search.heldout import (
    HELD_OUT_SEED,
    TEMPLATES,
    HeldOutQuery,
    held_out_query,
    satisfies,
)

__all__ = ["HELD_OUT_SEED", "TEMPLATES", "HeldOutQuery", "held_out_query", "satisfies"]
