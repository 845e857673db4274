"""Image collections: named sets of images searched together, side by side.

A collection has a kind, which says what its images carry and how they are searched:

- ``vehicles`` (the collection ``vehicles``, made by the migrations): make, model, year,
  body type and colour read from labels and sidecars, filters on all of them, and the
  filters read from the query text ("red 2012 chevy pickup");
- ``general`` (a photo collection such as Unsplash Lite's): a description and a
  photographer kept with each image and shown with the hits, a filter on the source, and
  no vehicle vocabulary (the query is searched as it is written).

Each collection has its own serving model version (the database allows one per
collection), its own Milvus collections (one per version, as before) and, on a Milvus
server, its own alias. A command that is not told a collection uses ``vehicles``, or the
only collection there is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select

from carsearch.platform.db import Collection, Database
from carsearch.platform.errors import CarsearchError

DEFAULT_COLLECTION = "vehicles"
SERVING_ALIAS = "carsearch_serving"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class Kind:
    name: str
    # Vehicle labels (make, model, year, body type, colour) read from the metadata, and
    # the natural-language vehicle filters read from query text.
    vehicle_labels: bool
    # The filters a search of this kind accepts (SearchFilters fields).
    filters: tuple[str, ...]
    # The metadata shown with a hit, besides the score.
    fields: tuple[str, ...]


VEHICLES = Kind("vehicles", True, ("make", "body", "colour", "year_min", "year_max", "source"),
                ("make", "model", "year", "body_type", "colour", "class_name", "source"))
GENERAL = Kind("general", False, ("source",), ("description", "photographer", "source"))
KINDS: dict[str, Kind] = {k.name: k for k in (VEHICLES, GENERAL)}


class CollectionError(CarsearchError):
    """A collection that does not exist, cannot be made, or was not named where needed."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CollectionError(f"unusable collection name {name!r}: lower-case letters, digits "
                              "and _, starting with a letter, at most 32"[:200])
    return name


def kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise CollectionError(f"no collection kind {name!r}: one of "
                              f"{', '.join(KINDS)}"[:200]) from None


def alias_for(collection: str) -> str:
    """The Milvus alias that names a collection's serving version on a server:
    ``carsearch_serving`` for vehicles (as before collections), else
    ``carsearch_serving_<name>``."""
    if collection == DEFAULT_COLLECTION:
        return SERVING_ALIAS
    return f"{SERVING_ALIAS}_{check_name(collection)}"


def list_all(db: Database) -> list[Collection]:
    with db.session() as s:
        return list(s.scalars(select(Collection).order_by(Collection.created_at,
                                                          Collection.name)))


def get(db: Database, name: str) -> Collection:
    with db.session() as s:
        row = s.get(Collection, name)
    if row is None:
        known = ", ".join(c.name for c in list_all(db)) or "none"
        raise CollectionError(f"no collection named {name!r} (there are: {known}); make one "
                              f"with `carsearch collections create NAME --kind general`"[:300])
    return row


def create(db: Database, name: str, kind_name: str, description: str | None = None) -> Collection:
    """Make a collection (an existing one of the same kind is returned as it is)."""
    check_name(name)
    k = kind(kind_name)
    with db.session() as s:
        row = s.get(Collection, name)
        if row is not None:
            if row.kind != k.name:
                raise CollectionError(f"collection {name!r} exists and is of kind {row.kind}, "
                                      f"not {k.name}")
            return row
        row = Collection(name=name, kind=k.name, description=description)
        s.add(row)
        s.flush()
        return row


def resolve(db: Database, name: str | None) -> Collection:
    """The collection a command means: the one named, else ``vehicles``, else the only
    collection there is."""
    if name is not None:
        return get(db, check_name(name))
    every = list_all(db)
    for c in every:
        if c.name == DEFAULT_COLLECTION:
            return c
    if len(every) == 1:
        return every[0]
    if not every:
        raise CollectionError("there is no collection: run `carsearch db upgrade`")
    raise CollectionError("there are several collections and none is called vehicles: "
                          f"choose one with --collection ({', '.join(c.name for c in every)})")


def kind_of(db: Database, name: str) -> Kind:
    return kind(get(db, name).kind)
