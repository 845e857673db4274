"""The filter model: typed metadata filters, and the one place they become a Milvus
expression.

Each stored vector carries scalar fields (make, body, colour, source, year) that filters
select on. `SearchFilters` accepts only plain names (letters, digits, space, ``-./&'``)
and years in range; `build_filter_expression` then quotes every value as a JSON string
literal, so no filter value reaches a Milvus expression as typed. Every store (the
Milvus adapter, the mirror, the in-memory store) gives a filter the meaning of that
expression: exact match on the stored (truncated) value, inclusive year bounds.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from carsearch.platform.errors import QueryError

SCALAR_FIELDS: dict[str, int] = {"make": 64, "body": 32, "colour": 32, "source": 64}
# Letters (any script), digits, space and a few joiners: everything a make, body type,
# colour or source name needs, and nothing an expression could be built from.
_SAFE_VALUE = re.compile(r"^[\w][\w .\-/&']{0,63}$", re.UNICODE)


class SearchFilters(BaseModel):
    """Typed metadata filters. Lists mean "any of"; an empty list means no filter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    make: tuple[str, ...] = ()
    body: tuple[str, ...] = ()
    colour: tuple[str, ...] = ()
    source: tuple[str, ...] = ()
    year_min: int | None = Field(default=None, ge=1886, le=2100)
    year_max: int | None = Field(default=None, ge=1886, le=2100)
    # Values no row may have (each field on its own: "not red, no pickups" drops red
    # vehicles and pickups), and a year range no row may fall in. Hard: never relaxed.
    exclude: SearchFilters | None = None

    @field_validator("make", "body", "colour", "source", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        if v is None:
            return ()
        if isinstance(v, str):
            return (v,)
        return v

    @field_validator("make", "body", "colour", "source")
    @classmethod
    def _safe_values(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) > 32:
            raise ValueError("at most 32 values per filter")
        out = []
        for item in v:
            item = item.strip()
            if not _SAFE_VALUE.fullmatch(item):
                raise ValueError(f"unusable filter value {item!r}")
            out.append(item)
        return tuple(out)

    @model_validator(mode="after")
    def _year_order(self) -> SearchFilters:
        lo, hi = self.year_min, self.year_max
        if lo is not None and hi is not None and lo > hi:
            raise ValueError("year_min is after year_max")
        if self.exclude is not None and self.exclude.exclude is not None:
            raise ValueError("an exclusion has no exclusions of its own")
        return self

    def is_empty(self) -> bool:
        return not (self.make or self.body or self.colour or self.source) and (
            self.year_min is None and self.year_max is None
        ) and (self.exclude is None or self.exclude.is_empty())

    def excluding(self, other: SearchFilters | None) -> SearchFilters:
        """These filters with ``other``'s values added to the exclusions."""
        if other is None or other.is_empty():
            return self
        mine = self.exclude.model_dump() if self.exclude is not None else {}
        theirs = other.model_dump()
        merged: dict[str, Any] = {}
        for name in ("make", "body", "colour", "source"):
            merged[name] = tuple(dict.fromkeys([*mine.get(name, ()), *theirs[name]]))
        ranges = [(d.get("year_min"), d.get("year_max")) for d in (mine, theirs)
                  if d.get("year_min") is not None or d.get("year_max") is not None]
        if len(ranges) > 1:
            raise QueryError("one year range can be excluded at a time")
        if ranges:
            merged["year_min"], merged["year_max"] = ranges[0]
        return self.model_copy(update={"exclude": SearchFilters(**merged)})


def _quote(value: str) -> str:
    # A JSON string literal is a valid Milvus string literal: quotes and backslashes
    # are escaped. Values were already checked against _SAFE_VALUE.
    return json.dumps(value, ensure_ascii=False)


def build_filter_expression(filters: SearchFilters | None) -> str:
    """The Milvus boolean expression for typed filters ("" for none)."""
    if filters is None or filters.is_empty():
        return ""
    clauses: list[str] = []
    for name in ("make", "body", "colour", "source"):
        values: tuple[str, ...] = getattr(filters, name)
        if values:
            clauses.append(f"{name} in [{', '.join(_quote(v) for v in values)}]")
    if filters.year_min is not None:
        clauses.append(f"year >= {int(filters.year_min)}")
    if filters.year_max is not None:
        clauses.append(f"year <= {int(filters.year_max)}")
    ex = filters.exclude
    if ex is not None:
        for name in ("make", "body", "colour", "source"):
            values = getattr(ex, name)
            if values:
                clauses.append(f"{name} not in [{', '.join(_quote(v) for v in values)}]")
        if ex.year_min is not None and ex.year_max is not None:
            clauses.append(f"(year < {int(ex.year_min)} or year > {int(ex.year_max)})")
        elif ex.year_min is not None:
            clauses.append(f"year < {int(ex.year_min)}")
        elif ex.year_max is not None:
            clauses.append(f"year > {int(ex.year_max)}")
    return " and ".join(clauses)
