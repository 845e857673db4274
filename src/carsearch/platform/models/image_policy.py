"""One image policy per model version: how a photo becomes the pixels a model sees.

    photo (+ optional vehicle box) -> framing -> size -> normalisation

Framing is this module's (`ImagePolicy.frame`); size and normalisation are the version's
own image processor (saved beside its weights), applied by `Encoder.encode_images`. The
same two steps run in training (`training.train_data`), evaluation, ingest, re-index,
image search, classification and the feedback trainer, so a version is served the way
it was trained and measured.

The policy is written as `image_policy.json` in the model folder, so the registry's
artifact hash covers it and `models publish` copies it. A folder without one (versions
made before policies were recorded, or a hub checkpoint) gets `IMPLIED_POLICY`: crop to
the box where there is one, else the whole frame, which is how those versions were
trained (train images were cropped to their boxes) and evaluated.

Framings:
- served (`frame`): the box, widened by `margin` of its width/height on each side and
  clipped to the image; without a box (a camera photo, an uploaded query image) the
  whole frame.
- training (`train_view`): with `train_views == "box-to-frame"`, a view interpolated
  between the (widened) box at t = 0 and the whole frame at t = 1, t drawn per sample:
  the model sees every framing between the two that it is served, so a photo without a
  box stays findable. `"box"` trains on the served box crop only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from carsearch.platform.images import SOURCE_SIZE

log = logging.getLogger(__name__)

POLICY_FILE = "image_policy.json"
POLICY_FORMAT = 1

Box = tuple[int, int, int, int]
Framing = Literal["box", "whole"]
TrainViews = Literal["box", "box-to-frame"]


class BoxError(ValueError):
    """A box that cannot be used; the message says why (one line)."""


@dataclass(frozen=True)
class ImagePolicy:
    """How a version frames an image before its processor sizes and normalises it."""

    framing: Framing = "box"  # served: "box" crops to the box where one is known
    margin: float = 0.0  # share of the box's width/height added on each side
    # "box" by default: on the compact demo base, "box-to-frame" left training at chance
    # (docs/BENCHMARKS.md, "What is served, measured")
    train_views: TrainViews = "box"
    frame_prob: float = 0.25  # box-to-frame: share of samples shown the whole frame (t = 1)
    source: str = "file"  # "file", or why this policy applies (implied)
    processor: dict[str, Any] = field(default_factory=dict)  # size/normalisation, recorded

    def __post_init__(self) -> None:
        if self.framing not in ("box", "whole"):
            raise ValueError(f"framing must be 'box' or 'whole', not {self.framing!r}")
        if self.train_views not in ("box", "box-to-frame"):
            raise ValueError(f"train_views must be 'box' or 'box-to-frame', not "
                             f"{self.train_views!r}")
        if not (0.0 <= self.margin <= 1.0 and math.isfinite(self.margin)):
            raise ValueError(f"margin must lie in [0, 1], not {self.margin}")
        if not 0.0 <= self.frame_prob <= 1.0:
            raise ValueError(f"frame_prob must lie in [0, 1], not {self.frame_prob}")

    # -- framing ----------------------------------------------------------------------
    def served_box(self, size: tuple[int, int], box: Sequence[float] | None) -> Box | None:
        """The pixel box the served view crops to, or None for the whole frame."""
        if self.framing == "whole" or box is None:
            return None
        clipped = clip_box(box, size)
        if clipped is None:
            return None
        return widen(clipped, size, self.margin)

    def frame(self, img: Image.Image, box: Sequence[float] | None = None) -> Image.Image:
        """The served framing of one image (RGB in, RGB out)."""
        target = self.served_box(img.size, in_image_pixels(img, box))
        if target is None or target == (0, 0, img.width, img.height):
            return img
        return img.crop(target)

    def train_box(self, size: tuple[int, int], box: Sequence[float] | None,
                  t: float) -> Box | None:
        """The training view at t in [0, 1]: the served box at 0, the whole frame at 1."""
        served = self.served_box(size, box)
        if served is None:
            return None
        if self.train_views == "box":
            return served
        t = min(max(t, 0.0), 1.0)
        full = (0, 0, size[0], size[1])
        out = tuple(round(a + (b - a) * t) for a, b in zip(served, full, strict=True))
        return out[0], out[1], out[2], out[3]

    def train_view(self, img: Image.Image, box: Sequence[float] | None,
                   t: float) -> Image.Image:
        target = self.train_box(img.size, in_image_pixels(img, box), t)
        if target is None or target == (0, 0, img.width, img.height):
            return img
        return img.crop(target)

    # -- persistence ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = POLICY_FORMAT
        d.pop("source")
        return d

    def with_processor(self, processor: Any) -> ImagePolicy:
        """This policy with the processor's size and normalisation recorded beside it."""
        return replace(self, processor=describe_processor(processor))


# Versions without a policy file were trained on box crops and evaluated on box crops.
IMPLIED_POLICY = ImagePolicy(
    framing="box", margin=0.0, train_views="box", frame_prob=0.0,
    source="implied: no image_policy.json; versions made before policies were recorded "
           "were trained and evaluated on images cropped to their boxes",
)
# What new training runs record unless told otherwise.
DEFAULT_POLICY = ImagePolicy()


