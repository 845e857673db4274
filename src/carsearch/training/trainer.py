"""The Accelerate training loop: LoRA (or full) fine-tuning of both SigLIP towers.

    result = train(TrainConfig(data=Path("data/catalogue"), out=Path("runs/r1"), base=...))

- Model: `build_model` loads any SigLIP base (directory or hub id). LoRA (peft) wraps
  the `q_proj` and `v_proj` matrices of every attention layer of BOTH towers; the raw
  scalars `logit_scale` and `logit_bias`, which peft freezes, are unfrozen explicitly.
  `full=True` trains every weight instead. `full=None` (the default) picks full
  training for a base with no pre-training (the compact base's build_info.json says
  `"pretrained": false`): LoRA on random weights has no features to adapt.
- Loop: `Accelerator(gradient_accumulation_steps, mixed_precision)` with `split_batches`
  (the batch size is the global batch, divided among the processes), `prepare` once,
  AdamW, cosine schedule with linear warmup, gradient clipping, `set_seed`. In several
  processes the embeddings are all-gathered with their gradients, so each process
  computes the loss of the whole global batch: the same loss, and after DDP's gradient
  averaging the same update, as one process with that batch.
- Batch composition: each step scores the batch's images against the batch's texts
  (class-name captions and augmented queries) AND against every class name of the train
  set (`class_texts`), all in one sigmoid loss with class-level labels: every image sees
  its class name as a positive and every other class name as a negative in every step,
  which is what the class-name queries of the evaluation ask for.
- Feedback (`feedback_db`, the CLI's `--feedback`): the search page's votes
  (`feedback.load_feedback`: one net vote per (query, image), newest first, capped) are
  scored in every micro-batch, k of them (`feedback_per_batch`, default batch/8, at
  least 1) in a cycle over all: each pair's image and query text go through the towers
  with the batch, and `loss.feedback_loss` adds -(w / n) log sigmoid(l z) for the pair's
  logit z and vote l (+1: extra positive, -1: hard negative), w `feedback_weight`. Like
  the class names, the pairs are computed identically in every process. They are read
  when a run starts (a resume reads them again: votes cast in between change the run).
- Precision: bf16 autocast where the accelerator supports it (CUDA with bf16), fp32
  otherwise; on CPU bf16 autocast is usually slower than fp32 and is only used when
  asked for (`mixed_precision="bf16"`).
- Checkpoints: `accelerator.save_state` every `checkpoint_every` steps and when a run
  stops early (`stop_after`); `resume=True` loads the latest one, counters included, and
  skips the batches already trained on, so the run continues exactly where it stopped.
- Trusted checkpoints: Accelerate's optimizer, scheduler and RNG files are pickles
  (loaded with torch's `weights_only` unpickler, which still parses whatever is there),
  so whoever can write the run directory could change the run or worse. The weights are
  safetensors (`safe_serialization=True`) and the counters JSON (`counters.json`, not a
  registered pickle); when a checkpoint is written, the main process records the sha256
  of every file in it in the platform's database (`ledger_db`, the `artifact_hashes`
  table, keyed by the checkpoint's resolved path), which the run directory's writer
  cannot reach. `resume=True` first verifies the checkpoint against that record and
  refuses, naming the file, a file that differs, is missing, or was never recorded; a
  run without `ledger_db` cannot be resumed.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from tqdm import tqdm

from carsearch.data.stanford import load_stanford
from carsearch.platform.artifacts import CHECKPOINT, ArtifactLedger
from carsearch.platform.db import Database
from carsearch.platform.errors import ArtifactTamperedError, ConfigError, ModelNotFoundError
from carsearch.platform.models.encoder import pooled_features, quiet_config_check
from carsearch.platform.models.image_policy import ImagePolicy, write_policy
from carsearch.training.feedback import (
    DEFAULT_MAX_PAIRS,
    DEFAULT_MAX_SHARE,
    DEFAULT_WEIGHT,
    FeedbackSet,
    load_feedback,
)
from carsearch.training.loss import LOSSES, contrastive_loss, feedback_loss
from carsearch.training.recipe import STAGE1_PROJECTION
from carsearch.training.train_data import (
    Collate,
    SampleStream,
    TrainSet,
    data_fingerprint,
    feedback_samples,
)

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "v_proj")
SCALARS = ("logit_scale", "logit_bias")
CHECKPOINTS = "checkpoints"
COUNTERS_FILE = "counters.json"
MODEL_SUBDIR = "model"
MIXED_PRECISION = ("auto", "no", "bf16")
# Full training from random weights: at 1e-3 the vision tower collapses to one embedding
# within 25 steps; 3e-4 learns (rendered catalogue, batch 32, 150 steps: mAP 0.12 vs 0.04).
FULL_LR = 3e-4
LORA_LR = 2e-4
# Default epochs: LoRA adapts features a pre-trained base already has; full training from
# random weights needs many passes (catalogue, 1,000 train images: 300 steps of 64, i.e.
# 19 epochs, reach mAP 0.23 in about 2 minutes on two cores).
LORA_EPOCHS = 1.0
FULL_EPOCHS = 40.0


@dataclass
class TrainConfig:
    """Everything that decides a run (written to train_config.json and the registry)."""

    data: Path
    out: Path
    base: str
    queries: Path | None = None
    steps: int = 0  # optimizer steps; 0: from epochs
    epochs: float = 0.0  # 0: LORA_EPOCHS for LoRA, FULL_EPOCHS for full training
    batch_size: int = 64
    grad_accum: int = 1
    loss: str = "sigmoid"  # "sigmoid" (SigLIP) or "softmax" (CLIP's InfoNCE): training/loss.py
    lr: float = 0.0  # 0: FULL_LR for full training, LORA_LR for LoRA
    warmup: int = -1  # warmup steps; -1: 5 % of the steps
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    lora_rank: int = 16
    lora_alpha: int = 0  # 0: twice the rank
    full: bool | None = None  # None: full when the base has no pre-training
    seed: int = 0
    mixed_precision: str = "auto"
    checkpoint_every: int = 0  # 0: only when stopping early
    stop_after: int = 0  # stop (with a checkpoint) after this many steps; 0: run to the end
    resume: bool = False
    limit: int = 0  # use only the first N train images; 0: all
    caption_prob: float = 0.75
    class_texts: bool = True  # every step, also every class name as a text column
    scalar_lr_mult: float = 10.0  # the two scalars' lr as a multiple of the peak lr
    min_crop_area: float = 0.95  # random resized crops keep at least this share of the area
    # the image policy the version is trained with and records (image_policy.json):
    # "box" trains on box crops (what a photo with a box is served); "box-to-frame" on
    # views from the box out to the whole frame (measured at chance on the compact demo
    # base after the demo's 330 steps: docs/BENCHMARKS.md, "What is served, measured")
    train_views: str = "box"
    frame_prob: float = 0.25  # share of samples shown the whole frame
    box_margin: float = 0.0  # served crops widen the box by this share on each side
    feedback_db: str = ""  # database URL whose query_feedback votes train too; "": none
    feedback_weight: float = DEFAULT_WEIGHT  # w of each feedback pair in the loss
    feedback_max: int = DEFAULT_MAX_PAIRS  # at most this many feedback pairs (newest first)
    feedback_share: float = DEFAULT_MAX_SHARE  # ...and at most this share of the train images
    feedback_per_batch: int = 0  # feedback pairs scored per micro-batch; 0: batch/8, >= 1
    # database URL that records the sha256 of every checkpoint file (resume checks them);
    # "": none, and then the run cannot be resumed
    ledger_db: str = ""
    progress: bool = True
    # Stage 1 (training/stage1.py) before this loop, for a base with a cached-feature
    # image tower (the compact pretrained base): this many steps with the image tower
    # frozen; then this loop (LoRA) continues from its result. 0: none.
    stage1_steps: int = 0
    stage1_batch_size: int = 128
    stage1_grad_accum: int = 1  # micro-batches of stage1_batch_size per stage-1 step
    # how stage 1 accumulates them: "plain" (the mean of the micro-batches' losses) or
    # "cached" (the whole effective batch's loss exactly: training/grad_cache.py)
    accumulate: str = "plain"
    stage1_lr: float = 0.0  # 0: Stage1Config's default (training/recipe.py)
    stage1_feature_dropout: float = -1.0  # < 0: Stage1Config's default (the recipe's)
    stage1_projection: str = STAGE1_PROJECTION  # "ridge" or "learned" (training/stage1.py)
    # False: stage 1's model is the run's result (the image tower as pre-trained, no LoRA
    # stage; the feedback votes are not used)
    stage2: bool = True
    feature_cache: Path | None = None  # stage 1's feature cache; None: out/feature-cache

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("data", "out", "queries", "feature_cache"):
            d[key] = str(d[key]) if d[key] is not None else None
        for key in ("feedback_db", "ledger_db"):  # recorded in the registry: no password
            if d[key]:
                from sqlalchemy.engine import make_url

                d[key] = make_url(d[key]).render_as_string(hide_password=True)
        return d


@dataclass
class Counters:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # batches consumed
    samples: int = 0  # samples consumed (global)
    loss_sum: float = 0.0
    losses: list[float] = field(default_factory=list)  # mean loss of every optimizer step

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class TrainResult:
    """What a run did. `model_dir` is the merged, saveable model (None when stopped early)."""

    out: Path
    model_dir: Path | None
    counters: Counters
    total_steps: int
    full: bool
    fingerprint: str
    n_train_images: int
    n_classes: int
    seconds: float
    samples_per_s: float
    peak_rss_mb: float
    num_processes: int
    mixed_precision: str
    trainable_parameters: int
    parameters: int
    is_main_process: bool
    config: dict[str, Any]
    feedback: dict[str, Any] = field(default_factory=dict)  # load_feedback's stats

    @property
    def finished(self) -> bool:
        return self.counters.step >= self.total_steps

    def summary(self) -> dict[str, Any]:
        losses = self.counters.losses
        return {
            "steps": self.counters.step,
            "total_steps": self.total_steps,
            "samples": self.counters.samples,
            "full": self.full,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "seconds": round(self.seconds, 2),
            "samples_per_s": round(self.samples_per_s, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "num_processes": self.num_processes,
            "mixed_precision": self.mixed_precision,
            "trainable_parameters": self.trainable_parameters,
            "parameters": self.parameters,
            "n_train_images": self.n_train_images,
            "n_classes": self.n_classes,
            "data_fingerprint": self.fingerprint,
            "feedback": self.feedback,
        }


# -- the model --------------------------------------------------------------------------


class DualEncoder(nn.Module):
    """The module Accelerate prepares: both towers, unit embeddings and the two scalars."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def siglip(self) -> Any:
        """The underlying SiglipModel (inside the peft wrapper where there is one)."""
        get_base = getattr(self.net, "get_base_model", None)
        return get_base() if callable(get_base) else self.net

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        net: Any = self.net
        image = pooled_features(net.get_image_features(pixel_values=pixel_values))
        text = pooled_features(net.get_text_features(input_ids=input_ids))
        siglip = self.siglip
        return (
            F.normalize(image.float(), dim=-1),
            F.normalize(text.float(), dim=-1),
            siglip.logit_scale.reshape(()),
            siglip.logit_bias.reshape(()),
        )


