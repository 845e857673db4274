"""A whole training job: record the run, train, evaluate, publish, maybe promote.

    report = run_job(config, db=db, registry=registry, promote=True, metric="mAP")

The main process records a `TrainingRun` row (running → finished / failed), evaluates
the zero-shot base and the trained model (and the serving version, when promotion is
asked for, so that both are measured on the same images) on the validation split, which
the promotion decision reads, and on the test split, which is only reported; writes
`evaluation_results.json` into the run directory, publishes the merged model to the
registry as a candidate (test metrics, validation metrics beside them, base id, data
fingerprint, hyperparameters), and with `promote=True` promotes it when it is at least as
good as the serving version on `metric` on validation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from accelerate import PartialState

from carsearch.platform.db import Database, RunStatus, TrainingRun
from carsearch.platform.errors import ConfigError
from carsearch.platform.models.registry import Registry
from carsearch.training.evaluate import evaluate_models, write_results
from carsearch.training.trainer import TrainConfig, TrainResult, train, use_cpu

log = logging.getLogger(__name__)

METRICS = ("mAP", "MRR", "recall@1", "recall@5", "recall@10")


@dataclass
class JobReport:
    """What a job did (JSON-ready through `to_dict`)."""

    run_id: int | None
    out: Path
    training: dict[str, Any]
    evaluation: dict[str, Any] | None = None
    version: str | None = None
    promoted: bool = False
    promotion_reason: str = ""
    is_main_process: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "out": str(self.out),
            "training": self.training,
            "evaluation": self.evaluation,
            "version": self.version,
            "promoted": self.promoted,
            "promotion_reason": self.promotion_reason,
        }


def start_run(db: Database, config: TrainConfig) -> int:
    with db.session() as s:
        row = TrainingRun(base_model=config.base, config=config.to_dict(),
                          status=RunStatus.running)
        s.add(row)
        s.flush()
        return int(row.id)


def finish_run(db: Database, run_id: int, **fields: Any) -> None:
    with db.session() as s:
        row = s.get(TrainingRun, run_id)
        if row is None:  # pragma: no cover - the row was written by start_run
            raise ConfigError(f"training run {run_id} vanished")
        for key, value in fields.items():
            setattr(row, key, value)
        row.finished_at = datetime.now(UTC)


def promotion_decision(
    evaluation: dict[str, Any], metric: str, serving_name: str | None
) -> tuple[bool, str]:
    """Promote when there is no serving version or the new model is at least as good as it
    on `metric`, both scored on the same held-out split in the same evaluation."""
    models = evaluation["models"]
    new = float(models["fine_tuned"][metric])
    if serving_name is None:
        return True, f"no serving version; {metric} {new:.4f}"
    old = float(models["serving"][metric])
    if new > old:
        return True, f"{metric} {new:.4f} beats serving {serving_name} ({old:.4f})"
    if new == old:
        return True, f"{metric} {new:.4f} equals serving {serving_name} ({old:.4f})"
    return False, f"{metric} {new:.4f} is below serving {serving_name} ({old:.4f})"


_HEADLINE = ("recall@1", "recall@5", "recall@10", "mAP", "MRR", "n_queries", "n_excluded",
             "n_items", "ci95")


def version_metrics(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The registry's metrics of a version: the test split's (reported), with the
    validation split's (what promotion read) beside them."""
    reported = evaluation.get("test", evaluation)

    def head(ev: dict[str, Any], name: str) -> dict[str, Any]:
        return {k: v for k, v in ev["models"][name].items() if k in _HEADLINE}

    keep = ("split", "n_images", "n_classes", "n_queries", "query_source", "chance_mAP")
    out = {**head(reported, "fine_tuned"), "zero_shot": head(reported, "zero_shot"),
           "evaluation": {k: reported[k] for k in keep if k in reported}}
    held = reported["models"]["fine_tuned"].get("query_sets", {}).get("box", {}).get(
        "held-out phrasings")
    if held is not None:
        out["held_out"] = {k: v for k, v in held.items() if k in _HEADLINE}
    if reported is not evaluation:
        out["validation"] = head(evaluation, "fine_tuned")
    return out


