"""Training data: train-split images (augmented) paired with their queries and captions.

Only the train split of a data set reaches training: `TrainSet.from_dataset` takes
`dataset.subset("train")` (the train split less the validation images carved from it)
and keeps only the queries of those images, whatever the query file holds.

Images are held whole, with their boxes, and each sample is framed by the image policy
of the version being trained (`platform.models.image_policy`): a view between the box
and the whole frame, so the model learns every framing it is served.

The sample stream is a pure function of (seed, position): position p of the stream is
image `perm_e[p mod n]` of epoch e = p div n, where perm_e is a permutation seeded by
(seed, e), and the crop, flip, colour jitter and text of that sample come from a random
generator seeded by (seed, p). A plain sequential sampler over the stream therefore
gives the same batches in one process or in several (Accelerate splits each batch
across them) and after a resume (which skips the batches already seen).

Feedback pairs (`feedback.load_feedback`) ride along in the same way: micro-batch m takes
positions m*k .. m*k+k-1 of an endless cycle over the pairs (each cycle in an order
seeded by (seed, cycle)), augmented like the stream's images (`feedback_samples`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from tqdm import tqdm

from carsearch.data.augment import OfflineGenerator, RuleJudge, load_queries
from carsearch.data.stanford import LabelledImage, StanfordDataset
from carsearch.platform.errors import ConfigError
from carsearch.platform.images import sha256_file
from carsearch.platform.models.image_policy import DEFAULT_POLICY, ImagePolicy
from carsearch.platform.vehicles import VehicleLabel
from carsearch.training.feedback import FeedbackPair

log = logging.getLogger(__name__)

QUERIES_PER_IMAGE = 5


def named_colour(text: str) -> str | None:
    """The colour a query names (None: it names none, or several different ones), with
    the judge's colour words ("charcoal" is grey) outside the class name."""
    from carsearch.data.augment.rules import colour_terms, has_term, normalise

    low = normalise(text)
    found = {colour for term, colour in colour_terms().items() if has_term(low, term)}
    return next(iter(found)) if len(found) == 1 else None


def caption(label: VehicleLabel) -> str:
    """The class-name caption of a label (the same text the evaluation queries with)."""
    return label.class_name


def data_fingerprint(image_ids: Sequence[str], queries_source: str) -> str:
    """sha256 over the sorted train image ids and the query file's hash (or source tag)."""
    h = hashlib.sha256()
    for image_id in sorted(image_ids):
        h.update(image_id.encode())
        h.update(b"\n")
    h.update(b"queries:")
    h.update(queries_source.encode())
    return h.hexdigest()


def generated_queries(
    items: Sequence[LabelledImage], seed: int, n: int = QUERIES_PER_IMAGE
) -> dict[str, list[str]]:
    """Queries made on the fly by the offline generator, kept where the rule judge agrees."""
    generator, judge = OfflineGenerator(seed=seed), RuleJudge()
    out: dict[str, list[str]] = {}
    for item in items:
        candidates = generator.generate(item.label, n, key=item.image_id)
        accepted = [v.query for v in judge.judge(item.label, candidates) if v.accepted]
        if accepted:
            out[item.image_id] = accepted
    return out


def train_queries(
    items: Sequence[LabelledImage], queries_path: Path | None, seed: int
) -> tuple[dict[str, list[str]], str]:
    """The queries of the train images only, and the source tag for the fingerprint."""
    if queries_path is None:
        return generated_queries(items, seed), f"generated:offline:seed={seed}"
    if not queries_path.is_file():
        raise ConfigError(f"no query file at {queries_path}")
    loaded = load_queries(queries_path)
    train_ids = {item.image_id for item in items}
    kept = {k: v for k, v in loaded.items() if k in train_ids}
    dropped = len(loaded) - len(kept)
    if dropped:
        log.info("queries: ignored %d images that are not in the train split", dropped)
    return kept, f"file:{sha256_file(queries_path)}"


