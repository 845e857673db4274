"""The retrain job: the data flywheel's last step.

A drift event (isolated clusters) makes labelling tasks and one retrain request
(`platform.db.retrains`); when a person has labelled every task the request is ready.
The job (`RetrainJob.tick`, run by `carsearch retrain run` or inside `serve
--retrain-every`) claims it, once across processes, and:

1. writes a training set in the Stanford layout (`write_training_set`): the labelled data
   set (`CARSEARCH_RETRAIN__DATA`, default DATA_DIR/catalogue) with its own split, plus
   every image labelled through the queue so far, a share of each new class
   (`test_share`) held out so the evaluation measures the new vehicles too. Files are
   hard links where the file system allows, else copies;
2. trains from the serving version (`CARSEARCH_RETRAIN__BASE`) on it, with the page's
   feedback votes (hard negatives, extra positives);
3. evaluates the candidate and the serving version on the same validation split (carved
   from train; every image framed by each version's image policy, as the index serves
   it), old and new classes also reported apart, and promotes the candidate
   (re-indexing its collection first) only when it is at least as good on
   `CARSEARCH_RETRAIN__METRIC`; otherwise it stays a candidate, with the reason. The test
   split is only reported.

The request ends promoted, candidate or failed (the error), with the training run and
version it made. The process running it heart-beats; a request whose process died is
declared interrupted by the next tick anywhere and is not started again by itself.

Only the process that can open the vector store promotes: with Milvus Lite that is the
one holding the file (`serve --retrain-every`); on a Milvus server any process can.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from carsearch.data.catalogue import annotations_mat_bytes, meta_mat_bytes
from carsearch.data.stanford import COLOUR_SIDECAR, load_stanford
from carsearch.lifecycle.reindex import promote_with_backfill
from carsearch.platform.db import Image, ImageStatus, LabelTaskImage, retrains
from carsearch.platform.errors import CarsearchError, ConfigError
from carsearch.platform.images import DEFAULT_MAX_PIXELS
from carsearch.platform.runtime import Platform

log = logging.getLogger(__name__)

WHOLE_IMAGE = (0, 0, 65535, 65535)  # a box every image is inside: no crop


@dataclass
class TrainingSet:
    """What `write_training_set` wrote."""

    root: Path
    classes: int
    base_train: int
    base_test: int
    new_train: int
    new_test: int
    new_classes: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["root"] = str(self.root)
        return d


@dataclass(frozen=True)
class Labelled:
    """An image labelled through the queue: its file and the class name its labels make."""

    image_id: int
    path: Path
    class_name: str
    colour: str | None
    box: tuple[int, int, int, int] | None = None  # the box stored with its image row


def labelled_images(platform: Platform, collection: str) -> list[Labelled]:
    """Every indexed image of ``collection`` a person labelled through the queue."""
    with platform.db.session() as s:
        q = (select(Image).join(LabelTaskImage, LabelTaskImage.image_id == Image.id)
             .where(LabelTaskImage.labelled_at.is_not(None), Image.collection == collection,
                    Image.status == ImageStatus.indexed).order_by(Image.id))
        out: dict[int, Labelled] = {}
        for row in s.scalars(q):
            name = row.class_name or " ".join(
                str(p) for p in (row.make, row.model, row.body_type, row.year) if p)
            if name.strip() and row.make:
                box = tuple(row.box) if row.box and len(row.box) == 4 else None
                out[row.id] = Labelled(row.id, Path(row.path), name.strip(), row.colour,
                                       box)  # type: ignore[arg-type]
    return list(out.values())


def _held_out(image_id: int, share: float) -> bool:
    digest = hashlib.sha256(str(image_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_training_set(base: Path, extra: list[Labelled], out: Path, *,
                       test_share: float = 0.25,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> TrainingSet:
    """The base data set plus ``extra`` as one Stanford layout under ``out`` (replaced).

    Every image keeps the box it has (the base's annotation, or the box stored with a
    queue image's row) and one without gets the whole frame, so new and old classes go
    through the same image policy in training, evaluation and the index.
    The base keeps its split; of each new class, images whose id hashes under
    ``test_share`` are held out (at least one, when the class has two or more), the rest
    train. Originals that are gone are listed in ``missing`` and left out.
    """
    ds = load_stanford(base, max_pixels=max_pixels)
    if not ds.split("train"):
        raise ConfigError(f"{base}: no train images to retrain on")
    if out.exists():
        shutil.rmtree(out)
    (out / "cars_train").mkdir(parents=True)
    (out / "cars_test").mkdir()
    names = list(ds.class_names)
    index = {n: i + 1 for i, n in enumerate(names)}
    rows: dict[str, list[tuple[tuple[int, int, int, int], int, str]]] = {"train": [],
                                                                          "test": []}
    colours: list[str] = []
    for n, item in enumerate(ds.images):
        fname = f"{n + 1:06d}{item.path.suffix.lower() or '.jpg'}"
        folder = "cars_train" if item.split == "train" else "cars_test"
        _place(item.path, out / folder / fname)
        rows[item.split].append((item.bbox or WHOLE_IMAGE, index[item.label.class_name], fname))
        if item.label.colour:
            colours.append(json.dumps({"path": f"{folder}/{fname}", "colour": item.label.colour}))
    report = TrainingSet(out, 0, len(rows["train"]), len(rows["test"]), 0, 0)
    by_class: dict[str, list[Labelled]] = {}
    for item in extra:
        if not item.path.is_file():
            report.missing.append(str(item.path))
            continue
        by_class.setdefault(item.class_name, []).append(item)
    for name, items in sorted(by_class.items()):
        if name not in index:
            names.append(name)
            index[name] = len(names)
            report.new_classes[name] = len(items)
        test = [i for i in items if _held_out(i.image_id, test_share)]
        if len(items) >= 2 and not test:
            test = [items[-1]]
        if len(test) == len(items) and len(items) >= 2:
            test = test[1:]
        held = {i.image_id for i in test}
        for item in items:
            split = "test" if item.image_id in held else "train"
            folder = f"cars_{split}"
            fname = f"new-{item.image_id}{item.path.suffix.lower() or '.jpg'}"
            _place(item.path, out / folder / fname)
            rows[split].append((item.box or WHOLE_IMAGE, index[name], fname))
            report.new_test += split == "test"
            report.new_train += split == "train"
            if item.colour:
                colours.append(json.dumps({"path": f"{folder}/{fname}", "colour": item.colour}))
    (out / "cars_meta.mat").write_bytes(meta_mat_bytes(names))
    (out / "cars_train_annos.mat").write_bytes(annotations_mat_bytes(rows["train"]))
    (out / "cars_test_annos_withlabels.mat").write_bytes(annotations_mat_bytes(rows["test"]))
    (out / COLOUR_SIDECAR).write_text("".join(c + "\n" for c in colours), encoding="utf-8")
    report.classes = len(names)
    if report.missing:
        log.warning("retrain data: %d labelled original(s) are gone and were left out "
                    "(e.g. %s)", len(report.missing), report.missing[0])
    log.info("retrain data in %s: %d classes (%d new), %d + %d train, %d + %d test images",
             out, report.classes, len(report.new_classes), report.base_train,
             report.new_train, report.base_test, report.new_test)
    return report


class RetrainError(CarsearchError):
    """A retrain that cannot start (no data, no base)."""


def _base_of(platform: Platform) -> tuple[str, bool | None]:
    """The model a retrain starts from, and whether to train every weight."""
    cfg = platform.settings.retrain
    serving = platform.registry.serving()
    if cfg.base == "serving" and serving is not None:
        full = cfg.full
        if full is None:
            trained = (serving.params or {}).get("full")
            full = bool(trained) if trained is not None else None
        return str(platform.registry.verify(serving)), full
    chosen = platform.settings.base_model if cfg.base in ("serving", "base") else cfg.base
    if not chosen:
        raise RetrainError("nothing to retrain from: no serving version and no "
                           "CARSEARCH_BASE_MODEL")
    return chosen, cfg.full


def run_retrain(platform: Platform, claimed: retrains.Claimed, *,
                progress: bool = False) -> dict[str, Any]:
    """Train, evaluate and maybe promote for one claimed request; ends the request and
    returns what it recorded. Raises nothing a person did not cause: failures end the
    request as failed, with the error."""
    from carsearch.lifecycle.publish import METRICS, run_job
    from carsearch.training.trainer import TrainConfig

    cfg, settings = platform.settings.retrain, platform.settings
    work = settings.data_dir / "retrain" / f"request-{claimed.id}"
    outcome: dict[str, Any] = {"request": claimed.id}
    try:
        if cfg.metric not in METRICS:
            raise ConfigError(f"CARSEARCH_RETRAIN__METRIC must be one of "
                              f"{', '.join(METRICS)}, not {cfg.metric!r}")
        data = cfg.data or settings.data_dir / "catalogue"
        if not data.is_dir():
            raise RetrainError(f"no labelled data set at {data} (CARSEARCH_RETRAIN__DATA)")
        extra = labelled_images(platform, claimed.collection)
        tset = write_training_set(data, extra, work / "data", test_share=cfg.test_share,
                                  max_pixels=settings.max_image_pixels)
        outcome["data"] = tset.to_dict()
        base, full = _base_of(platform)
        outcome["base"] = base
        config = TrainConfig(
            data=tset.root, base=base, out=work / "run", steps=cfg.steps,
            batch_size=cfg.batch_size, lr=cfg.lr, full=full,
            feedback_db=settings.database_url, progress=progress,
        )
        report = run_job(
            config, db=platform.db, registry=platform.registry, promote=True,
            metric=cfg.metric, version_name=None,
            promoter=lambda name: promote_with_backfill(platform, name, progress=progress),
            new_classes=tuple(tset.new_classes),
        )
    except Exception as exc:  # the request records every failure; the loop goes on
        log.exception("retrain request %d failed", claimed.id)
        reason = f"failed: {type(exc).__name__}: {exc}"
        retrains.finish(platform.db, claimed, retrains.FAILED, reason, result=outcome)
        return {**outcome, "state": retrains.FAILED, "reason": reason}
    models = (report.evaluation or {}).get("models", {})
    outcome.update(version=report.version, promoted=report.promoted,
                   metric=cfg.metric, reason=report.promotion_reason,
                   split=(report.evaluation or {}).get("split"),
                   scores={k: m.get(cfg.metric) for k, m in models.items()},
                   by_group=_group_scores(models, cfg.metric))
    state = retrains.PROMOTED if report.promoted else retrains.CANDIDATE
    reason = (f"promoted {report.version}: {report.promotion_reason}" if report.promoted
              else f"kept {report.version} as a candidate: {report.promotion_reason}")
    retrains.finish(platform.db, claimed, state, reason, training_run_id=report.run_id,
                    version=report.version, result=outcome)
    log.warning("retrain request %d: %s", claimed.id, reason)
    return {**outcome, "state": state, "reason": reason}


def _group_scores(models: dict[str, Any], metric: str) -> dict[str, dict[str, Any]]:
    """Each model's `metric` on old and new classes apart (validation, served framing)."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        sets = (m.get("query_sets") or {}).get("box", {})
        out[name] = {g: sets[g].get(metric) for g in ("old classes", "new classes")
                     if g in sets}
    return out


class _Heartbeat:
    """Refresh a claimed request's heartbeat every ``every_s`` until stopped."""

    def __init__(self, platform: Platform, claimed: retrains.Claimed, every_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(platform, claimed, every_s),
                                        name=f"retrain-heartbeat-{claimed.id}", daemon=True)

    def _run(self, platform: Platform, claimed: retrains.Claimed, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                retrains.heartbeat(platform.db, claimed)
            except Exception:  # a database hiccup: the next beat tries again
                log.warning("retrain heartbeat failed", exc_info=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class TickReport:
    """What one tick of the job did."""

    ready: list[int] = field(default_factory=list)
    interrupted: list[int] = field(default_factory=list)
    ran: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preload() -> None:
    """Import what a retrain imports lazily, in the calling thread. A job thread inside
    `serve` must not be the first to import transformers while the page's thread imports
    it too: a half-initialised lazy module then fails with ``cannot import name
    'AutoModel'`` (seen)."""
    import peft  # noqa: F401
    import transformers

    import carsearch.lifecycle.publish  # noqa: F401

    for name in ("AutoModel", "AutoProcessor", "get_cosine_schedule_with_warmup"):
        getattr(transformers, name)


class RetrainJob:
    """One tick: declare dead runs interrupted, make labelled requests ready, run ready
    ones (at most ``max_runs`` per tick) in this process. Made in the thread that starts
    the job's thread (see `preload`)."""

    def __init__(self, platform: Platform, *, progress: bool = False) -> None:
        preload()
        self.platform = platform
        self.progress = progress
        self.holder = f"{socket.gethostname()}:{os.getpid()}"

    def tick(self, *, request_id: int | None = None, max_runs: int = 1) -> TickReport:
        db, cfg = self.platform.db, self.platform.settings.retrain
        rep = TickReport(interrupted=retrains.interrupt_stale(db, cfg.lease_s),
                         ready=retrains.refresh(db))
        for n in rep.interrupted:
            log.error("retrain request %d was interrupted (its process stopped); it is not "
                      "restarted by itself", n)
        for _ in range(max_runs):
            claimed = retrains.claim(db, f"{self.holder}@{datetime.now(UTC):%H%M%S%f}",
                                     request_id)
            if claimed is None:
                break
            log.warning("retrain request %d claimed by %s", claimed.id, claimed.holder)
            with _Heartbeat(self.platform, claimed, max(0.5, cfg.lease_s / 4)):
                rep.ran.append(run_retrain(self.platform, claimed, progress=self.progress))
        return rep
