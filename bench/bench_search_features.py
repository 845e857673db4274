"""The search features measured on `make demo`'s data, through the search service.

Reads a finished demo data directory (CARSEARCH_DATA_DIR, or --data-dir): its serving
version and the indexed test images with their labels. Decisions (the negative-term
weight, the image weight, the duplicate threshold) are made on the images with an even
id (half A) and reported on the odd half (half B), where noted: a query's relevant set
and its scored hits are the half's images only.

1. Exclusions read from the text: queries with a negated facet; the share of the top 10
   that has the negated value, with the service's exclusions and without them (the same
   text as a plain vector query, nothing read from it), and whether the page is full.
2. Negated concepts with no facet ("bmw not m3"): the share of the top 10 that is the
   negated model, and the share with the named make, for each negative weight.
3. Image + text: an image of a class plus its model's name as text; mAP of that class by
   image weight (0: the text alone, 1: the image alone). And "like this but <colour>"
   from a red pickup.
4. Near-duplicates: the cosine of an image with a re-encoded copy (JPEG quality 60,
   brightness +4%), and of each image with its nearest other image; the threshold that
   folds 99% of the copies, and how many distinct images it would fold.
5. Feedback: the class-name queries, then the same with the top 10's relevant hits liked
   and the others disliked (Rocchio): P@10 over the hits not judged yet.
6. Diversity (MMR): broad queries (each body type and make indexed, read as plain text,
   nothing filtered): distinct classes in the top 10 against the share of the top 10
   that has the asked body type or make (the relevance it costs), by diversity; and the
   latency of the re-ranking.
7. What the negative term costs the rest of the ranking: "<model A> not <model B>" for
   every model A, B another make's model (unrelated) or the same make's (a look-alike);
   the mAP of A's images (the hits the person wants, not negated) and the share of B in
   the top 10, by negative weight. A cost shows as A's mAP falling with the weight.

    CARSEARCH_DATA_DIR=demo-data OMP_NUM_THREADS=1 python bench/bench_search_features.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageEnhance

from carsearch.platform.db import Image, ImageStatus
from carsearch.platform.errors import QueryError
from carsearch.platform.runtime import Platform
from carsearch.platform.search import service as service_mod
from carsearch.platform.search.service import SearchRequest, SearchService
from carsearch.platform.settings import Settings
from carsearch.platform.vehicles import body_category
from machine import machine_line

FACET_QUERIES: list[tuple[str, Callable[[Image], bool]]] = [
    ("pickup not red", lambda r: (r.colour or "") == "red"),
    ("suv but not black", lambda r: (r.colour or "") == "black"),
    ("no pickups", lambda r: body_category(r.body_type) == "pickup"),
    ("except Ford", lambda r: r.make == "Ford"),
    ("sedan not white", lambda r: (r.colour or "") == "white"),
    ("van not 2012", lambda r: r.year == 2012),
    ("convertible except Ford", lambda r: r.make == "Ford"),
    ("coupe not BMW", lambda r: r.make == "BMW"),
    ("hatchback but not 2012", lambda r: r.year == 2012),
    ("minivan not silver", lambda r: (r.colour or "") == "silver"),
    ("wagon without volvo", lambda r: r.make == "Volvo"),
    ("a jeep but not an suv", lambda r: body_category(r.body_type) == "suv"),
]


def _rows(p: Platform) -> dict[int, Image]:
    from sqlalchemy import select

    with p.db.session() as s:
        return {r.id: r for r in s.scalars(select(Image).where(
            Image.status == ImageStatus.indexed))}


def _ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> str:
    vals = np.asarray(values, dtype=float)
    if not len(vals):
        return "-"
    rng = np.random.default_rng(seed)
    means = [float(rng.choice(vals, len(vals)).mean()) for _ in range(n_boot)]
    return f"{vals.mean():.3f} [{np.percentile(means, 2.5):.2f}, {np.percentile(means, 97.5):.2f}]"


def facet_exclusions(svc: SearchService, rows: dict[int, Image]) -> list[str]:
    out = ["| query | exclusions read | violating share of top 10: with / without "
           "| page full (with) |", "|---|---|---|---|"]
    w_all, wo_all = [], []
    for query, bad in FACET_QUERIES:
        res = svc.search(SearchRequest(query, k=10))
        plain = svc.search(SearchRequest(query, k=10, parse=False))
        w = [bad(rows[h.image_id]) for h in res.hits]
        wo = [bad(rows[h.image_id]) for h in plain.hits]
        w_all.append(float(np.mean(w)) if w else 0.0)
        wo_all.append(float(np.mean(wo)) if wo else 0.0)
        out.append(f"| {query} | {', '.join(c.key for c in res.exclusions) or '-'} | "
                   f"{w_all[-1]:.1f} / {wo_all[-1]:.1f} | {len(res.hits) == 10} |")
    out.append(f"| **mean** | | **{_ci(w_all)} / {_ci(wo_all)}** | |")
    return out


def _model_words(row: Image) -> str:
    return (row.model or "").lower()


def negative_terms(svc: SearchService, rows: dict[int, Image], half: int,
                   weights: Sequence[float]) -> tuple[list[str], dict[float, float]]:
    models = sorted({(r.make, r.model) for r in rows.values() if r.make and r.model})
    makes = sorted({m for m, _ in models})
    queries = [(f"{make.lower()} not {model.lower()}", make, model)
               for make in makes for m2, model in models if m2 == make]
    lines = ["| negative weight | half | negated model in top 10 (mean, 95% CI) "
             "| named make in top 10 |", "|---|---|---|---|"]
    viol: dict[float, float] = {}
    for w in weights:
        service_mod.NEGATIVE_WEIGHT = w
        bad, good = [], []
        for q, make, model in queries:
            try:
                res = svc.search(SearchRequest(q, k=40))
            except QueryError:  # the model's name is a facet ("range rover"): refused
                continue
            hits = [rows[h.image_id] for h in res.hits if h.image_id % 2 == half][:10]
            if not res.negative_terms or not hits:
                continue
            bad.append(float(np.mean([r.model == model for r in hits])))
            good.append(float(np.mean([r.make == make for r in hits])))
        viol[w] = float(np.mean(bad)) if bad else float("nan")
        lines.append(f"| {w:g} | {'AB'[half]} ({len(bad)} queries) | {_ci(bad)} | "
                     f"{np.mean(good) if good else float('nan'):.3f} |")
    return lines, viol


def _ap(ranked: Sequence[bool], n_rel: int) -> float:
    hits = 0
    total = 0.0
    for i, rel in enumerate(ranked, 1):
        if rel:
            hits += 1
            total += hits / i
    return total / n_rel if n_rel else 0.0


def image_weight(svc: SearchService, rows: dict[int, Image], half: int,
                 weights: Sequence[float], per_class: int = 1) -> tuple[list[str], dict]:
    by_class: dict[str, list[int]] = {}
    for i, r in rows.items():
        if i % 2 == half and r.class_name:
            by_class.setdefault(r.class_name, []).append(i)
    lines = ["| image weight | half | mAP (image of a class + its model's name) |",
             "|---|---|---|"]
    result: dict[float, float] = {}
    for w in weights:
        aps = []
        for cls, ids in sorted(by_class.items()):
            model = _model_words(rows[ids[0]])
            for qid in sorted(ids)[:per_class]:
                res = svc.search(SearchRequest(model, k=200, image_id=qid, image_weight=w,
                                               parse=False))
                ranked = [rows[h.image_id].class_name == cls for h in res.hits
                          if h.image_id % 2 == half and h.image_id != qid]
                aps.append(_ap(ranked, len(ids) - 1))
        result[w] = float(np.mean(aps))
        lines.append(f"| {w:g} | {'AB'[half]} ({len(aps)} queries) | {_ci(aps)} |")
    return lines, result


def like_this_but(svc: SearchService, rows: dict[int, Image]) -> list[str]:
    reds = [i for i, r in rows.items() if (r.colour or "") == "red"
            and body_category(r.body_type) == "pickup"]
    lines = ["| from a red pickup | blue hits first (top 10) | blue pickups in top 10 |",
             "|---|---|---|"]
    firsts, shares = [], []
    for qid in sorted(reds)[:10]:
        res = svc.search(SearchRequest("like this but blue", k=10, image_id=qid))
        hits = [rows[h.image_id] for h in res.hits]
        firsts.append(float(bool(hits) and (hits[0].colour or "") == "blue"
                            and body_category(hits[0].body_type) == "pickup"))
        shares.append(float(np.mean([(r.colour or "") == "blue"
                                     and body_category(r.body_type) == "pickup"
                                     for r in hits])) if hits else 0.0)
    lines.append(f"| {len(reds[:10])} query images | {np.mean(firsts):.2f} | {_ci(shares)} |")
    return lines


def _copy(img: PILImage.Image) -> PILImage.Image:
    buf = io.BytesIO()
    ImageEnhance.Brightness(img.convert("RGB")).enhance(1.04).save(buf, "JPEG", quality=60)
    buf.seek(0)
    return PILImage.open(buf).convert("RGB")


def _pcts(v: np.ndarray) -> str:
    return (f"{np.percentile(v, 1):.3f} / {np.median(v):.3f} / "
            f"{np.percentile(v, 99):.3f}")


def duplicates(p: Platform, rows: dict[int, Image], n: int = 120) -> tuple[list[str], float]:
    version = p.search.serving()
    enc = p.search.encoder_for(version)
    ids = sorted(rows)[:n]
    found, stored = p.store.vectors(version.collection, ids)
    dup_cos, near_cos = [], []
    for i, vec in zip(found.tolist(), stored, strict=True):
        r = rows[i]
        img = PILImage.open(r.path).convert("RGB")
        copy = enc.encode_images([_copy(img)], [r.box])[0]
        dup_cos.append(float(copy @ vec))
        hits = p.store.search(version.collection, vec[None, :], 2)[0]
        others = [h.score for h in hits if h.id != i]
        if others:
            near_cos.append(float(others[0]))
    dup = np.asarray(dup_cos)
    near = np.asarray(near_cos)
    threshold = float(np.floor(np.percentile(dup, 1) * 100) / 100)
    lines = ["| pairs | n | cosine p1 / p50 / p99 |", "|---|---|---|",
             f"| image and its re-encoded copy | {len(dup)} | "
             f"{_pcts(dup)} |",
             f"| image and its nearest other image | {len(near)} | {_pcts(near)} |",
             "", f"Threshold (the copies' 1st percentile, floored to 0.01): {threshold:.2f}; "
             f"copies folded {float((dup >= threshold).mean()):.3f}, distinct nearest "
             f"neighbours folded {float((near >= threshold).mean()):.3f}."]
    return lines, threshold


def _p10(res: Any, judged: set[int], rows: dict[int, Image], cls: str) -> float:
    fresh = [h for h in res.hits if h.image_id not in judged][:10]
    return float(np.mean([rows[h.image_id].class_name == cls for h in fresh]))


def feedback(svc: SearchService, rows: dict[int, Image]) -> list[str]:
    classes = sorted({r.class_name for r in rows.values() if r.class_name})
    before, after = [], []
    for cls in classes:
        first = svc.search(SearchRequest(cls, k=10, parse=False))
        judged = {h.image_id for h in first.hits}
        liked = [h.image_id for h in first.hits if rows[h.image_id].class_name == cls]
        disliked = [h.image_id for h in first.hits if rows[h.image_id].class_name != cls]
        plain = svc.search(SearchRequest(cls, k=30, parse=False))
        moved = svc.search(SearchRequest(cls, k=30, parse=False, liked=liked,
                                         disliked=disliked))

        before.append(_p10(plain, judged, rows, cls))
        after.append(_p10(moved, judged, rows, cls))
    return ["| class-name queries | P@10 of the unjudged hits: no feedback "
            "| with the top 10 judged (Rocchio 1 / 0.75 / 0.25) |", "|---|---|---|",
            f"| {len(classes)} | {_ci(before)} | {_ci(after)} |"]


def diversity(svc: SearchService, rows: dict[int, Image],
              levels: Sequence[float]) -> list[str]:
    bodies = sorted({body_category(r.body_type) for r in rows.values() if r.body_type})
    makes = sorted({r.make for r in rows.values() if r.make})
    queries: list[tuple[str, Callable[[Image], bool]]] = [
        (f"a {b}", lambda r, b=b: body_category(r.body_type) == b) for b in bodies] + [
        (f"a {m}", lambda r, m=m: r.make == m) for m in makes]
    lines = ["| diversity | distinct classes in top 10 | share of top 10 with the asked "
             "body or make | search ms (median) |", "|---|---|---|---|"]
    for level in levels:
        distinct, share, ms = [], [], []
        for q, ok in queries:
            res = svc.search(SearchRequest(q, k=10, parse=False, diversity=level))
            hits = [rows[h.image_id] for h in res.hits]
            distinct.append(float(len({r.class_name for r in hits})))
            share.append(float(np.mean([ok(r) for r in hits])) if hits else 0.0)
            ms.append(res.latency_ms)
        lines.append(f"| {level:g} ({len(queries)} queries) | {_ci(distinct)} | "
                     f"{_ci(share)} | {statistics.median(ms):.1f} |")
    return lines


def negative_cost(svc: SearchService, rows: dict[int, Image],
                  weights: Sequence[float]) -> list[str]:
    models = sorted({(r.make, r.model) for r in rows.values() if r.make and r.model})
    ids_of: dict[tuple[str, str], list[int]] = {}
    for i, r in rows.items():
        if r.make and r.model:
            ids_of.setdefault((r.make, r.model), []).append(i)
    pairs: list[tuple[str, tuple[str, str], tuple[str, str]]] = []
    for n, a in enumerate(models):
        other = [b for b in models[n + 1:] + models[:n] if b[0] != a[0]]
        same = [b for b in models[n + 1:] + models[:n] if b[0] == a[0] and b != a]
        if other:
            pairs.append(("another make", a, other[0]))
        if same:
            pairs.append(("the same make", a, same[0]))
    # The queries whose B is read as a negative term (not a facet, not refused), once.
    kept = []
    for kind, a, b in pairs:
        q = f"{_model_words_of(a)} not {_model_words_of(b)}"
        try:
            res = svc.search(SearchRequest(q, k=10))
        except QueryError:
            continue
        if res.negative_terms:
            kept.append((kind, a, b, q))
    lines = ["| B is | negative weight | queries | mAP of A (the wanted hits) "
             "| B's share of the top 10 |", "|---|---|---|---|---|"]
    saved = service_mod.NEGATIVE_WEIGHT
    try:
        for kind in ("another make", "the same make"):
            chosen = [x for x in kept if x[0] == kind]
            for w in weights:
                service_mod.NEGATIVE_WEIGHT = w
                aps, share_b = [], []
                for _, a, b, q in chosen:
                    res = svc.search(SearchRequest(q, k=100))
                    got = [(rows[h.image_id].make, rows[h.image_id].model) for h in res.hits]
                    aps.append(_ap([g == a for g in got], len(ids_of[a])))
                    share_b.append(float(np.mean([g == b for g in got[:10]])) if got else 0.0)
                lines.append(f"| {kind} | {w:g} | {len(aps)} | {_ci(aps)} | {_ci(share_b)} |")
    finally:
        service_mod.NEGATIVE_WEIGHT = saved
    return lines


def _model_words_of(make_model: tuple[str, str]) -> str:
    return make_model[1].lower()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("CARSEARCH_DATA_DIR", "demo-data")))
    ap.add_argument("--parts", default="1234567", help="Which parts to run (digits).")
    args = ap.parse_args()
    parts = set(args.parts)
    settings = Settings(data_dir=args.data_dir)
    p = Platform(settings)
    try:
        svc = p.search
        svc.warm(wait=True)
        rows = _rows(p)
        print(f"# search features on {args.data_dir} ({len(rows)} indexed, "
              f"model {svc.serving().name}); {machine_line()}; "
              f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n")
        if "1" in parts:
            print("## 1. exclusions\n")
            print("\n".join(facet_exclusions(svc, rows)))
        if "2" in parts:
            print("\n## 2. negative terms (choose on A, report on B)\n")
            weights = [0.0, 0.3, 0.6]
            lines_a, viol = negative_terms(svc, rows, 0, weights)
            chosen = min(weights[1:], key=lambda w: (round(viol[w], 3), w))
            lines_b, _ = negative_terms(svc, rows, 1, [0.0, chosen])
            print("\n".join(lines_a + lines_b[2:]))
            print(f"\nchosen on A: {chosen}")
            service_mod.NEGATIVE_WEIGHT = chosen
        if "3" in parts:
            print("\n## 3. image + text (choose on A, report on B)\n")
            iw = [0.0, 0.25, 0.5, 0.75, 1.0]
            la, res_a = image_weight(svc, rows, 0, iw)
            best = max(iw, key=lambda w: res_a[w])
            lb, _ = image_weight(svc, rows, 1, sorted({0.0, best, 1.0}))
            print("\n".join(la + lb[2:]))
            print(f"\nchosen on A: {best}\n")
            print("\n".join(like_this_but(svc, rows)))
        if "4" in parts:
            print("\n## 4. near-duplicates\n")
            lines, _ = duplicates(p, rows)
            print("\n".join(lines))
        if "5" in parts:
            print("\n## 5. feedback in the session\n")
            print("\n".join(feedback(svc, rows)))
        if "6" in parts:
            print("\n## 6. diversity (MMR)\n")
            print("\n".join(diversity(svc, rows, [0.0, 0.25, 0.5, 0.75])))
        if "7" in parts:
            print("\n## 7. the negative term's cost to the rest of the ranking\n")
            print("\n".join(negative_cost(svc, rows, [0.0, 0.3, 0.6, 0.9])))
        lat = [svc.search(SearchRequest("pickup not red", k=10)).latency_ms for _ in range(10)]
        print(f"\n'pickup not red' latency median {statistics.median(lat):.1f} ms (10 runs)")
    finally:
        p.close()


if __name__ == "__main__":
    main()
