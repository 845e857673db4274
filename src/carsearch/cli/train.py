"""`carsearch train` and `carsearch evaluate`.

The lead registers them with `app.command("train")(train_command)` and
`app.command("evaluate")(evaluate_command)`. Data-parallel on several processes:

    accelerate launch --multi_gpu --num_processes 2 -m carsearch.cli train ...

works on CPU too (gloo; `--multi_gpu` selects Accelerate's torchrun launcher, which
`--cpu` does not use for several processes on one machine). Only the main process
evaluates, publishes and writes to the database.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from carsearch.cli.context import settings_from
from carsearch.platform.errors import ConfigError
from carsearch.platform.settings import Settings
from carsearch.training.recipe import (
    PROJECTIONS,
    STAGE1_FEATURE_DROPOUT,
    STAGE1_PROJECTION,
    STAGE1_STEPS,
    has_cached_feature_tower,
)

log = logging.getLogger(__name__)


def _default_data(settings: Settings, data: Path | None) -> Path:
    root = data or settings.data_dir / "catalogue"
    if not (root / "cars_meta.mat").is_file() and not (root / "devkit" / "cars_meta.mat").is_file():
        raise ConfigError(
            f"no data set at {root}: pass --data (Stanford Cars layout) or render the "
            f"catalogue with `carsearch data synth --out {root}`"
        )
    return root


def _base(settings: Settings, base: str) -> str:
    chosen = base or settings.base_model
    path = Path(chosen).expanduser()
    if (chosen.startswith((".", "/", "~")) or path.exists()) and not path.is_dir():
        raise ConfigError(f"no base model at {chosen}: build one with `carsearch base build`")
    return chosen


def _echo_table(models: dict[str, dict[str, Any]]) -> None:
    from carsearch.training.evaluate import KS

    keys = [f"recall@{k}" for k in KS] + ["mAP", "MRR"]
    typer.echo(f"{'model':<12}" + "".join(f"{k:>11}" for k in keys))
    for name, m in models.items():
        typer.echo(f"{name:<12}" + "".join(f"{float(m[k]):>11.4f}" for k in keys))


def train_command(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option(help="Stanford Cars layout (default: "
                                              "DATA_DIR/catalogue).")] = None,
    queries: Annotated[Path | None, typer.Option(help="Augmented queries (JSONL from "
                                                 "`carsearch augment`); default: generated "
                                                 "offline.")] = None,
    base: Annotated[str, typer.Option(help="Base model dir or hub id (default: "
                                      "CARSEARCH_BASE_MODEL).")] = "",
    epochs: Annotated[float, typer.Option(min=0.0, help="Epochs (unless --steps; 0: 40 for "
                                          "full training, 1 for LoRA).")] = 0.0,
    steps: Annotated[int, typer.Option(min=0, help="Optimizer steps (0: from --epochs).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Global batch size.")] = 64,
    grad_accum: Annotated[int, typer.Option(min=1, help="Gradient accumulation steps.")] = 1,
    loss: Annotated[str, typer.Option(help="Contrastive loss: sigmoid (SigLIP's pairwise, "
                                      "the default) or softmax (CLIP's symmetric InfoNCE); "
                                      "stage 1 uses it too.")] = "sigmoid",
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (0: 3e-4 full, "
                                      "2e-4 LoRA).")] = 0.0,
    warmup: Annotated[int, typer.Option(min=-1, help="Warmup steps (-1: 5 %).")] = -1,
    lora_rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    stage1_steps: Annotated[int, typer.Option(min=-1, help="First train the compact "
                                              "pretrained base's text side on cached image "
                                              "features for N steps (stage 1), then LoRA "
                                              "(stage 2); 0: no stage 1; -1: "
                                              f"{STAGE1_STEPS} on a compact pretrained base, "
                                              "else 0.")] = -1,
    stage1_grad_accum: Annotated[int, typer.Option(min=1, help="Stage 1's micro-batches "
                                                   "per optimizer step.")] = 1,
    accumulate: Annotated[str, typer.Option(help="How stage 1 accumulates: plain (the mean "
                                            "of the micro-batches' losses) or cached (the "
                                            "whole effective batch's loss exactly, every "
                                            "image against every micro-batch's texts: the "
                                            "softmax's normaliser spans the effective "
                                            "batch; a second text pass).")] = "plain",
    stage1_lr: Annotated[float, typer.Option(min=0.0, help="Stage 1's peak learning rate "
                                             "(0: the recipe's).")] = 0.0,
    stage1_feature_dropout: Annotated[float, typer.Option(
        min=-1.0, max=0.95, help="Stage 1's dropout on the cached image features (-1: the "
        f"recipe's, {STAGE1_FEATURE_DROPOUT}).")] = -1.0,
    stage1_projection: Annotated[str, typer.Option(
        help="Stage 1's image projection: ridge (fitted to the labels in closed form, then "
        "fixed; the recipe's) or learned (trained with the text tower).")] = STAGE1_PROJECTION,
    stage2: Annotated[bool | None, typer.Option("--stage2/--no-stage2", help="After stage "
                                                "1, LoRA on both towers (default: only when "
                                                "--steps or --epochs is given).")] = None,
    full: Annotated[bool | None, typer.Option("--full/--lora", help="Train every weight, or "
                                              "LoRA (default: full for a base with no "
                                              "pre-training).")] = None,
    class_texts: Annotated[bool, typer.Option("--class-texts/--no-class-texts", help="Every "
                                              "step, also score the images against every "
                                              "class name.")] = True,
    feedback: Annotated[bool, typer.Option("--feedback/--no-feedback", help="Also train "
                                           "on the search page's votes (query_feedback): "
                                           "thumbs-down as hard negatives, thumbs-up as "
                                           "extra positives.")] = True,
    feedback_weight: Annotated[float, typer.Option(min=0.0, help="Weight of each feedback "
                                                   "pair in the loss.")] = 1.0,
    feedback_max: Annotated[int, typer.Option(min=0, help="At most N feedback pairs, "
                                              "newest first.")] = 1000,
    feedback_share: Annotated[float, typer.Option(min=0.0, help="...and at most this share "
                                                  "of the train images.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    mixed_precision: Annotated[str, typer.Option(help="auto (bf16 on a bf16 GPU, else fp32), "
                                                 "no, bf16.")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Run directory (default: "
                                             "DATA_DIR/runs/<time>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Checkpoint every N steps.")] = 0,
    stop_after: Annotated[int, typer.Option(min=0, help="Stop (with a checkpoint) after N "
                                            "steps.")] = 0,
    limit: Annotated[int, typer.Option(min=0, help="Only the first N train images.")] = 0,
    train_views: Annotated[str, typer.Option(help="Image policy: box (box crops, whole "
                                             "frames where there is no box) or "
                                             "box-to-frame (views from the box out to the "
                                             "whole frame).")] = "box",
    frame_prob: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of samples "
                                              "shown the whole frame.")] = 0.25,
    box_margin: Annotated[float, typer.Option(min=0.0, max=1.0, help="Served crops widen "
                                              "the box by this share a side.")] = 0.0,
    eval_limit: Annotated[int, typer.Option(min=0, help="Only the first N test images.")] = 0,
    eval_queries: Annotated[Path | None, typer.Option(help="Evaluation queries JSONL.")] = None,
    promote: Annotated[bool, typer.Option(help="Promote if it beats the serving version.")] = (
        False
    ),
    metric: Annotated[str, typer.Option(help="Metric for --promote.")] = "mAP",
    name: Annotated[str | None, typer.Option(help="Version name (default: time+hash).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Fine-tune the base on the train split, evaluate, and publish a candidate version."""
    import torch

    from carsearch.lifecycle.publish import METRICS, run_job
    from carsearch.training.grad_cache import ACCUMULATE
    from carsearch.training.loss import LOSSES
    from carsearch.training.trainer import MIXED_PRECISION, TrainConfig

    settings = settings_from(ctx)
    if mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}")
    if resume and out is None:
        raise ConfigError("--resume needs --out (the run directory to continue)")
    if loss not in LOSSES:
        raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    if stage1_projection not in PROJECTIONS:
        raise ConfigError(f"--stage1-projection must be one of {', '.join(PROJECTIONS)}, "
                          f"not {stage1_projection!r}")
    if accumulate not in ACCUMULATE:
        raise ConfigError(f"--accumulate must be one of {', '.join(ACCUMULATE)}, not "
                          f"{accumulate!r}")
    if train_views not in ("box-to-frame", "box"):
        raise ConfigError(f"--train-views is box-to-frame or box, not {train_views!r}")
    torch.set_num_threads(settings.threads.torch)
    settings.ensure_dirs()
    chosen_base = _base(settings, base)
    stage1 = stage1_steps if stage1_steps >= 0 else (
        STAGE1_STEPS if has_cached_feature_tower(chosen_base) else 0)
    if stage1 == 0 and stage2 is False:
        raise ConfigError("--no-stage2 needs stage 1 (--stage1-steps N on a compact "
                          "pretrained base)")
    config = TrainConfig(
        data=_default_data(settings, data), queries=queries, base=chosen_base,
        out=out or settings.data_dir / "runs" / f"{datetime.now(UTC):%Y%m%d-%H%M%S}",
        epochs=epochs, steps=steps, batch_size=batch_size, grad_accum=grad_accum, loss=loss,
        lr=lr,
        warmup=warmup, lora_rank=lora_rank, full=full, seed=seed,
        mixed_precision=mixed_precision, checkpoint_every=checkpoint_every,
        stop_after=stop_after, resume=resume, limit=limit, class_texts=class_texts,
        feedback_db=settings.database_url if feedback else "", feedback_weight=feedback_weight,
        feedback_max=feedback_max, feedback_share=feedback_share, progress=not as_json,
        ledger_db=settings.database_url,  # checkpoint hashes, checked by --resume
        train_views=train_views, frame_prob=frame_prob, box_margin=box_margin,
        stage1_steps=stage1, stage1_lr=stage1_lr, stage1_feature_dropout=stage1_feature_dropout,
        stage1_projection=stage1_projection,
        stage1_grad_accum=stage1_grad_accum, accumulate=accumulate,
        stage2=stage2 if stage2 is not None else (stage1 == 0 or bool(steps or epochs)),
        feature_cache=settings.data_dir / "feature-cache",
    )
    from carsearch.lifecycle.reindex import promote_with_backfill
    from carsearch.platform.runtime import Platform

    platform = Platform(settings)  # checks the schema is migrated
    try:
        report = run_job(
            config, db=platform.db, registry=platform.registry, promote=promote,
            metric=metric, eval_queries=eval_queries, eval_limit=eval_limit, version_name=name,
            promoter=lambda version: promote_with_backfill(platform, version),
        )
    finally:
        platform.close()
    if not report.is_main_process:
        return
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    t = report.training
    typer.echo(f"run {report.run_id}: {t['steps']}/{t['total_steps']} steps, "
               f"{t['samples_per_s']} samples/s, final loss {t['final_loss']}")
    fb = t.get("feedback") or {}
    if fb:
        typer.echo(f"feedback: {fb['pairs']} pairs ({fb['up']} up, {fb['down']} down) from "
                   f"{fb['rows']} votes, {fb['capped']} over the cap of {fb['cap']}, "
                   f"skipped {fb['skipped'] or 'none'}")
    if report.evaluation is None:
        typer.echo(f"stopped early; continue with --resume --out {report.out}")
        return
    _echo_table(report.evaluation["models"])
    typer.echo(f"published {report.version}" + (f"; promoted: {report.promotion_reason}"
               if report.promoted else f"; {report.promotion_reason}".rstrip("; ")))