def describe_processor(processor: Any) -> dict[str, Any]:
    """Size, resampling and normalisation of an image processor (or a processor with one)."""
    ip = getattr(processor, "image_processor", processor)
    out: dict[str, Any] = {"class": type(ip).__name__}
    for name in ("size", "resample", "do_resize", "do_rescale", "rescale_factor",
                 "do_normalize", "image_mean", "image_std", "do_center_crop", "crop_size"):
        value = getattr(ip, name, None)
        if value is None:
            continue
        if hasattr(value, "value"):  # an enum (PIL resampling)
            value = value.value
        try:
            json.dumps(value)
        except TypeError:
            value = str(value)
        out[name] = value
    return out


def write_policy(model_dir: Path, policy: ImagePolicy, processor: Any = None) -> Path:
    """Write `image_policy.json` into a model folder (with the processor's settings)."""
    if processor is not None:
        policy = policy.with_processor(processor)
    path = Path(model_dir) / POLICY_FILE
    path.write_text(json.dumps(policy.to_dict(), indent=2, sort_keys=True) + "\n",
                    encoding="utf-8")
    return path


def read_policy(model_dir: str | Path | None) -> ImagePolicy:
    """The policy recorded in a model folder, or `IMPLIED_POLICY` where none is."""
    if model_dir is None:
        return IMPLIED_POLICY
    path = Path(model_dir).expanduser() / POLICY_FILE
    if not path.is_file():
        return IMPLIED_POLICY
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        raw.pop("format", None)
        known = {f for f in ImagePolicy.__dataclass_fields__ if f != "source"}
        policy = ImagePolicy(**{k: v for k, v in raw.items() if k in known}, source="file")
    except (OSError, ValueError, TypeError) as exc:
        from carsearch.platform.errors import ModelNotFoundError

        raise ModelNotFoundError(f"{path}: unreadable image policy ({exc})") from None
    return policy


def frame_images(
    policy: ImagePolicy,
    images: Sequence[Image.Image],
    boxes: Sequence[Sequence[float] | None] | None = None,
) -> list[Image.Image]:
    """The served framing of each image (as RGB): the first step of `encode_images`."""
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"{len(images)} images but {len(boxes)} boxes")
    out = []
    for i, im in enumerate(images):
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        out.append(policy.frame(rgb, boxes[i] if boxes is not None else None))
    return out


# -- boxes ------------------------------------------------------------------------------
def in_image_pixels(img: Image.Image, box: Sequence[float] | None) -> Sequence[float] | None:
    """A box given in the file's pixels, in the pixels of ``img``: the safe decoder
    reduces large photos at decode time and records the file's size in ``img.info``."""
    source = img.info.get(SOURCE_SIZE)
    if box is None or not source or tuple(source) == img.size:
        return box
    sx, sy = img.width / source[0], img.height / source[1]
    x1, y1, x2, y2 = (float(v) for v in box)
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def clip_box(box: Sequence[float], size: tuple[int, int]) -> Box | None:
    """A box rounded and clipped to an image of `size`; None when nothing is left."""
    width, height = size
    x1, y1, x2, y2 = (float(v) for v in box)
    left = min(max(round(x1), 0), width)
    top = min(max(round(y1), 0), height)
    right = min(max(round(x2), 0), width)
    bottom = min(max(round(y2), 0), height)
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


def widen(box: Box, size: tuple[int, int], margin: float) -> Box:
    """`box` grown by `margin` of its width/height on each side, clipped to the image."""
    if margin <= 0:
        return box
    x1, y1, x2, y2 = box
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    return (max(0, round(x1 - dx)), max(0, round(y1 - dy)),
            min(size[0], round(x2 + dx)), min(size[1], round(y2 + dy)))


def parse_box(value: Any) -> tuple[float, float, float, float]:
    """A box as given in a sidecar, manifest or label import: [x1, y1, x2, y2] in pixels
    (a list, or a string "x1,y1,x2,y2" / "x1 y1 x2 y2" from a CSV cell).

    Raises BoxError with the reason for one that is not four finite numbers with
    x2 > x1 and y2 > y1. Clipping to the image happens once its size is known
    (`check_box`)."""
    if isinstance(value, str):
        parts: list[Any] = value.replace(",", " ").split()
    elif isinstance(value, list | tuple):
        parts = list(value)
    elif isinstance(value, dict):
        try:
            parts = [value[k] for k in ("x1", "y1", "x2", "y2")]
        except KeyError:
            raise BoxError("box object needs x1, y1, x2, y2") from None
    else:
        raise BoxError(f"box must be [x1, y1, x2, y2], not {type(value).__name__}")
    if len(parts) != 4:
        raise BoxError(f"box must have 4 numbers, not {len(parts)}")
    nums: list[float] = []
    for v in parts:
        if isinstance(v, bool):
            raise BoxError("box values must be numbers")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise BoxError(f"box value {str(v)[:40]!r} is not a number") from None
        if not math.isfinite(f):
            raise BoxError("box values must be finite")
        nums.append(f)
    x1, y1, x2, y2 = nums
    if x2 <= x1 or y2 <= y1:
        raise BoxError(f"box is inverted or empty (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g})")
    return x1, y1, x2, y2


def check_box(value: Any, size: tuple[int, int]) -> tuple[Box | None, str | None]:
    """(clipped pixel box, None), or (None, reason) for a box that cannot be used.

    A box partly outside the image is clipped to it and kept; one wholly outside, or
    malformed, is refused with a reason (the image is still ingested, whole frame)."""
    try:
        x1, y1, x2, y2 = parse_box(value)
    except BoxError as exc:
        return None, str(exc)
    clipped = clip_box((x1, y1, x2, y2), size)
    if clipped is None:
        return None, f"box lies outside the {size[0]}x{size[1]} image"
    return clipped, None
