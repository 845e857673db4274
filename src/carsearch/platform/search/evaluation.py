"""Served-view evaluation: queries through the search service, scored on the database.

`evaluate_served` sends each query to the search service exactly as the page's text box
would with nothing read from the text (no filter chips, no hard filters), against the
serving collection, and asks for every indexed image (up to the service's k limit). A
result is relevant when its database row's labels satisfy the query (`EvalQuery.matches`:
its class is one of `relevant`, when given, and its labels meet every one of
`attributes`: make, model, year, colour, body category). The metrics are
`platform.metrics.query_scores`: R@1/5/10, mAP (over the ranking returned, normalised by
all relevant rows: AP@k), MRR, what a random ranking of the same rows would score,
95 % bootstrap intervals over queries, and the calibration of the probability each hit
shows on the page (a reliability table and its ECE, `metrics.reliability`).

What is measured is therefore what is served: the vectors ingest stored (each image framed
by the serving version's image policy), the index (Milvus, or its FAISS mirror), and the
labels the database holds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from carsearch.platform.db import Image, ImageStatus
from carsearch.platform.metrics import QueryScores, query_scores, reliability
from carsearch.platform.vehicles import body_category

log = logging.getLogger(__name__)

KS = (1, 5, 10)


def satisfies(fields: Mapping[str, Any], attributes: Mapping[str, Any]) -> bool:
    """Whether labels meet every attribute (text compared case-blind, numbers exactly)."""
    for name, want in attributes.items():
        have = fields.get(name)
        if have is None or want is None:
            return False
        if isinstance(want, str) or isinstance(have, str):
            if str(have).strip().lower() != str(want).strip().lower():
                return False
        elif have != want:
            return False
    return True


@dataclass(frozen=True)
class EvalQuery:
    """A query and what makes an image relevant to it: its class is one of `relevant`
    (when given) and its labels satisfy every one of `attributes`."""

    text: str
    relevant: tuple[str, ...] = ()
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def matches(self, fields: Mapping[str, Any]) -> bool:
        if self.relevant and fields.get("class_name") not in self.relevant:
            return False
        return satisfies(fields, self.attributes)


def row_fields(row: Image) -> dict[str, Any]:
    """An image row's labels, as a query is matched against them."""
    return {"class_name": row.class_name, "make": row.make, "model": row.model,
            "year": row.year, "colour": row.colour, "body": body_category(row.body_type)}


def summarise(scores: QueryScores, *, n_boot: int = 2000) -> dict[str, Any]:
    """Means, chance levels and 95 % bootstrap intervals of one query set."""
    return {
        **scores.means(),
        "chance": scores.chance(),
        "ci95": {k: list(v) for k, v in scores.intervals(n_boot=n_boot).items()},
        "n_queries": len(scores.ap),
        "n_excluded": scores.excluded,
        "n_items": scores.n_items,
        "depth": scores.depth,
    }


def indexed_rows(db: Any, collection: str) -> dict[int, dict[str, Any]]:
    """id -> labels of every indexed row of a collection."""
    with db.session() as s:
        rows = s.scalars(select(Image).where(Image.status == ImageStatus.indexed,
                                             Image.collection == collection))
        return {int(r.id): row_fields(r) for r in rows}


def evaluate_served(
    service: Any,
    query_sets: Mapping[str, Sequence[EvalQuery]],
    *,
    collection: str | None = None,
    ks: Sequence[int] = KS,
    n_boot: int = 2000,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score every query set through `service` (a `SearchService`); JSON-ready result."""
    from carsearch.platform.search.service import MAX_K

    version = service.serving(collection)
    coll = service.collection(collection)
    rows = indexed_rows(service.db, coll)
    n = len(rows)
    k = max(1, min(n, MAX_K))
    out: dict[str, Any] = {"version": version.name, "collection": coll, "n_images": n,
                           "k": k, "filters": "none (nothing read from the text)",
                           "query_sets": {}}
    total = sum(len(q) for q in query_sets.values())
    done = 0
    for name, queries in query_sets.items():
        ranked: list[list[bool]] = []
        n_relevant: list[int] = []
        probs: list[float] = []
        for q in queries:
            result = service.search_text(q.text, k=k, collection=collection)
            ranked.append([q.matches(rows.get(h.image_id, {})) for h in result.hits])
            probs.extend(h.probability if h.probability is not None else float("nan")
                         for h in result.hits)
            n_relevant.append(sum(1 for f in rows.values() if q.matches(f)))
            done += 1
            if progress is not None:
                progress(done, total)
        scores = query_scores(ranked, n_relevant, n, ks)
        flags = [f for r in ranked for f in r]
        known = [(p, f) for p, f in zip(probs, flags, strict=True) if p == p]
        out["query_sets"][name] = {
            **summarise(scores, n_boot=n_boot),
            # the probability on the page's hits, against the database's labels
            "calibration": reliability([p for p, _ in known], [f for _, f in known]),
            "queries": [q.text for q in queries]}
        log.info("served evaluation %s: %s", name, scores.means())
    return out


def served_query_sets(db: Any, collection: str) -> dict[str, list[EvalQuery]]:
    """The default served queries: every class name the database holds, and one held-out
    phrasing per class (from its first indexed image), both labelled by the database."""
    from carsearch.platform.search.heldout import held_out_query
    from carsearch.platform.vehicles import parse_class_name

    with db.session() as s:
        rows = list(s.scalars(select(Image).where(
            Image.status == ImageStatus.indexed, Image.collection == collection,
            Image.class_name.is_not(None)).order_by(Image.id)))
        first: dict[str, tuple[int, str | None]] = {}
        for r in rows:
            first.setdefault(str(r.class_name), (int(r.id), r.colour))
    names = [EvalQuery(n, (n,)) for n in sorted(first)]
    held = []
    for n in sorted(first):
        image_id, colour = first[n]
        try:
            label = parse_class_name(n, colour)
        except ValueError:
            continue
        q = held_out_query(label, key=str(image_id))
        if q is not None:
            held.append(EvalQuery(q.text, (), q.attributes))
    return {"class names": names, "held-out phrasings": held}


# -- the stored result of the serving version (the page's Evaluation tab reads it) ----------
SERVED_KEY = "served"


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinity as None (PostgreSQL's JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def store_served(db: Any, result: Mapping[str, Any]) -> None:
    """Keep a served evaluation with its version (`model_versions.metrics["served"]`,
    one per version: a version has one Milvus collection), stamped with when it ran.
    Other metrics of the version are left as they are."""
    from datetime import UTC, datetime

    from carsearch.platform.db import ModelVersion

    stamped = json_safe({**result,
                         "measured_at": datetime.now(UTC).isoformat(timespec="seconds")})
    with db.session() as s:
        row = s.scalars(select(ModelVersion).where(ModelVersion.name == result["version"])
                        .with_for_update()).one_or_none()
        if row is None:
            log.warning("served evaluation of %s not stored: no such version",
                        result["version"])
            return
        # a new dict, so the JSON column is written (in-place changes are not tracked)
        row.metrics = {**(row.metrics or {}), SERVED_KEY: stamped}


def stored_served(db: Any, version: str) -> dict[str, Any] | None:
    """The served evaluation last stored for `version`, if any."""
    from carsearch.platform.db import ModelVersion

    with db.session() as s:
        metrics = s.scalars(select(ModelVersion.metrics)
                            .where(ModelVersion.name == version)).one_or_none()
    served = (metrics or {}).get(SERVED_KEY)
    return dict(served) if isinstance(served, dict) else None
