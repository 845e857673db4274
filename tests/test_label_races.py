"""Labels lost in races (issue 22, item 7), each interleaving forced, in both shapes.

(a) A label applied while a promotion embeds a page: the label import runs after the
    re-index read the old labels and before it writes them (inside its embed call); and
    the other way, the promotion runs between the import's two writes.
(b) A re-delivery of the same image beside a label import: the import runs between the
    worker's Milvus upsert and its row update (the worker's "after_upsert" hook).

Each ends with the database and every non-retired collection (the new serving one
included) saying the same make, and a search filtered on it finding the image. Real
parts: a compact model; Milvus Lite + SQLite, the Milvus server + PostgreSQL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from carsearch.ingest.worker import IngestWorker
from carsearch.lifecycle import labelling, reindex
from carsearch.lifecycle.labelling import import_rows
from carsearch.platform.db import Image, VersionStatus
from carsearch.platform.db.images import indexed_ids
from carsearch.platform.runtime import Platform
from carsearch.platform.vectors.filters import SearchFilters
from ingest_world import assert_invariant, make_image
from shapes import shape as _shape

shape = _shape  # the fixture: Lite + SQLite, server + PostgreSQL


def _ingest(p: Platform, tmp_path: Path, name: str, n: int, make: str) -> list[int]:
    inbox = tmp_path / name
    inbox.mkdir()
    for i in range(n):
        make_image(inbox / f"c{i}.png", i)
        (inbox / f"c{i}.png.json").write_text(json.dumps({"make": make}))
    IngestWorker(p, inbox=inbox).run_once()
    return sorted(indexed_ids(p.db))


def _label(p: Platform, iid: int, make: str) -> None:
    import_rows(p, [(1, {"image_id": iid, "make": make})])


def _makes_agree(p: Platform, iid: int, make: str, other: str) -> None:
    """The row says ``make``, and so does every non-retired collection holding it."""
    with p.db.session() as s:
        row = s.get(Image, iid)
        assert row is not None and row.make == make
    seen = 0
    for v in p.registry.list():
        if v.status == VersionStatus.retired or not p.store.has_collection(v.collection):
            continue
        p.store.flush(v.collection)
        found, vec = p.store.vectors(v.collection, [iid])
        assert len(found) == 1, v.name
        seen += 1
        hits = p.store.search(v.collection, np.asarray(vec), 20, SearchFilters(make=make))[0]
        assert iid in [int(h.id) for h in hits], (v.name, make)
        hits = p.store.search(v.collection, np.asarray(vec), 20, SearchFilters(make=other))[0]
        assert iid not in [int(h.id) for h in hits], (v.name, other)
    assert seen == 2


def test_a_label_applied_while_a_promotion_embeds_reaches_the_new_collection(
    shape: Platform, tmp_path: Path, compact_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The promotion to v2 has read the page (make=Ford) and is embedding it when the
    label import runs whole (v2's collection does not hold the image yet). Before: v2
    served make=Ford while the database said Tesla."""
    p = shape
    ids = _ingest(p, tmp_path, "inbox", 3, "Ford")
    target = ids[1]
    p.registry.publish(compact_model, name="v2")
    real_embed = reindex.embed
    labelled: list[int] = []

    def embed_then_label(encoder: Any, chunk: Any) -> np.ndarray:
        if not labelled:
            labelled.append(target)
            _label(p, target, "Tesla")
        return real_embed(encoder, chunk)

    monkeypatch.setattr(reindex, "embed", embed_then_label)
    promoted, _ = reindex.promote_with_backfill(p, "v2", progress=False)
    assert labelled == [target] and promoted.name == "v2"
    assert p.registry.require_serving().name == "v2"
    _makes_agree(p, target, "Tesla", "Ford")
    _makes_agree(p, ids[0], "Ford", "Tesla")
    assert assert_invariant(p) == set(ids)


def test_a_promotion_between_the_label_imports_two_writes_gets_the_label(
    shape: Platform, tmp_path: Path, compact_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: a whole promotion runs inside the import, after its Milvus write
    and (now) after its database commit. Before, the import wrote Milvus first, so the
    promotion read make=Ford from the database and v2 kept it."""
    p = shape
    ids = _ingest(p, tmp_path, "inbox", 2, "Ford")
    p.registry.publish(compact_model, name="v2")
    real_update = labelling._update_milvus
    promoted: list[str] = []

    def update_then_promote(*args: Any, **kwargs: Any) -> dict[str, int]:
        out = real_update(*args, **kwargs)
        promoted.append(reindex.promote_with_backfill(p, "v2", progress=False)[0].name)
        return out

    monkeypatch.setattr(labelling, "_update_milvus", update_then_promote)
    _label(p, ids[0], "Tesla")
    assert promoted == ["v2"]
    _makes_agree(p, ids[0], "Tesla", "Ford")
    assert assert_invariant(p) == set(ids)


def test_a_redelivery_beside_a_label_import_keeps_the_new_label_everywhere(
    shape: Platform, tmp_path: Path, compact_model: Path
) -> None:
    """The same image is delivered again with its old sidecar (make=Ford); the worker has
    merged the row's labels and upserted its vector when the import (make=Tesla) runs
    whole. Before: the worker's row update wrote Ford back to the database while Milvus
    kept Tesla, and the task was done."""
    p = shape
    p.registry.publish(compact_model, name="v2")  # a candidate collection holding it too
    (iid,) = _ingest(p, tmp_path, "inbox", 1, "Ford")
    v2 = p.registry.get("v2")
    reindex.backfill(p, v2, progress=False)
    again = tmp_path / "inbox2"
    again.mkdir()
    make_image(again / "same.png", 0)  # the same bytes: the same id
    (again / "same.png.json").write_text(json.dumps({"make": "Ford", "colour": "blue"}))
    w = IngestWorker(p, inbox=again)
    done: list[str] = []

    def label_now(point: str) -> None:
        if point == "after_upsert" and not done:
            done.append(point)
            _label(p, iid, "Tesla")

    w.on_point = label_now
    w.run_once()
    assert done == ["after_upsert"] and w.stats.failed_batches == 0
    _makes_agree(p, iid, "Tesla", "Ford")
    with p.db.session() as s:
        row = s.get(Image, iid)
        assert row is not None and row.colour == "blue"  # the delivery's new field stays
    assert assert_invariant(p) == {iid}
