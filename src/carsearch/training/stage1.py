"""Stage 1 of training the compact pretrained base: the image tower frozen, features cached.

    result = train_stage1(Stage1Config(data=root, base=base_dir, out=out_dir))

The image backbone does not change, so its pooled features are computed once per photo
(`feature_cache`) and every step trains only the text tower, the image projection and
the two scalars with the sigmoid loss, under Accelerate (`prepare` once, AdamW, cosine
schedule with warmup). Each step scores the batch's images against the batch's texts
(the class name with probability `caption_prob`, else one of the image's generated
queries) and against every class name of the train set, with class-level labels, as the
trainer does. The result is saved with `save_pretrained` (plus the processor): an
ordinary base for stage 2 (LoRA on both towers, `trainer.train`) or for publishing.

`grad_accum` micro-batches make a step: `accumulate="plain"` averages their own losses;
`"cached"` takes the exact gradient of the whole effective batch's loss (every image
against every micro-batch's texts, the class names once) through cached embeddings
(`training/grad_cache.py`), so the softmax's normaliser spans the effective batch.

`val_share` carves a validation split out of the train images (by a hash of the image
id, so it is the same in every run); only the rest trains, and `evaluate_cached` scores
the validation images, so recipes are chosen without the test split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import ImageOps
from torch import nn
from tqdm import tqdm

from carsearch.data.stanford import LabelledImage, StanfordDataset, load_stanford
from carsearch.platform.errors import ConfigError
from carsearch.platform.models.encoder import quiet_config_check
from carsearch.training.feature_cache import (
    CacheStats,
    FeatureCache,
    cached_features,
    content_key,
    tower_key,
)
from carsearch.training.grad_cache import ACCUMULATE, cached_backward
from carsearch.training.loss import LOSSES, contrastive_loss
from carsearch.training.query_metrics import per_query
from carsearch.training.recipe import (
    PROJECTIONS,
    STAGE1_BATCH,
    STAGE1_FEATURE_DROPOUT,
    STAGE1_LR,
    STAGE1_PROJECTION,
    STAGE1_RIDGE_FILL,
    STAGE1_RIDGE_LAMBDA,
    STAGE1_STEPS,
)
from carsearch.training.train_data import (
    colour_id,
    data_fingerprint,
    named_colour,
    train_queries,
)
from carsearch.training.trainer import load_base

log = logging.getLogger(__name__)


@dataclass
class Stage1Config:
    data: Path
    base: str
    out: Path
    cache_dir: Path
    queries: Path | None = None  # augmented queries (JSONL); None: generated offline
    steps: int = STAGE1_STEPS
    batch_size: int = STAGE1_BATCH
    lr: float = STAGE1_LR  # chosen on validation (training/recipe.py)
    warmup: float = 0.05
    weight_decay: float = 0.0
    caption_prob: float = 0.5
    scalar_lr_mult: float = 10.0
    val_share: float = 0.0
    # the framings trained: t in [0, 1] between the box (0) and the whole frame (1), one
    # cached feature row per image and view; each sample draws one (t = 1 with
    # `frame_prob` when the views hold it, else uniformly among the others)
    views: tuple[float, ...] = (0.0,)
    frame_prob: float = 0.25
    # the share of samples that see their image mirrored left to right (a second cached
    # row per image and view); 0 caches and trains the unmirrored rows only
    flip_prob: float = 0.0
    seed: int = 0
    progress: bool = True
    loss: str = "sigmoid"  # or "softmax" (training/loss.py)
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    # "plain": the mean of the micro-batches' own losses; "cached": the loss of the whole
    # effective batch, exactly, through cached embeddings (training/grad_cache.py)
    accumulate: str = "plain"
    class_texts: bool = True  # every class name as a text column of every step
    # regularisers of the trained side: dropout on the cached backbone features before
    # the image projection, and the share of a text's tokens dropped (masked as padding)
    feature_dropout: float = STAGE1_FEATURE_DROPOUT  # the recipe's (training/recipe.py)
    token_dropout: float = 0.0
    # which train images train when val_share is 0: "train" (the data set's validation
    # carve held out, as promotion reads it) or "train+validation" (every train image,
    # a refit once the recipe is chosen)
    train_subset: str = "train"
    # the image projection: "ridge" (fitted to the labels in closed form before the first
    # step, then fixed: `ridge_projection`) or "learned" (trained with the text tower)
    projection: str = STAGE1_PROJECTION
    ridge_lambda: float = STAGE1_RIDGE_LAMBDA
    ridge_fill: float = STAGE1_RIDGE_FILL


@dataclass
class Stage1Result:
    model_dir: Path
    steps: int
    seconds: float
    step_ms: float
    losses: list[float]
    cache: dict[str, Any]
    n_train: int
    n_val: int
    config: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""  # the trainer's data fingerprint of the images trained on
    cpu_seconds: float = 0.0  # CPU time of the steps (all threads); on a shared machine
    n_classes: int = 0


def is_validation(image_id: str, share: float) -> bool:
    """The carved validation split: a fixed hash of the image id below `share`."""
    if share <= 0:
        return False
    digest = hashlib.sha256(f"val|{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def split_train(items: Sequence[LabelledImage], share: float
                ) -> tuple[list[LabelledImage], list[LabelledImage]]:
    train = [x for x in items if not is_validation(x.image_id, share)]
    val = [x for x in items if is_validation(x.image_id, share)]
    return train, val


def image_keys(items: Sequence[LabelledImage]) -> list[str]:
    return [content_key(item.path, repr(item.bbox)) for item in items]


def features_for(net: Any, processor: Any, dataset: StanfordDataset,
                 items: Sequence[LabelledImage], cache_dir: Path, *, progress: bool = True,
                 stats: CacheStats | None = None, view: float = 0.0,
                 flip: bool = False) -> np.ndarray:
    """Backbone features of each item's view ``view`` (0: its box crop, 1: the whole
    frame, between: the box widened towards the frame, as `ImagePolicy.train_view`),
    mirrored left to right when ``flip`` (a car seen from its other side)."""
    cache = FeatureCache(cache_dir, tower_key(net, processor))
    mirror = "|flip" if flip else ""

    def oriented(image: Any) -> Any:
        return ImageOps.mirror(image.convert("RGB")) if flip else image

    if view <= 0.0:
        keys = (image_keys(items) if not flip else
                [content_key(item.path, f"{item.bbox!r}{mirror}") for item in items])
        return cached_features(net, processor, keys,
                               lambda i: oriented(dataset.open_image(items[i])), cache,
                               progress=progress, stats=stats)
    from carsearch.platform.models.image_policy import ImagePolicy

    policy = ImagePolicy(train_views="box-to-frame")
    keys = [content_key(item.path, f"{item.bbox!r}|view={view:.4f}{mirror}")
            for item in items]

    def open_view(i: int) -> Any:
        return oriented(policy.train_view(dataset.open_image(items[i], crop=False),
                                          items[i].bbox, view))

    return cached_features(net, processor, keys, open_view, cache, progress=progress,
                           stats=stats)


def draw_views(rng: random.Random, views: Sequence[float], frame_prob: float,
               n: int) -> list[int]:
    """Which view each of n samples sees: the whole frame (t = 1) with `frame_prob` when
    it is among the views, otherwise one of the others uniformly."""
    whole = [j for j, t in enumerate(views) if t >= 1.0]
    rest = [j for j, t in enumerate(views) if t < 1.0] or whole
    out = []
    for _ in range(n):
        if whole and (rng.random() < frame_prob or not rest):
            out.append(whole[0])
        else:
            out.append(rest[rng.randrange(len(rest))])
    return out


class Stage1Module(nn.Module):
    """What Accelerate prepares: projected cached image features and the text tower."""

    def __init__(self, net: nn.Module, feature_dropout: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.feature_dropout = feature_dropout

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        net: Any = self.net
        features = F.dropout(features, self.feature_dropout, self.training)
        image = F.normalize(net.project_image(features), dim=-1)
        text = F.normalize(net.get_text_features(input_ids=input_ids), dim=-1)
        return image, text, net.logit_scale.reshape(()), net.logit_bias.reshape(())


def label_targets(classes: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """The ridge's targets, one row an image: +1 in its class's column, -1 in the other
    classes'; a column per colour some image has, +1 / -1 where the image's colour is
    known, 0 where it is not."""
    n_classes = int(classes.max()) + 1
    cls = -torch.ones(len(classes), n_classes, dtype=torch.float64)
    cls[torch.arange(len(classes)), classes] = 1.0
    present = sorted(int(c) for c in colours.unique() if c >= 0)
    col = torch.zeros(len(classes), len(present), dtype=torch.float64)
    known = colours >= 0
    for j, c in enumerate(present):
        col[known, j] = torch.where(colours[known] == c, 1.0, -1.0).double()
    return torch.cat([cls, col], dim=1)


def ridge_projection(features: torch.Tensor, targets: torch.Tensor, dim: int, lam: float,
                     fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear map (weight (dim, d), bias (dim,)) of features onto `dim` outputs: the
    ridge regression of the centred features onto the targets (penalty `lam`); with more
    target columns than `dim`, its `dim` leading directions (reduced rank); with fewer,
    the rest are the leading principal directions of the features' residual (what the
    ridge's directions leave), each scaled to `fill` times the ridge outputs' mean
    standard deviation (0: left at zero; so are directions the features do not vary
    along, when there are fewer photos than dimensions)."""
    z = features.double()
    mean = z.mean(0)
    zc = z - mean
    d = z.shape[1]
    gram = zc.T @ zc
    w = torch.linalg.solve(gram + lam * torch.eye(d, dtype=torch.float64), zc.T @ targets)
    if w.shape[1] > dim:  # more label columns than dimensions: the fitted outputs' top
        _, _, vt = torch.linalg.svd(zc @ w, full_matrices=False)
        w = w @ vt[:dim].T
    rest = dim - w.shape[1]
    if rest > 0:
        spread = (zc @ w).std(0).mean()
        # the ridge's directions, orthonormal: its rank (the class columns, centred, sum
        # to zero: one fewer than there are), not its column count
        u, sv, _ = torch.linalg.svd(w, full_matrices=False)
        basis = u[:, sv > sv.max() * 1e-9]
        keep = torch.eye(d, dtype=torch.float64) - basis @ basis.T
        residual_cov = keep @ gram @ keep
        _, vecs = torch.linalg.eigh(residual_cov)  # ascending
        comps = vecs[:, -rest:].flip(1)  # (d, rest), the largest first
        std = (zc @ keep @ comps).std(0)  # along what the ridge leaves, not through it
        # fewer photos than dimensions leave directions the features never vary along:
        # those stay at zero rather than being blown up to the spread
        varied = std > 1e-6 * std.max().clamp_min(1e-12)
        scale = torch.where(varied, fill * spread / std.clamp_min(1e-12), 0.0)
        w = torch.cat([w, comps * scale], dim=1)
    return w.T.float().contiguous(), (-(mean @ w)).float()