def evaluate_run(
    result: TrainResult,
    config: TrainConfig,
    *,
    registry: Registry | None,
    with_serving: bool,
    eval_queries: Path | None,
    eval_limit: int,
    new_classes: tuple[str, ...] = (),
) -> tuple[dict[str, Any], str | None]:
    """Zero-shot base, fine-tuned model (and the serving version) on the validation split
    (the decision) and the test split (reported, under "test")."""
    if result.model_dir is None:
        raise ConfigError("the run has not finished; nothing to evaluate")
    models: dict[str, str | Path] = {"zero_shot": config.base, "fine_tuned": result.model_dir}
    serving = registry.serving() if registry is not None and with_serving else None
    if serving is not None and registry is not None:
        models["serving"] = registry.verify(serving)
    from carsearch.data.stanford import load_stanford

    dataset = load_stanford(config.data)
    test = evaluate_models(
        models, dataset, queries_file=eval_queries, limit=eval_limit,
        progress=config.progress, split="test", new_classes=new_classes,
    )
    if dataset.subset("validation"):
        evaluation = evaluate_models(
            models, dataset, queries_file=eval_queries, limit=eval_limit,
            progress=config.progress, split="validation", new_classes=new_classes,
        )
        evaluation["test"] = test
    else:  # too few train images per class to carve any: say so, decide on test
        log.warning("no validation images (every class has under 3 train images): the "
                    "promotion decision reads the test split")
        evaluation = {**test, "decision_note": "no validation images; decided on test"}
    evaluation["training"] = result.summary()
    write_results(result.out, evaluation)
    return evaluation, serving.name if serving is not None else None


def run_job(
    config: TrainConfig,
    *,
    db: Database | None,
    registry: Registry | None,
    promote: bool = False,
    metric: str = "mAP",
    eval_queries: Path | None = None,
    eval_limit: int = 0,
    version_name: str | None = None,
    promoter: Callable[[str], object] | None = None,
    new_classes: tuple[str, ...] = (),
) -> JobReport:
    """Train, evaluate, publish (see the module docstring). Other processes only train.

    `promoter(name)` makes a version serve (default: `registry.promote`); the CLI passes
    the ingest side's promote-with-backfill, so the new collection is filled first.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
    main = PartialState(cpu=use_cpu()).is_main_process
    run_id = start_run(db, config) if db is not None and main else None
    try:
        result = train(config)
        report = JobReport(run_id, config.out, result.summary(), is_main_process=main)
        if not main or result.model_dir is None:
            if db is not None and run_id is not None:
                finish_run(db, run_id, status=RunStatus.failed,
                           data_fingerprint=result.fingerprint, metrics=result.summary(),
                           error=f"stopped at step {result.counters.step}; resume to finish")
            return report
        evaluation, serving = evaluate_run(
            result, config, registry=registry, with_serving=promote,
            eval_queries=eval_queries, eval_limit=eval_limit, new_classes=new_classes,
        )
        report.evaluation = evaluation
        version_id = _publish(report, result, config, registry, evaluation, serving,
                              promote=promote, metric=metric, name=version_name,
                              promoter=promoter)
        if db is not None and run_id is not None:
            outcome = {"promote_asked": promote, "promoted": report.promoted,
                       "reason": report.promotion_reason, "version": report.version}
            finish_run(db, run_id, status=RunStatus.finished,
                       data_fingerprint=result.fingerprint,
                       metrics={"training": result.summary(), **version_metrics(evaluation),
                                "outcome": outcome},
                       model_version_id=version_id)
        return report
    except BaseException as exc:
        if db is not None and run_id is not None:
            finish_run(db, run_id, status=RunStatus.failed, error=f"{type(exc).__name__}: {exc}")
        raise


def _publish(
    report: JobReport,
    result: TrainResult,
    config: TrainConfig,
    registry: Registry | None,
    evaluation: dict[str, Any],
    serving: str | None,
    *,
    promote: bool,
    metric: str,
    name: str | None,
    promoter: Callable[[str], object] | None = None,
) -> int | None:
    if registry is None or result.model_dir is None:
        return None
    params = {**result.config, "data_fingerprint": result.fingerprint,
              "training": result.summary()}
    version = registry.publish(
        result.model_dir, name=name, base_model=config.base,
        metrics=version_metrics(evaluation), params=params,
    )
    report.version = version.name
    if promote:
        ok, reason = promotion_decision(evaluation, metric, serving)
        report.promotion_reason = reason
        if ok:
            (promoter or registry.promote)(version.name)
            report.promoted = True
        log.info("promotion of %s: %s", version.name, reason)
    return int(version.id)
