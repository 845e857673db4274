"""The labelling queue: isolated drift clusters become tasks, a person labels them, the
labels reach the database and Milvus.

Each isolated cluster a drift run finds becomes one task holding every member the run
saw (not only the examples in its report), most central first, with the nearest known
class and a suggested label (that class's make, model, year and body). `export` writes
the open tasks' images as CSV or JSONL rows for a person to fill in; `import_labels`
checks every row first (the filters' vocabulary: a known body type and colour, a year in
range, text within the columns' limits; a make is canonicalised where it is a known one
("chevy" is Chevrolet) and kept as written where it is new, as a novel vehicle's make is,
capitalised when typed all in lower case) and applies nothing
when any row is bad, reporting each bad row with its line and reason. Applying commits
the database rows first, then writes the scalar fields into every Milvus collection that
holds the image (serving and candidate versions alike, so a later promotion does not
bring old labels back), reads the rows again and re-writes any that changed meanwhile,
and only then records the tasks' progress; a failure in between leaves the tasks open
and is repaired by importing the same file again (every write is idempotent).

Why the database goes first: a promotion's re-index and a re-delivery of the same image
read the labels and write Milvus after; each reads the rows again once its vectors are
written (`sync_labels`). Whoever writes Milvus last has then read the database after the
other's commit, so a label applied mid-promotion reaches the new serving collection too.

A row may also give the vehicle's `box` ([x1, y1, x2, y2] pixels, or "x1,y1,x2,y2" in a
CSV): clipped to the image (one wholly outside, inverted or malformed is a bad row), stored
on the image row, and the image embedded again from its stored photo by each version that
holds it, through that version's image policy.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select, update

from carsearch.ingest.pipeline import LABEL_FIELDS, clean_metadata, sync_labels, vector_row
from carsearch.platform.db import (
    Image,
    ImageStatus,
    LabelTask,
    LabelTaskImage,
    ModelVersion,
    VersionStatus,
    labels,
    utcnow,
)
from carsearch.platform.errors import CarsearchError
from carsearch.platform.images import DECODE_MAX_SIDE, load_image
from carsearch.platform.models.image_policy import BoxError, check_box, parse_box
from carsearch.platform.runtime import Platform
from carsearch.platform.vehicles import (
    BODY_CATEGORIES,
    BODY_TYPES,
    COLOURS,
    body_category,
    canonical_colour,
    canonical_make,
)

log = logging.getLogger(__name__)

# What a person fills in, in this order (also the export's editable columns).
EDITABLE = ("make", "model", "year", "body_type", "colour")
EXPORT_COLUMNS = ("image_id", "task", "cluster", "position", "path", "thumbnail",
                  "nearest_class", "suggested_make", "suggested_model", "suggested_year",
                  "suggested_body_type", *EDITABLE)


class LabelImportError(CarsearchError):
    """A labels file with bad rows; nothing of it was applied."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        super().__init__(f"{len(problems)} bad row(s), nothing applied: {shown}")


@dataclass
class ImportReport:
    rows: int = 0
    applied: int = 0
    skipped_empty: int = 0  # rows with no label filled in yet
    milvus_updated: dict[str, int] = field(default_factory=dict)
    tasks_done: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "applied": self.applied,
                "skipped_empty": self.skipped_empty, "milvus_updated": self.milvus_updated,
                "tasks_done": self.tasks_done}