def base_is_pretrained(base: str) -> bool:
    """False for a base whose build_info.json says it was never pre-trained."""
    info = Path(base).expanduser() / "build_info.json"
    if not info.is_file():
        return True
    try:
        return bool(json.loads(info.read_text()).get("pretrained", True))
    except (OSError, ValueError):
        return True


def load_base(base: str) -> tuple[Any, Any]:
    """The SigLIP model and processor of a base (directory, or hub id in the local cache)."""
    from transformers import AutoModel, AutoProcessor

    import carsearch.platform.models.compact  # noqa: F401  (registers the compact type)

    path = Path(base).expanduser()
    source = str(path) if path.is_dir() else base
    kwargs: dict[str, Any] = {} if path.is_dir() else {"local_files_only": True}
    try:
        with quiet_config_check():
            processor = AutoProcessor.from_pretrained(source, **kwargs)
            net = AutoModel.from_pretrained(source, **kwargs)
    # ImportError: google's SigLIP checkpoints ship a SiglipTokenizer, which needs the
    # sentencepiece package; without it transformers raises ImportError.
    except (OSError, ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"cannot load base model {base!r}: {first}") from None
    if not hasattr(net, "get_text_features") or not hasattr(net, "get_image_features"):
        raise ModelNotFoundError(f"{base!r} is not a dual encoder")
    return net, processor