@dataclass
class TrainSet:
    """The train split in memory: images resized to `cache_side`, classes and texts."""

    image_ids: list[str]
    images: list[Image.Image]
    class_ids: list[int]
    class_names: list[str]
    captions: list[str]
    queries: list[list[str]]
    fingerprint: str
    caption_prob: float = 0.5
    meta: dict[str, Any] = field(default_factory=dict)
    # each image's box in the held image's pixels (None: the whole frame is the vehicle)
    boxes: list[tuple[int, int, int, int] | None] = field(default_factory=list)
    policy: ImagePolicy = DEFAULT_POLICY
    colours: list[str | None] = field(default_factory=list)  # each image's labelled colour

    def box_of(self, i: int) -> tuple[int, int, int, int] | None:
        return self.boxes[i] if self.boxes else None

    def served_image(self, i: int) -> Image.Image:
        """Image i framed as the policy serves it (feedback pairs, checks)."""
        return self.policy.frame(self.images[i], self.box_of(i))

    def __len__(self) -> int:
        return len(self.image_ids)

    @classmethod
    def from_dataset(
        cls,
        dataset: StanfordDataset,
        *,
        image_size: int,
        queries_path: Path | None = None,
        seed: int = 0,
        limit: int = 0,
        progress: bool = True,
        policy: ImagePolicy = DEFAULT_POLICY,
        split: str = "train",
    ) -> TrainSet:
        """Load the train split (the first `limit` images where limit > 0).

        Each image is held whole, scaled so its longer side is at most 1.5x the model's
        image size times the share of the frame its box spans (so a box crop keeps about
        the resolution the model reads), with its box scaled alike."""
        items = dataset.subset(split)
        if limit > 0:
            items = items[:limit]
        if not items:
            raise ConfigError(f"{dataset.root}: no train images")
        queries, source = train_queries(items, queries_path, seed)
        names = sorted({item.label.class_name for item in items})
        index = {name: i for i, name in enumerate(names)}
        images: list[Image.Image] = []
        boxes: list[tuple[int, int, int, int] | None] = []
        for item in tqdm(items, desc="loading train images", unit="img",
                         disable=not progress):
            img, box = held_image(dataset.open_image(item, crop=False), item.bbox, image_size)
            images.append(img)
            boxes.append(box)
        ids = [item.image_id for item in items]
        return cls(
            image_ids=ids,
            images=images,
            class_ids=[index[item.label.class_name] for item in items],
            class_names=names,
            captions=[caption(item.label) for item in items],
            queries=[queries.get(item.image_id, []) for item in items],
            fingerprint=data_fingerprint(ids, source),
            meta={"queries_source": source, "with_queries": sum(1 for q in queries.values() if q)},
            boxes=boxes,
            policy=policy,
            colours=[item.label.colour for item in items],
        )


def held_image(
    img: Image.Image, bbox: Sequence[float] | None, image_size: int
) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """A whole image scaled for the train set (never up), and its box in those pixels."""
    from carsearch.platform.models.image_policy import clip_box

    box = clip_box(bbox, img.size) if bbox is not None else None
    span = 1.0
    if box is not None:
        span = max((box[2] - box[0]) / img.width, (box[3] - box[1]) / img.height, 0.25)
    limit = math.ceil(1.5 * image_size / span)
    scale = min(1.0, limit / max(img.size))
    if scale < 1.0:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
        if box is not None:
            box = clip_box([v * scale for v in box], img.size)
    return img, box


def augment_image(img: Image.Image, rng: random.Random, min_area: float = 0.95) -> Image.Image:
    """Light augmentation: random resized crop (`min_area`-100 % of the area), flip, jitter.

    The crop stays large: the make is drawn on the front face at one end of the vehicle,
    and a crop that cuts it off leaves an image its class name no longer describes
    (catalogue, 375 steps: R@1 0.81 with crops down to 75 % of the area, 1.00 at 95 %).

    Brightness, contrast and saturation move by at most 15 %; hue never changes, since
    colour is part of what a query asks for.
    """
    w, h = img.size
    area = rng.uniform(min_area, 1.0) * w * h
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = max(1, min(w, round(math.sqrt(area * ratio))))
    ch = max(1, min(h, round(math.sqrt(area / ratio))))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhance(out).enhance(rng.uniform(0.85, 1.15))
    return out