def evaluate_command(
    ctx: typer.Context,
    model: Annotated[list[str] | None, typer.Option(help="Model dir or hub id to evaluate "
                                                    "(repeatable; default: the base, then "
                                                    "the serving version).")] = None,
    data: Annotated[Path | None, typer.Option(help="Stanford Cars layout (default: "
                                              "DATA_DIR/catalogue).")] = None,
    queries: Annotated[Path | None, typer.Option(help="JSONL lines {query, relevant: "
                                                 "[class names], attributes: {...}}.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Only the first N images.")] = 0,
    split: Annotated[str, typer.Option(help="test (reported), validation (what recipes "
                                       "and promotion read) or train.")] = "test",
    whole: Annotated[bool, typer.Option("--whole-frame", help="Also score every image "
                                        "embedded whole, without its box.")] = False,
    served: Annotated[bool, typer.Option("--served", help="Through the search service to "
                                         "the serving collection, nothing read from the "
                                         "text, scored on the database's labels.")] = False,
    collection: Annotated[str | None, typer.Option(help="With --served: the image "
                                                   "collection (default: vehicles).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Text→image Recall@K, mAP and MRR, with chance levels and 95 % intervals: offline on
    a split (zero-shot base vs serving), or --served through the running index."""
    import torch

    settings = settings_from(ctx)
    torch.set_num_threads(settings.threads.torch)
    if served:
        _served(ctx, queries, collection, as_json)
        return
    from carsearch.training.evaluate import evaluate_models

    if split not in ("test", "validation", "train"):
        raise ConfigError(f"--split is test, validation or train, not {split!r}")
    models: dict[str, str | Path] = {}
    if model:
        models = {f"model{i}" if len(model) > 1 else "model": m for i, m in enumerate(model)}
    else:
        models["zero_shot"] = _base(settings, "")
        from carsearch.platform.runtime import Platform

        platform = Platform(settings)
        try:
            serving = platform.registry.serving()
            if serving is not None:
                models["serving"] = platform.registry.verify(serving)
        finally:
            platform.close()
    results = evaluate_models(models, _default_data(settings, data), queries_file=queries,
                              limit=limit, progress=not as_json, split=split,
                              framings=("box", "whole") if whole else ("box",))
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    typer.echo(f"{split} split: {results['n_images']} images, {results['n_classes']} classes")
    for framing in results["framings"]:
        for set_name in results["query_sets"]:
            seen = ("framed by each version's image policy (boxes)" if framing == "box"
                    else "whole frames (no boxes)")
            typer.echo(f"\n{set_name}, images {seen}:")
            rows = {name: m["query_sets"][framing][set_name]
                    for name, m in results["models"].items()}
            _echo_summary(rows)


def _echo_summary(rows: dict[str, dict[str, Any]]) -> None:
    """Each row's metrics with 95 % intervals, then the chance level of a random ranking."""
    from carsearch.training.evaluate import KS

    keys = [f"recall@{k}" for k in KS] + ["mAP", "MRR"]
    typer.echo(f"{'':<12}" + "".join(f"{k:>21}" for k in keys))
    chance: dict[str, float] = {}
    for name, m in rows.items():
        cells = []
        for k in keys:
            lo, hi = m["ci95"][k]
            cells.append(f"{m[k]:.3f} [{lo:.2f}, {hi:.2f}]")
        typer.echo(f"{name:<12}" + "".join(f"{c:>21}" for c in cells))
        chance = m.get("chance") or chance
    if chance:
        typer.echo(f"{'chance':<12}" + "".join(f"{chance[k]:>21.4f}" for k in keys))
    first = next(iter(rows.values()), {})
    typer.echo(f"({first.get('n_queries', 0)} queries over {first.get('n_items', 0)} images; "
               "[95 % bootstrap interval over queries])")
    for name, m in rows.items():
        cal = m.get("calibration")
        if cal and cal.get("n"):
            _echo_calibration(name, cal)


def _echo_calibration(name: str, cal: dict[str, Any]) -> None:
    """The reliability table of the probability the page shows, and its ECE."""
    typer.echo(f"calibration of {name}'s probability over {cal['n']} (query, image) pairs "
               f"({cal['positives']} relevant): ECE {cal['ece']:.4f}, Brier "
               f"{cal['brier']:.4f}")
    typer.echo("  probability bin    pairs   mean p   observed")
    for b in cal["bins"]:
        typer.echo(f"  {b['lo']:.1f}-{b['hi']:.1f}       {b['n']:>8} {b['predicted']:>8.3f} "
                   f"{b['observed']:>10.3f}")


def served_query_sets(db: Any, collection: str) -> dict[str, list[Any]]:
    """The default served queries: every class name the database holds, and one held-out
    phrasing per class (from its first indexed image), both labelled by the database."""
    from sqlalchemy import select

    from carsearch.data.augment.heldout import held_out_query
    from carsearch.platform.db import Image, ImageStatus
    from carsearch.platform.search.evaluation import EvalQuery
    from carsearch.platform.vehicles import parse_class_name

    with db.session() as s:
        rows = list(s.scalars(select(Image).where(
            Image.status == ImageStatus.indexed, Image.collection == collection,
            Image.class_name.is_not(None)).order_by(Image.id)))
    first: dict[str, Any] = {}
    for r in rows:
        first.setdefault(r.class_name, r)
    names = [EvalQuery(n, (n,)) for n in sorted(first)]
    held = []
    for n in sorted(first):
        try:
            label = parse_class_name(n, first[n].colour)
        except ValueError:
            continue
        q = held_out_query(label, key=str(first[n].id))
        if q is not None:
            held.append(EvalQuery(q.text, (), q.attributes))
    return {"class names": names, "held-out phrasings": held}


def _served(ctx: typer.Context, queries: Path | None, collection: str | None,
            as_json: bool) -> None:
    from carsearch.cli.context import platform_from
    from carsearch.platform.search.evaluation import (
        evaluate_served,
        served_query_sets,
        store_served,
    )
    from carsearch.training.evaluate import load_eval_queries

    p = platform_from(ctx)
    name = p.search.collection(collection)
    if queries is not None:
        sets: dict[str, list[Any]] = {str(queries): load_eval_queries(queries)}
    else:
        sets = served_query_sets(p.db, name)
    if not any(sets.values()):
        raise ConfigError(f"collection {name} has no labelled indexed images to score "
                          "(pass --queries FILE)")
    results = evaluate_served(p.search, sets, collection=collection)
    if queries is None:  # the default queries: what the page's Evaluation tab shows
        store_served(p.db, results)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    typer.echo(f"served view: version {results['version']}, collection "
               f"{results['collection']}, {results['n_images']} indexed images, k "
               f"{results['k']}, filters: {results['filters']}")
    for set_name, summary in results["query_sets"].items():
        typer.echo(f"\n{set_name}:")
        _echo_summary({"served": summary})