def apply_lora(net: nn.Module, rank: int, alpha: int = 0) -> Any:
    """Wrap both towers with LoRA; unfreeze the two scalars.

    SigLIP: q_proj and v_proj of every attention layer. A model that names its own
    targets (`lora_target_modules`, the compact pretrained base: its text tower's linears
    and its image tower's 1x1 convolutions) gets those.
    """
    from peft import LoraConfig, get_peft_model

    targets: Any = getattr(net, "lora_target_modules", None) or list(LORA_TARGETS)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
    )
    model = get_peft_model(net, config)  # type: ignore[arg-type]
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in SCALARS:
            param.requires_grad_(True)
    return model


def lora_wrapped_modules(model: nn.Module) -> list[str]:
    """Names of the modules carrying a LoRA adapter."""
    return sorted(name for name, mod in model.named_modules() if hasattr(mod, "lora_A"))


def build_model(config: TrainConfig) -> tuple[DualEncoder, Any, bool]:
    """The trainable module, the processor, and whether every weight trains."""
    net, processor = load_base(config.base)
    full = config.full if config.full is not None else not base_is_pretrained(config.base)
    if full:
        net.requires_grad_(True)
    else:
        net = apply_lora(net, config.lora_rank, config.lora_alpha)
    return DualEncoder(net), processor, full