class SampleStream(torch.utils.data.Dataset[dict[str, Any]]):
    """`total` samples drawn from a TrainSet, epoch after epoch (see the module docstring)."""

    def __init__(
        self,
        data: TrainSet,
        total: int,
        seed: int,
        *,
        augment: bool = True,
        min_crop_area: float = 0.95,
    ) -> None:
        self.data = data
        self.total = total
        self.seed = seed
        self.augment = augment
        self.min_crop_area = min_crop_area

    def __len__(self) -> int:
        return self.total

    @lru_cache(maxsize=4)  # noqa: B019 - one small array per epoch, the stream lives briefly
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(
            len(self.data)
        )

    def item_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.data))
        return int(self._permutation(epoch)[offset])

    def __getitem__(self, position: int) -> dict[str, Any]:
        if not 0 <= position < self.total:
            raise IndexError(position)
        i = self.item_at(position)
        rng = random.Random(f"{self.seed}:{position}")
        image = self.data.images[i]
        if self.augment:
            policy = self.data.policy
            t = 1.0 if rng.random() < policy.frame_prob else rng.random()
            image = policy.train_view(image, self.data.box_of(i), t)
            image = augment_image(image, rng, self.min_crop_area)
        else:
            image = self.data.served_image(i)
        queries = self.data.queries[i]
        if not queries or rng.random() < self.data.caption_prob:
            text = self.data.captions[i]
        else:
            text = rng.choice(queries)
        colours = self.data.colours
        return {"image": image, "text": text, "class_id": self.data.class_ids[i], "index": i,
                "colour": colour_id(colours[i] if colours else None),
                "text_colour": colour_id(named_colour(text))}


def feedback_samples(
    pairs: Sequence[FeedbackPair],
    micro_step: int,
    per_batch: int,
    seed: int,
    *,
    augment: bool = True,
    min_crop_area: float = 0.95,
) -> list[dict[str, Any]]:
    """The feedback pairs of micro-batch `micro_step` (see the module docstring)."""
    n = len(pairs)
    if n == 0 or per_batch < 1:
        return []
    out = []
    for position in range(micro_step * per_batch, (micro_step + 1) * per_batch):
        cycle, offset = divmod(position, n)
        order = np.random.Generator(np.random.PCG64([seed, cycle, 1])).permutation(n)
        pair = pairs[int(order[offset])]
        rng = random.Random(f"{seed}:feedback:{position}")
        image = augment_image(pair.image, rng, min_crop_area) if augment else pair.image
        out.append({"image": image, "text": pair.query, "label": pair.label})
    return out


def colour_id(colour: str | None) -> int:
    """A colour's index in the vocabulary's colours; -1 for none or an unknown one."""
    from carsearch.platform.vehicles import COLOURS

    return COLOURS.index(colour) if colour in COLOURS else -1


class Collate:
    """Batches samples: the base's image processor, the tokenizer padded to max length."""

    def __init__(self, processor: Any, max_length: int) -> None:
        self.processor = processor
        self.max_length = max_length

    def _encode(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels = self.processor.image_processor(
            images=[s["image"] for s in samples], return_tensors="pt"
        )["pixel_values"]
        tokens = self.processor.tokenizer(
            [s["text"] for s in samples],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"pixel_values": pixels, "input_ids": tokens["input_ids"]}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            **self._encode(samples),
            "classes": torch.tensor([s["class_id"] for s in samples], dtype=torch.long),
            # attribute-aware positives: a text that names a colour is a positive only for
            # images of its class in that colour (an unlabelled colour is not a positive)
            "colours": torch.tensor([s.get("colour", -1) for s in samples], dtype=torch.long),
            "text_colours": torch.tensor([s.get("text_colour", -1) for s in samples],
                                         dtype=torch.long),
        }

    def feedback(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Feedback samples: pixels, tokens and the votes' labels (+1 / -1)."""
        return {
            **self._encode(samples),
            "labels": torch.tensor([float(s["label"]) for s in samples]),
        }