# -- export -------------------------------------------------------------------------------
def export_rows(platform: Platform, thumbnail: Callable[[int, str], str] | None = None,
                task_ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """One row per image still to label in the open tasks (or ``task_ids``)."""
    wanted = set(task_ids) if task_ids is not None else None
    rows: list[dict[str, Any]] = []
    with platform.db.session() as s:
        for t in labels.tasks(platform.db, None if wanted else "open"):
            if wanted is not None and t["id"] not in wanted:
                continue
            found = {r.id: r for r in s.scalars(select(Image).where(
                Image.id.in_(t["unlabelled_ids"])))}
            sug = t["suggested"]
            for pos, iid in enumerate(t["image_ids"]):
                row = found.get(iid)
                if row is None:
                    continue
                rows.append({
                    "image_id": iid, "task": t["id"], "cluster": t["cluster"],
                    "position": pos, "path": row.path,
                    "thumbnail": thumbnail(iid, row.path) if thumbnail else "",
                    "nearest_class": t["nearest_class"] or "",
                    **{f"suggested_{k}": sug.get(k, "") for k in EDITABLE if k != "colour"},
                    **{k: "" for k in EDITABLE},
                })
    return rows


# A spreadsheet runs a cell that starts with one of these as a formula (=HYPERLINK(...),
# +cmd|..., @SUM(...)); a tab or carriage return first is read the same way by some.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise_cell(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula, made text by a leading
    apostrophe (which spreadsheets show as nothing); anything else as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def restore_cell(value: Any) -> Any:
    """The inverse of `neutralise_cell` for a cell read back from a CSV file."""
    if isinstance(value, str) and value.startswith("'") and value[1:2] and \
            value[1:].startswith(FORMULA_STARTS):
        return value[1:]
    return value


def write_rows(rows: list[dict[str, Any]], out: Path) -> Path:
    """CSV or JSONL by the file's suffix, written under a temporary name then renamed.
    A CSV text cell starting with =, +, -, @, a tab or a carriage return gets a leading
    apostrophe (see `neutralise_cell`); `read_rows` takes it off again."""
    out = Path(out)
    if out.suffix.lower() not in (".csv", ".jsonl"):
        raise CarsearchError(f"write labels to a .csv or .jsonl file, not {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    with tmp.open("w", newline="") as fh:
        if out.suffix.lower() == ".csv":
            w = csv.DictWriter(fh, fieldnames=list(EXPORT_COLUMNS))
            w.writeheader()
            w.writerows({k: neutralise_cell(v) for k, v in r.items()} for r in rows)
        else:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out


# -- import -------------------------------------------------------------------------------
def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs of a filled-in CSV or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise CarsearchError(f"no labels file at {path}")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            return [(n, {k: restore_cell(v) for k, v in r.items()})
                    for n, r in enumerate(csv.DictReader(fh), 2)]
    out = []
    with path.open() as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LabelImportError([f"line {n}: not JSON ({exc.msg})"]) from None
            if not isinstance(row, dict):
                raise LabelImportError([f"line {n}: not a JSON object"])
            out.append((n, row))
    return out


def check_row(row: dict[str, Any]) -> dict[str, Any]:
    """The labels of one row, checked (ValueError with the reason otherwise); {} when the
    person left every field empty."""
    given = {k: row.get(k) for k in EDITABLE
             if row.get(k) not in (None, "") and str(row.get(k)).strip()}
    box = None
    if row.get("box") not in (None, "", []):
        try:  # clipped to the image once its row is read (import_rows)
            box = list(parse_box(row["box"]))
        except BoxError as exc:
            raise ValueError(f"box: {exc}") from None
    if not given:
        return {"box": box} if box is not None else {}
    clean = clean_metadata(given, "label")
    if clean.rejected:
        name, why = next(iter(clean.rejected.items()))
        raise ValueError(f"{name}: {why}")
    out = dict(clean.labels)
    if "make" in out:
        make = out["make"]
        out["make"] = canonical_make(make) or (make.title() if make.islower() else make)
    if "body_type" in out:
        body = out["body_type"]
        known = {b.lower(): b for b in BODY_TYPES}
        if body.lower() not in known and body_category(body) not in BODY_CATEGORIES:
            raise ValueError(f"body_type: unknown body type {body!r} (one of "
                             f"{', '.join(BODY_CATEGORIES)}, or a Stanford body such as "
                             "Crew Cab)"[:300])
        out["body_type"] = known.get(body.lower(), body.lower())
    if "colour" in out:
        colour = canonical_colour(out["colour"])
        if colour is None:
            raise ValueError(f"colour: unknown colour {out['colour']!r} (one of "
                             f"{', '.join(COLOURS)})"[:300])
        out["colour"] = colour
    if out.get("make") and out.get("model"):
        bits = [out["make"], out["model"], out.get("year")]
        out["class_name"] = " ".join(str(b) for b in bits if b)
    if box is not None:
        out["box"] = box
    return out


def import_labels(platform: Platform, path: Path) -> ImportReport:
    """Check every row of a file, then apply all of them (or none: LabelImportError lists
    the bad rows with their line and reason)."""
    report = import_rows(platform, read_rows(path))
    log.info("labels imported from %s: %s", path, report.to_dict())
    return report


def import_rows(platform: Platform, parsed: list[tuple[int, dict[str, Any]]]) -> ImportReport:
    """Check every (line, row) pair, then apply all of them, or none."""
    report = ImportReport()
    report.rows = len(parsed)
    problems: list[str] = []
    wanted: dict[int, dict[str, Any]] = {}
    lines: list[tuple[int, int]] = []  # (line, image id) of every row with a usable id
    for n, row in parsed:
        try:
            iid = int(str(row.get("image_id", "")).strip())
        except ValueError:
            problems.append(f"line {n}: image_id {row.get('image_id')!r} is not an id"[:200])
            continue
        lines.append((n, iid))
        try:
            got = check_row(row)
        except ValueError as exc:
            problems.append(f"line {n}: {exc}")
            continue
        if not got:
            report.skipped_empty += 1
            continue
        if iid in wanted and wanted[iid] != got:
            problems.append(f"line {n}: image {iid} is labelled twice, differently")
            continue
        wanted[iid] = got
    with platform.db.session() as s:
        rows = {r.id: r for r in s.scalars(select(Image).where(Image.id.in_(list(wanted))))}
    for n, iid in lines:
        if iid in wanted and iid not in rows:
            problems.append(f"line {n}: no image with id {iid}")
        elif iid in rows and rows[iid].status != ImageStatus.indexed:
            problems.append(f"line {n}: image {iid} is {rows[iid].status.value}, not indexed")
        elif iid in rows and "box" in wanted.get(iid, {}):
            r = rows[iid]
            clipped, why = check_box(wanted[iid]["box"], (r.width or 0, r.height or 0))
            if why is not None:
                problems.append(f"line {n}: box: {why}")
            else:
                wanted[iid]["box"] = list(clipped)  # type: ignore[arg-type]
    if problems:
        raise LabelImportError(problems)
    if not wanted:
        return report
    merged = {iid: {**{k: getattr(rows[iid], k) for k in LABEL_FIELDS}, **got}
              for iid, got in wanted.items()}
    reframed = {iid for iid, got in wanted.items()
                if "box" in got and got["box"] != rows[iid].box}
    with platform.db.session() as s:
        for iid, fields in merged.items():
            values = {k: fields.get(k) for k in LABEL_FIELDS}
            if "box" in fields:
                values["box"] = fields["box"]
            s.execute(update(Image).where(Image.id == iid).values(**values))
    report.milvus_updated = _update_milvus(platform, merged, rows, reframed)
    now = utcnow()
    with platform.db.session() as s:
        s.execute(update(LabelTaskImage).where(
            LabelTaskImage.image_id.in_(list(merged)), LabelTaskImage.labelled_at.is_(None))
            .values(labelled_at=now))
        s.flush()
        for t in s.scalars(select(LabelTask).where(LabelTask.state == "open")):
            left = s.scalar(select(LabelTaskImage.image_id).where(
                LabelTaskImage.task_id == t.id, LabelTaskImage.labelled_at.is_(None)).limit(1))
            if left is None:
                t.state, t.done_at = "done", now
                report.tasks_done.append(t.id)
    report.applied = len(merged)
    return report


class PlatformLabeller:
    """What the page's Label tab calls (the ui may not import lifecycle: `serve` hands it
    this): the open tasks, and one task labelled at once with the same checks."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def open_tasks(self) -> list[dict[str, Any]]:
        return labels.tasks(self.platform.db)

    def apply(self, task_id: int, fields: dict[str, Any]) -> ImportReport:
        """Give every image of a task still to label the same labels (the task's
        vehicles are one new vehicle)."""
        task = next((t for t in labels.tasks(self.platform.db, None) if t["id"] == task_id),
                    None)
        if task is None:
            raise CarsearchError(f"no labelling task {task_id}")
        rows = [(n, {"image_id": iid, **fields})
                for n, iid in enumerate(task["unlabelled_ids"], 1)]
        if not rows:
            raise CarsearchError(f"task {task_id} has no image left to label")
        return import_rows(self.platform, rows)


def _update_milvus(platform: Platform, merged: dict[int, dict[str, Any]],
                   rows: dict[int, Image], reframed: set[int] | None = None) -> dict[str, int]:
    """Re-write the scalar fields of the labelled images in every version's collection
    that holds them (the vector is read back and upserted with the new fields). An image
    given a new box (`reframed`) is embedded again by each version, through its image
    policy, from the stored photo."""
    store = platform.store
    with platform.db.session() as s:
        versions = list(s.scalars(select(ModelVersion).where(
            ModelVersion.status != VersionStatus.retired)))
    out: dict[str, int] = {}
    ids = sorted(merged)
    for v in versions:
        if not store.has_collection(v.collection):
            continue
        found, vectors = store.vectors(v.collection, ids)
        if not len(found):
            continue
        got = [int(i) for i in found]
        redo = [j for j, i in enumerate(got) if i in (reframed or set())]
        if redo:
            vectors = np.array(vectors, copy=True)
            encoder = platform.search.encoder_for(v)
            photos = [load_image(Path(rows[got[j]].path), max_side=DECODE_MAX_SIDE)
                      for j in redo]
            vectors[redo] = encoder.encode_images(photos, [merged[got[j]]["box"] for j in redo])
        written = [vector_row(merged[i], rows[i].source) for i in got]
        store.upsert(v.collection, got, vectors, written)
        sync_labels(platform.db, store, v.collection, dict(zip(got, written, strict=True)),
                    dict(zip(got, vectors, strict=True)))
        out[v.name] = len(got)
    return out