def image_size_of(processor: Any) -> int:
    size: Any = getattr(processor.image_processor, "size", None)
    side = None
    for key in ("height", "shortest_edge"):
        side = side or (size.get(key) if hasattr(size, "get") else getattr(size, key, None))
    if not side:
        raise ModelNotFoundError("the base's image processor declares no image size")
    return int(side)


def text_length_of(net: Any, processor: Any) -> int:
    limits = [
        getattr(getattr(net.config, "text_config", None), "max_position_embeddings", None),
        getattr(processor.tokenizer, "model_max_length", None),
    ]
    usable = [n for n in limits if isinstance(n, int) and 0 < n < 100_000]
    if not usable:
        raise ModelNotFoundError("the base declares no maximum text length")
    return min(usable)


# -- optimisation -----------------------------------------------------------------------


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, *, scalar_lr_mult: float = 1.0
) -> torch.optim.AdamW:
    """AdamW; no weight decay on 1-d tensors (biases, norms, the scalars).

    The two scalars (temperature and bias) get `scalar_lr_mult` times the lr: Adam moves
    a parameter by about lr per step, too little for them in a few hundred steps.
    """
    decay, no_decay, scalars = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] in SCALARS:
            scalars.append(param)
        else:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": scalars, "weight_decay": 0.0, "lr": lr * scalar_lr_mult},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98))


def resolve_precision(choice: str) -> str:
    if choice not in MIXED_PRECISION:
        raise ConfigError(f"mixed precision must be one of {', '.join(MIXED_PRECISION)}")
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def total_steps(config: TrainConfig, n_images: int, full: bool = False) -> int:
    """Optimizer steps: `steps`, else `epochs` (0: the default for full or LoRA) of data."""
    if config.steps > 0:
        return config.steps
    if config.epochs < 0:
        raise ConfigError("give --steps or a non-negative --epochs")
    epochs = config.epochs or (FULL_EPOCHS if full else LORA_EPOCHS)
    per_step = config.batch_size * config.grad_accum
    return max(1, math.ceil(epochs * n_images / per_step))


