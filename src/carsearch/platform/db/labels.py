"""Queries of the labelling tables (`label_tasks`, `label_task_images`): the tasks the
drift job makes from isolated clusters, and their progress."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from carsearch.platform.db.engine import Database
from carsearch.platform.db.models import LabelTask, LabelTaskImage


@dataclass(frozen=True)
class NewTask:
    """A cluster to label: every member id (most central first), the nearest known class
    and the label it suggests."""

    image_ids: Sequence[int]
    nearest_class_name: str | None
    suggested: dict[str, Any]


def create_tasks(db: Database, report_id: int | None, collection: str,
                 clusters: Sequence[NewTask]) -> list[int]:
    """One open task per cluster of a drift report, holding the members no task holds
    yet: a later report that finds the same cluster again (the same drift event) makes no
    second task, one whose cluster grew makes a task of the new images only. Idempotent
    per (report, cluster). ``report_id`` None: a task a person made (`label create`)."""
    made: list[int] = []
    with db.session() as s:
        for n, c in enumerate(clusters):
            have = None
            if report_id is not None:
                have = s.scalar(select(LabelTask).where(
                    LabelTask.drift_report_id == report_id, LabelTask.cluster == n))
            if have is not None:
                made.append(have.id)
                continue
            members = list(dict.fromkeys(int(i) for i in c.image_ids))
            queued = set(s.scalars(select(LabelTaskImage.image_id).where(
                LabelTaskImage.image_id.in_(members))))
            ids = [i for i in members if i not in queued]
            if not ids:
                continue
            task = LabelTask(drift_report_id=report_id, cluster=n, collection=collection,
                             size=len(ids), nearest_class_name=c.nearest_class_name,
                             suggested=c.suggested or {}, state="open")
            s.add(task)
            s.flush()
            s.add_all(LabelTaskImage(task_id=task.id, image_id=i, position=p)
                      for p, i in enumerate(ids))
            made.append(task.id)
    return made


def tasks(db: Database, state: str | None = "open") -> list[dict[str, Any]]:
    """Tasks (the open ones by default, every one for None) with their progress."""
    with db.session() as s:
        q = select(LabelTask).order_by(LabelTask.id)
        if state is not None:
            q = q.where(LabelTask.state == state)
        out = []
        for t in s.scalars(q):
            members = list(s.scalars(select(LabelTaskImage).where(
                LabelTaskImage.task_id == t.id).order_by(LabelTaskImage.position)))
            out.append({"id": t.id, "drift_report_id": t.drift_report_id,
                        "cluster": t.cluster, "collection": t.collection, "size": t.size,
                        "labelled": sum(m.labelled_at is not None for m in members),
                        "nearest_class": t.nearest_class_name,
                        "suggested": dict(t.suggested or {}), "state": t.state,
                        "created_at": t.created_at, "done_at": t.done_at,
                        "image_ids": [m.image_id for m in members],
                        "unlabelled_ids": [m.image_id for m in members
                                           if m.labelled_at is None]})
    return out


def counts(db: Database) -> dict[str, int]:
    """Tasks by state (one grouped count, not every task's images)."""
    with db.session() as s:
        rows = s.execute(select(LabelTask.state, func.count()).group_by(LabelTask.state)).all()
    return {"open": 0, "done": 0, **{str(st): int(n) for st, n in rows}}