def fit_ridge_projection(net: Any, features: torch.Tensor, targets: torch.Tensor,
                         lam: float, fill: float) -> None:
    """Set the image projection to `ridge_projection` of the layer-normed features and
    fix it (and the layer norm): the steps train the text tower to it."""
    vision = net.vision_model
    with torch.no_grad():
        normed = vision.norm(features.float())
        weight, bias = ridge_projection(normed, targets, vision.projection.out_features,
                                        lam, fill)
        vision.projection.weight.copy_(weight)
        vision.projection.bias.copy_(bias)
    vision.projection.requires_grad_(False)
    vision.norm.requires_grad_(False)


def freeze_image_backbone(net: Any) -> None:
    net.requires_grad_(True)
    net.vision_model.backbone.requires_grad_(False)


def tokenize_longest(processor: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    return processor.tokenizer(list(texts), padding="longest", truncation=True,
                               max_length=max_length, return_tensors="pt")["input_ids"]


class TokenTable:
    """Every text of a run tokenized once (truncated, unpadded); `ids` pads a step's
    texts to the longest of them with the pad id, as `tokenize_longest` would."""

    def __init__(self, processor: Any, texts: Sequence[str], max_length: int) -> None:
        unique = list(dict.fromkeys(texts))
        encoded = processor.tokenizer(unique, padding=False, truncation=True,
                                      max_length=max_length)["input_ids"]
        self._ids = dict(zip(unique, encoded, strict=True))
        self._pad = int(processor.tokenizer.pad_token_id)

    def ids(self, texts: Sequence[str]) -> torch.Tensor:
        rows = [self._ids[t] for t in texts]
        out = torch.full((len(rows), max(map(len, rows))), self._pad, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out


def drop_tokens(ids: torch.Tensor, share: float, pad_id: int, rows: int) -> torch.Tensor:
    """The first `rows` texts with each token dropped (set to the pad id, which the text
    tower masks out) with probability `share`; a text keeps at least its first token."""
    out = ids.clone()
    head = out[:rows]
    drop = (torch.rand(head.shape) < share) & (head != pad_id)
    drop[:, 0] = False
    head[drop] = pad_id
    return out


def stage1_optimizers(net: Any, config: Stage1Config) -> list[torch.optim.Optimizer]:
    """AdamW for the dense weights (the scalars at `scalar_lr_mult` x lr); SparseAdam for
    the token embeddings, whose gradient is made sparse: a step touches the few hundred
    tokens its texts hold, not all 32,000 rows (a dense update of the 8.2 M-parameter
    table cost more than the rest of the step)."""
    embedding = net.text_model.token_embedding
    embedding.sparse = True
    dense, scalars = [], []
    for name, param in net.named_parameters():
        if not param.requires_grad or param is embedding.weight:
            continue
        (scalars if name in ("logit_scale", "logit_bias") else dense).append(param)
    adamw = torch.optim.AdamW(
        [{"params": dense, "weight_decay": config.weight_decay},
         {"params": scalars, "weight_decay": 0.0, "lr": config.lr * config.scalar_lr_mult}],
        lr=config.lr, betas=(0.9, 0.98))
    return [adamw, torch.optim.SparseAdam([embedding.weight], lr=config.lr, betas=(0.9, 0.98))]


def tokenize(processor: Any, texts: Sequence[str], max_length: int) -> torch.Tensor:
    return processor.tokenizer(list(texts), padding="max_length", truncation=True,
                               max_length=max_length, return_tensors="pt")["input_ids"]


def _texts_per_image(items: Sequence[LabelledImage], seed: int,
                     queries_path: Path | None) -> tuple[list[list[str]], str]:
    queries, source = train_queries(items, queries_path, seed)
    return [queries.get(item.image_id, []) for item in items], source



@dataclass
class MicroBatch:
    """One micro-batch of a stage-1 step: its images' cached features, their texts (text i
    written for image i), the images' classes and colours, each text's named colour."""

    features: torch.Tensor
    texts: list[str]
    classes: torch.Tensor
    colours: torch.Tensor
    text_colours: torch.Tensor


def _step_loss(kind: str, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor, micro: Sequence[MicroBatch], n_names: int) -> torch.Tensor:
    """The loss of the rows of `micro` against their texts followed by `n_names` class
    names (the class ids 0..n_names-1). A text that names a colour is a positive only
    for same-class images of that colour (the label satisfies all the text names)."""
    device = image.device
    row_classes = torch.cat([m.classes for m in micro])
    name_ids = torch.arange(n_names)
    return contrastive_loss(
        kind, image, text, scale, bias, row_classes.to(device),
        text_classes=torch.cat([row_classes, name_ids]).to(device),
        image_colours=torch.cat([m.colours for m in micro]).to(device),
        text_colours=torch.cat([*(m.text_colours for m in micro),
                                torch.full((n_names,), -1)]).to(device))


# token ids of columns whose first `n` are the batch's own texts (token dropout applies to
# those alone; class-name columns stay whole)
IdsOf = Callable[[list[str], int], torch.Tensor]


def _plain_step(acc: Accelerator, module: nn.Module, micro: Sequence[MicroBatch],
                ids_of: IdsOf, names: Sequence[str], kind: str) -> float:
    """Plain accumulation: each micro-batch scores its images against its own texts and
    the class names; the gradient is that of the mean of the micro-batches' losses (see
    docs/BENCHMARKS.md on what that does to each loss)."""
    total = 0.0
    for m in micro:
        ids = ids_of([*m.texts, *names], len(m.texts))
        image, text, scale, bias = module(m.features.to(acc.device), ids.to(acc.device))
        loss = _step_loss(kind, image, text, scale, bias, [m], len(names))
        acc.backward(loss / len(micro))
        total += float(loss.detach()) / len(micro)
    return total


def _cached_step(acc: Accelerator, module: nn.Module, micro: Sequence[MicroBatch],
                 ids_of: IdsOf, names: Sequence[str], kind: str) -> float:
    """Cached accumulation (training/grad_cache.py): the gradient of the loss of the whole
    effective batch, every image against every micro-batch's texts and the class names
    once, computed one micro-batch's graph at a time. The class names ride with the last
    micro-batch's texts. Token dropout draws from torch's generator inside `forward`,
    whose state the re-run restores: both passes drop the same tokens."""

    def forward(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        texts = [*micro[k].texts, *(names if k == len(micro) - 1 else [])]
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] = module(
            micro[k].features.to(acc.device), ids_of(texts, len(micro[k].texts)).to(acc.device))
        return out

    def loss_fn(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        return _step_loss(kind, image, text, scale, bias, micro, len(names))

    return cached_backward(forward, range(len(micro)), loss_fn, acc.backward)


def train_stage1(config: Stage1Config) -> Stage1Result:
    if config.steps < 1 or config.batch_size < 2 or config.grad_accum < 1:
        raise ConfigError("stage 1 needs at least one step and a batch of two")
    if config.train_subset not in ("train", "train+validation"):
        raise ConfigError(f"train_subset must be train or train+validation, "
                          f"not {config.train_subset!r}")
    if not (0.0 <= config.feature_dropout < 1.0 and 0.0 <= config.token_dropout < 1.0):
        raise ConfigError("dropout shares must be in [0, 1)")
    if not 0.0 <= config.flip_prob <= 1.0:
        raise ConfigError("flip_prob must be in [0, 1]")
    if config.loss not in LOSSES:
        raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, not {config.loss!r}")
    if config.projection not in PROJECTIONS:
        raise ConfigError(f"projection must be one of {', '.join(PROJECTIONS)}, not "
                          f"{config.projection!r}")
    if config.ridge_lambda <= 0 or config.ridge_fill < 0:
        raise ConfigError("ridge_lambda must be > 0 and ridge_fill >= 0")
    if config.accumulate not in ACCUMULATE:
        raise ConfigError(f"accumulate must be one of {', '.join(ACCUMULATE)}, not "
                          f"{config.accumulate!r}")
    set_seed(config.seed)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    net, processor = load_base(config.base)
    if not hasattr(net, "image_backbone_features"):
        raise ConfigError(f"{config.base} is not a compact pretrained base (no cached-feature "
                          "image tower); stage 1 needs one")
    net.eval()
    dataset = load_stanford(config.data)
    if config.val_share > 0:  # a benchmark's own carve (bench/bench_pretrained.py)
        train_items, val_items = split_train(dataset.split("train"), config.val_share)
    elif config.train_subset == "train+validation":  # a refit on every train image
        train_items, val_items = dataset.subset("train+validation"), []
    else:  # the data set's validation carve stays out of training: promotion reads it
        train_items, val_items = dataset.subset("train"), dataset.subset("validation")
    stats = CacheStats()
    views = tuple(config.views) or (0.0,)
    mirrors = (False, True) if config.flip_prob > 0 else (False,)
    # (views, mirrors, images, d): every view of every train image, computed once
    feats = torch.from_numpy(np.stack([np.stack([
        features_for(net, processor, dataset, train_items, config.cache_dir,
                     progress=config.progress, stats=stats, view=t, flip=m)
        for m in mirrors]) for t in views]))
    names = sorted({x.label.class_name for x in train_items})
    index = {n: i for i, n in enumerate(names)}
    classes = torch.tensor([index[x.label.class_name] for x in train_items])
    max_len = int(net.config.text_config.max_position_embeddings)
    queries, source = _texts_per_image(train_items, config.seed, config.queries)
    tokens = TokenTable(processor, [*names, *(q for qs in queries for q in qs)], max_len)
    colours = torch.tensor([colour_id(x.label.colour) for x in train_items])
    freeze_image_backbone(net)
    if config.projection == "ridge":  # every cached row (view, mirror) with its labels
        n_rows, fit_start = feats.shape[0] * feats.shape[1], time.perf_counter()
        fit_ridge_projection(
            net, feats.reshape(-1, feats.shape[-1]),
            label_targets(classes.repeat(n_rows), colours.repeat(n_rows)),
            config.ridge_lambda, config.ridge_fill)
        log.info("stage 1: image projection fitted by ridge regression on %d rows in %.1f s",
                 n_rows * len(train_items), time.perf_counter() - fit_start)
    module = Stage1Module(net, config.feature_dropout)
    optimizers = stage1_optimizers(net, config)
    from transformers import get_cosine_schedule_with_warmup

    warmup = round(config.warmup * config.steps)
    schedulers = [get_cosine_schedule_with_warmup(o, warmup, config.steps) for o in optimizers]
    module, *prepared = acc.prepare(module, *optimizers, *schedulers)
    optimizers, schedulers = prepared[:len(optimizers)], prepared[len(optimizers):]
    module.train()
    rng = random.Random(config.seed)
    order: list[int] = []
    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    shown = names if config.class_texts else []
    pad_id = int(processor.tokenizer.pad_token_id)

    def ids_of(columns: list[str], n_own: int) -> torch.Tensor:
        ids = tokens.ids(columns)
        if config.token_dropout > 0:
            ids = drop_tokens(ids, config.token_dropout, pad_id, n_own)
        return ids

    for _ in tqdm(range(config.steps), desc="stage 1", unit="step",
                  disable=not config.progress):
        micro = []
        for _ in range(config.grad_accum):
            if len(order) < config.batch_size:
                fresh = list(range(len(train_items)))
                rng.shuffle(fresh)
                order += fresh
            batch, order = order[:config.batch_size], order[config.batch_size:]
            texts = [
                queries[i][rng.randrange(len(queries[i]))]
                if queries[i] and rng.random() >= config.caption_prob
                else train_items[i].label.class_name
                for i in batch
            ]
            picked = draw_views(rng, views, config.frame_prob, len(batch))
            mirrored = ([int(rng.random() < config.flip_prob) for _ in batch]
                        if config.flip_prob > 0 else [0] * len(batch))
            micro.append(MicroBatch(
                features=feats[torch.tensor(picked), torch.tensor(mirrored),
                               torch.tensor(batch)], texts=texts,
                classes=classes[batch], colours=colours[batch],
                text_colours=torch.tensor([colour_id(named_colour(t)) for t in texts])))
        if config.accumulate == "cached":
            loss_value = _cached_step(acc, module, micro, ids_of, shown, config.loss)
        else:
            loss_value = _plain_step(acc, module, micro, ids_of, shown, config.loss)
        for opt, sched in zip(optimizers, schedulers, strict=True):
            opt.step()
            sched.step()
            opt.zero_grad()
        losses.append(loss_value)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # every thread's: what the steps cost
    out = config.out / "model"
    unwrapped: Any = acc.unwrap_model(module).net
    unwrapped.text_model.token_embedding.sparse = False
    unwrapped.eval()
    out.mkdir(parents=True, exist_ok=True)
    with quiet_config_check():
        unwrapped.save_pretrained(out)
    processor.save_pretrained(out)
    result = Stage1Result(
        model_dir=out, steps=config.steps, seconds=seconds,
        step_ms=1000 * seconds / config.steps, losses=losses,
        cache={"hits": stats.hits, "computed": stats.computed,
               "seconds": round(stats.seconds, 1)},
        n_train=len(train_items), n_val=len(val_items),
        fingerprint=data_fingerprint([x.image_id for x in train_items], source),
        cpu_seconds=round(cpu_seconds, 1),
        n_classes=len(names),
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
    )
    (config.out / "stage1.json").write_text(json.dumps(
        {**{k: v for k, v in asdict(result).items() if k != "losses"},
         "model_dir": str(out), "first_loss": losses[0], "final_loss": losses[-1]},
        indent=2) + "\n")
    log.info("stage 1: %d steps in %.1f s (%.1f ms/step), loss %.4f -> %.4f",
             config.steps, seconds, result.step_ms, losses[0], losses[-1])
    return result


def text_embeddings(net: Any, processor: Any, texts: Sequence[str]) -> np.ndarray:
    max_len = int(net.config.text_config.max_position_embeddings)
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 256):
            ids = tokenize(processor, texts[i:i + 256], max_len)
            out.append(F.normalize(net.get_text_features(input_ids=ids), dim=-1).numpy())
    return np.concatenate(out)


def image_embeddings_from_features(net: Any, features: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        x = net.project_image(torch.from_numpy(features))
        return F.normalize(x, dim=-1).numpy()


def evaluate_cached(net: Any, processor: Any, features: np.ndarray,
                    item_classes: Sequence[str], queries: Sequence[tuple[str, str]]
                    ) -> dict[str, np.ndarray]:
    """Per-query metrics of (text, class name) queries against cached image features."""
    names = sorted(set(item_classes))
    index = {n: i for i, n in enumerate(names)}
    images = image_embeddings_from_features(net, features)
    texts = text_embeddings(net, processor, [q for q, _ in queries])
    return per_query(texts @ images.T, [index[c] for _, c in queries],
                     [index[c] for c in item_classes])