def _gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def use_cpu() -> bool:
    """Train on CPU where there is no GPU; several CPU processes then use gloo.

    Accelerate treats a torchrun-style launch (`accelerate launch --multi_gpu
    --num_processes 2`) as multi-CPU only when told to use the CPU.
    """
    return not torch.cuda.is_available()


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def checkpoint_key(path: Path) -> str:
    """The checkpoint's key in the artifact ledger: its resolved path."""
    return str(Path(path).resolve())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _check(config: TrainConfig, num_processes: int) -> None:
    if config.batch_size < 1 or config.grad_accum < 1:
        raise ConfigError("batch size and gradient accumulation must be at least 1")
    if config.loss not in LOSSES:
        raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, not {config.loss!r}")
    if config.feedback_weight < 0 or config.feedback_max < 0 or config.feedback_share < 0:
        raise ConfigError("the feedback weight and caps must not be negative")
    if config.feedback_per_batch < 0:
        raise ConfigError("feedback pairs per batch must not be negative")
    if config.batch_size % num_processes:
        raise ConfigError(
            f"batch size {config.batch_size} is not divisible by {num_processes} processes"
        )


# -- the loop ---------------------------------------------------------------------------


class _Run:
    """One training run: the prepared objects and the loop over them."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.precision = resolve_precision(config.mixed_precision)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.grad_accum,
            mixed_precision=self.precision,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            project_dir=str(config.out),
            cpu=use_cpu(),
        )
        _check(config, self.accelerator.num_processes)
        set_seed(config.seed)
        self.model, self.processor, self.full = build_model(config)
        self.policy = ImagePolicy(
            framing="box", margin=config.box_margin,
            train_views=config.train_views,  # type: ignore[arg-type]
            frame_prob=config.frame_prob,
        )
        dataset = load_stanford(config.data)
        self.data = TrainSet.from_dataset(
            dataset,
            policy=self.policy,
            image_size=image_size_of(self.processor),
            queries_path=config.queries,
            seed=config.seed,
            limit=config.limit,
            progress=config.progress and self.accelerator.is_local_main_process,
        )
        self.data.caption_prob = config.caption_prob
        self.feedback_per_batch = 0
        self.feedback = self._load_feedback(dataset)
        self.total_steps = total_steps(config, len(self.data), self.full)
        self.counters = Counters()
        self.ledger: ArtifactLedger | None = (
            ArtifactLedger(Database(config.ledger_db)) if config.ledger_db else None)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.db.dispose()

    def _load_feedback(self, dataset: Any) -> FeedbackSet:
        config = self.config
        if not config.feedback_db or config.feedback_weight == 0:
            return FeedbackSet([], {})
        db = Database(config.feedback_db)
        try:
            found = load_feedback(
                db, dataset, self.data.image_ids, self.data.served_image,
                side=math.ceil(1.5 * image_size_of(self.processor)), policy=self.policy,
                max_pairs=config.feedback_max, max_share=config.feedback_share,
            )
        finally:
            db.dispose()
        per_batch = config.feedback_per_batch or max(1, config.batch_size // 8)
        self.feedback_per_batch = min(per_batch, len(found))
        found.stats.update(weight=config.feedback_weight, per_batch=self.feedback_per_batch)
        if found.pairs:  # the votes are training data: they change the fingerprint
            self.data.fingerprint = data_fingerprint(
                self.data.image_ids,
                f"{self.data.meta['queries_source']};feedback:{found.digest()}",
            )
        return found

    def _feedback_batch(self) -> dict[str, torch.Tensor] | None:
        if not self.feedback.pairs:
            return None
        samples = feedback_samples(
            self.feedback.pairs, self.counters.micro_step, self.feedback_per_batch,
            self.config.seed, min_crop_area=self.config.min_crop_area,
        )
        device = self.accelerator.device
        return {k: v.to(device) for k, v in self.collate.feedback(samples).items()}

    def prepare(self) -> None:
        config, acc = self.config, self.accelerator
        stream = SampleStream(
            self.data, self.total_steps * config.grad_accum * config.batch_size, config.seed,
            min_crop_area=config.min_crop_area,
        )
        max_length = text_length_of(self.model.siglip, self.processor)
        self.collate = Collate(self.processor, max_length)
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=config.batch_size,
            shuffle=False,
            drop_last=True,
            collate_fn=self.collate,
        )
        lr = config.lr or (FULL_LR if self.full else LORA_LR)
        optimizer = make_optimizer(
            self.model, lr, config.weight_decay, scalar_lr_mult=config.scalar_lr_mult
        )
        self.class_tokens: torch.Tensor | None = None
        if config.class_texts:
            self.class_tokens = self.processor.tokenizer(
                self.data.class_names, padding="max_length", truncation=True,
                max_length=max_length, return_tensors="pt",
            )["input_ids"].to(acc.device)
        from transformers import get_cosine_schedule_with_warmup

        warmup = config.warmup if config.warmup >= 0 else round(0.05 * self.total_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, self.total_steps)
        self.model, self.optimizer, self.loader, self.scheduler = acc.prepare(
            self.model, optimizer, loader, scheduler
        )
        self.lr, self.warmup = lr, warmup

    def resume(self) -> Any:
        ckpt = latest_checkpoint(self.config.out)
        if ckpt is None:
            raise ConfigError(f"nothing to resume: no checkpoint under {self.config.out}")
        if self.ledger is None:
            raise ConfigError(f"cannot resume from {ckpt}: nothing to check its files against "
                              "(the run needs ledger_db, the database that recorded them)")
        # Before Accelerate unpickles anything: every file as recorded when it was written.
        self.ledger.verify(CHECKPOINT, checkpoint_key(ckpt), ckpt)
        self.accelerator.load_state(str(ckpt))
        self.counters.load_state_dict(_read_counters(ckpt / COUNTERS_FILE))
        log.info("resumed from %s at step %d (its files verified)", ckpt, self.counters.step)
        return self.accelerator.skip_first_batches(self.loader, self.counters.micro_step)

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        path = self.config.out / CHECKPOINTS / f"step-{self.counters.step:07d}"
        acc.save_state(str(path), safe_serialization=True)
        if acc.is_main_process:
            (path / COUNTERS_FILE).write_text(json.dumps(self.counters.state_dict()) + "\n")
        acc.wait_for_everyone()  # every process's files are written
        if acc.is_main_process:
            if self.ledger is not None:
                self.ledger.record(CHECKPOINT, checkpoint_key(path), path)
            else:
                log.warning("checkpoint %s: its hashes are not recorded (no ledger_db), so "
                            "it cannot be resumed", path)
            for old in (self.config.out / CHECKPOINTS).glob("step-*"):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
                    if self.ledger is not None:
                        self.ledger.forget(CHECKPOINT, checkpoint_key(old))
        acc.wait_for_everyone()
        return path

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        acc = self.accelerator
        with acc.accumulate(self.model):
            input_ids, pixel_values = batch["input_ids"], batch["pixel_values"]
            n = input_ids.shape[0]
            n_class = 0 if self.class_tokens is None else len(self.class_tokens)
            if self.class_tokens is not None:
                input_ids = torch.cat([input_ids, self.class_tokens])
            fb = self._feedback_batch()
            if fb is not None:
                input_ids = torch.cat([input_ids, fb["input_ids"]])
                pixel_values = torch.cat([pixel_values, fb["pixel_values"]])
            image, text, scale, bias = self.model(pixel_values, input_ids)
            image, fb_image = image[:n], image[n:]
            text, class_text, fb_text = text[:n], text[n:n + n_class], text[n + n_class:]
            classes = batch["classes"]
            colours, text_colours = batch.get("colours"), batch.get("text_colours")
            if acc.num_processes > 1:
                image, text = _gather_with_grad(image), _gather_with_grad(text)
                classes = acc.gather(classes)
                if colours is not None and text_colours is not None:
                    colours, text_colours = acc.gather(colours), acc.gather(text_colours)
            if self.class_tokens is None:
                loss = contrastive_loss(self.config.loss, image, text, scale, bias, classes,
                                        image_colours=colours, text_colours=text_colours)
            else:
                # The class-name columns are computed (identically) in every process, so
                # every process still computes the loss of the whole global batch. A
                # class name names no colour.
                class_ids = torch.arange(len(class_text), device=classes.device)
                column_colours = None if text_colours is None else torch.cat(
                    [text_colours, torch.full_like(class_ids, -1)])
                loss = contrastive_loss(
                    self.config.loss, image, torch.cat([text, class_text]), scale, bias,
                    classes,
                    text_classes=torch.cat([classes, class_ids]),
                    image_colours=colours, text_colours=column_colours,
                )
            if fb is not None:
                # Computed identically in every process, like the class-name columns.
                loss = loss + feedback_loss(
                    fb_image, fb_text, scale, bias, fb["labels"],
                    self.config.feedback_weight, image.shape[0],
                )
            acc.backward(loss)
            if acc.sync_gradients and self.config.max_grad_norm > 0:
                acc.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return float(loss.detach())

    def loop(self, batches: Any) -> float:
        config, acc, c = self.config, self.accelerator, self.counters
        stop = min(self.total_steps, config.stop_after or self.total_steps)
        bar = tqdm(
            total=self.total_steps, initial=c.step, desc="training", unit="step",
            disable=not (config.progress and acc.is_local_main_process),
        )
        self.model.train()
        start, samples0 = time.perf_counter(), c.samples
        for batch in batches:
            if c.step >= stop:
                break
            c.loss_sum += self.step(batch)
            c.micro_step += 1
            c.samples += config.batch_size
            if not acc.sync_gradients:
                continue
            c.step += 1
            c.losses.append(c.loss_sum / config.grad_accum)
            c.loss_sum = 0.0
            rate = (c.samples - samples0) / max(time.perf_counter() - start, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{c.losses[-1]:.4f}", samples_s=f"{rate:.1f}", refresh=False)
            if config.checkpoint_every and c.step % config.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if c.step < self.total_steps:
            self.save_checkpoint()
        return time.perf_counter() - start

    def save_model(self) -> Path:
        """Merge LoRA into the base (where used) and save model + processor."""
        acc = self.accelerator
        out = self.config.out / MODEL_SUBDIR
        module: DualEncoder = acc.unwrap_model(self.model)
        net: Any = module.net
        if not self.full:
            net = net.merge_and_unload()
        if out.exists():
            shutil.rmtree(out)
        with quiet_config_check():
            net.save_pretrained(out, safe_serialization=True)
        self.processor.save_pretrained(out)
        write_policy(out, self.policy, self.processor)  # served as it was trained
        return out


def _read_counters(path: Path) -> dict[str, Any]:
    """A checkpoint's counters (JSON, verified against the ledger before this is read)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        fields = {f: type(getattr(Counters(), f)) for f in Counters().state_dict()}
        if set(state) != set(fields) or not all(
                isinstance(state[f], t) or (t is float and isinstance(state[f], int))
                for f, t in fields.items()):
            raise ValueError("unexpected fields or types")
    except (OSError, ValueError) as exc:
        raise ArtifactTamperedError(f"{path}: unreadable counters ({exc})") from exc
    return state


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; the main process saves the merged model."""
    config.out.mkdir(parents=True, exist_ok=True)
    if not config.stage2 and config.stage1_steps < 1:
        raise ConfigError("a run without stage 2 needs stage 1 (--stage1-steps N)")
    if config.stage1_steps > 0:
        config = _run_stage1(config)
        if not config.stage2:
            return _stage1_result(config)
    run = _Run(config)
    try:
        return _train(run, config)
    finally:
        run.close()


# stage 1's cached framings under box-to-frame: the box, half way, the whole frame
STAGE1_VIEWS = (0.0, 0.5, 1.0)


def _run_stage1(config: TrainConfig) -> TrainConfig:
    """Stage 1 into out/stage1 (skipped when a resumed run finds it done); the returned
    config trains on from its model, with LoRA unless `full` says otherwise."""
    from dataclasses import replace

    from carsearch.training.stage1 import Stage1Config, train_stage1

    stage1_out = config.out / "stage1"
    model_dir = stage1_out / "model"
    if not (config.resume and (model_dir / "config.json").is_file()):
        train_stage1(Stage1Config(
            data=config.data, base=config.base, out=stage1_out,
            cache_dir=config.feature_cache or config.out / "feature-cache",
            queries=config.queries, steps=config.stage1_steps,
            batch_size=config.stage1_batch_size, seed=config.seed, progress=config.progress,
            loss=config.loss, grad_accum=config.stage1_grad_accum,
            accumulate=config.accumulate, class_texts=config.class_texts,
            **({"lr": config.stage1_lr} if config.stage1_lr > 0 else {}),
            **({"feature_dropout": config.stage1_feature_dropout}
               if config.stage1_feature_dropout >= 0 else {}),
            views=STAGE1_VIEWS if config.train_views == "box-to-frame" else (0.0,),
            frame_prob=config.frame_prob, projection=config.stage1_projection,
        ))
    return replace(config, base=str(model_dir), full=config.full or False)


def _stage1_result(config: TrainConfig) -> TrainResult:
    """Stage 1's model (``config.base`` after `_run_stage1`) as the run's model, saved
    to out/model with the image policy it was trained under."""
    from carsearch.training.train_data import data_fingerprint, train_queries

    stage1_dir = Path(config.base)
    record = json.loads((stage1_dir.parent / "stage1.json").read_text(encoding="utf-8"))
    out = config.out / MODEL_SUBDIR
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(stage1_dir, out)
    net, processor = load_base(str(out))
    policy = ImagePolicy(framing="box", margin=config.box_margin,
                         train_views=config.train_views,  # type: ignore[arg-type]
                         frame_prob=config.frame_prob)
    write_policy(out, policy, processor)
    dataset = load_stanford(config.data)
    items = dataset.subset("train")
    _, source = train_queries(items, config.queries, config.seed)
    steps = int(record["steps"])
    losses = [float(record["first_loss"]), float(record["final_loss"])]
    samples = steps * config.stage1_batch_size * config.stage1_grad_accum
    seconds = float(record["seconds"])
    total = sum(p.numel() for p in net.parameters())
    frozen = sum(p.numel() for n, p in net.named_parameters() if ".backbone." in n)
    log.info("stage 1 only: %s is the run's model", out)
    return TrainResult(
        out=config.out, model_dir=out,
        counters=Counters(step=steps, micro_step=steps * config.stage1_grad_accum,
                          samples=samples, losses=losses),
        total_steps=steps, full=False,
        fingerprint=data_fingerprint([x.image_id for x in items], source),
        n_train_images=len(items), n_classes=len({x.label.class_name for x in items}),
        seconds=seconds, samples_per_s=samples / seconds if seconds > 0 else 0.0,
        peak_rss_mb=peak_rss_mb(), num_processes=1, mixed_precision="no",
        trainable_parameters=total - frozen, parameters=total, is_main_process=True,
        config={**config.to_dict(), "stage2": False},
    )


def _train(run: _Run, config: TrainConfig) -> TrainResult:
    trainable, total = _parameter_counts(run.model)
    run.prepare()
    acc = run.accelerator
    batches = run.resume() if config.resume else run.loader
    if acc.is_main_process:
        (config.out / "train_config.json").write_text(
            json.dumps({**config.to_dict(), "lr": run.lr, "warmup": run.warmup,
                        "full": run.full, "total_steps": run.total_steps}, indent=2) + "\n"
        )
    samples0 = run.counters.samples
    seconds = run.loop(batches)
    acc.wait_for_everyone()
    model_dir = None
    if run.counters.step >= run.total_steps and acc.is_main_process:
        model_dir = run.save_model()
    acc.wait_for_everyone()
    done = run.counters.samples - samples0
    result = TrainResult(
        out=config.out,
        model_dir=model_dir,
        counters=run.counters,
        total_steps=run.total_steps,
        full=run.full,
        fingerprint=run.data.fingerprint,
        n_train_images=len(run.data),
        n_classes=len(run.data.class_names),
        seconds=seconds,
        samples_per_s=done / seconds if seconds > 0 else 0.0,
        peak_rss_mb=peak_rss_mb(),
        num_processes=acc.num_processes,
        mixed_precision=run.precision,
        trainable_parameters=trainable,
        parameters=total,
        is_main_process=acc.is_main_process,
        config={**config.to_dict(), "lr": run.lr, "warmup": run.warmup, "full": run.full},
        feedback=run.feedback.stats,
    )
    log.info("training: %s", result.summary())
    return result
