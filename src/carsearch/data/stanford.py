"""The Stanford Cars MATLAB layout: class names, annotations, images, the benchmark split.

    root/
      cars_meta.mat                      class_names: (1, C) cell of strings
      cars_train_annos.mat               annotations: (1, N) struct, bbox_x1..bbox_y2, class, fname
      cars_test_annos_withlabels.mat     optional labelled test list (same fields)
      cars_train/, cars_test/            the images
      labels.jsonl                       optional sidecar: {"fname": ..., "colour": ...}
      devkit-original/                   optional untouched devkit (cars_test_annos.mat
                                         there is the unlabelled test list, no class field)

The annotation files may also sit in root/devkit/, as in the original release.
Boxes in the files are 1-based inclusive corners; `LabelledImage.bbox` holds them in
PIL's convention (0-based left/top, exclusive right/bottom). Without a labelled test
file the benchmark split applies: an even five-digit file number is test, odd is train.
The rendered catalogue (`carsearch data synth`) is written in this same layout.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from carsearch.platform.errors import CarsearchError, ConfigError, ImageRejectedError
from carsearch.platform.images import (
    DEFAULT_MAX_PIXELS,
    crop_box,
    load_image,
    load_image_with_mode,
    rejection_kind,
)
from carsearch.platform.vehicles import VehicleLabel, canonical_colour, parse_class_name

log = logging.getLogger(__name__)

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")
META_FILE = "cars_meta.mat"
TRAIN_ANNOS = "cars_train_annos.mat"
TEST_ANNOS_LABELLED = "cars_test_annos_withlabels.mat"
TEST_ANNOS_UNLABELLED = "cars_test_annos.mat"
COLOUR_SIDECAR = "labels.jsonl"
BENCHMARK_SPLIT = "benchmark: even five-digit file number is test, odd is train"
Box = tuple[int, int, int, int]


class DatasetError(CarsearchError):
    """A data set directory or annotation file that cannot be read."""


@dataclass(frozen=True)
class Annotation:
    """One row of an annotation file, as stored (class is 1-based, None when unlabelled)."""

    fname: str
    bbox: Box | None
    class_index: int | None


@dataclass(frozen=True)
class LabelledImage:
    """One usable labelled image. `image_id` is its path relative to the data set root."""

    image_id: str
    path: Path
    label: VehicleLabel
    split: Split
    bbox: Box | None


@dataclass(frozen=True)
class Devkit:
    """The untouched devkit files: class names, train annotations, unlabelled test list."""

    class_names: list[str]
    train: list[Annotation]
    test_unlabelled: list[Annotation]


def _scalar(value: Any) -> Any:
    arr = np.asarray(value).reshape(-1)
    if arr.size == 0:
        raise ValueError("empty field")
    return arr[0].item() if hasattr(arr[0], "item") else arr[0]


def _loadmat(path: Path) -> dict[str, Any]:
    try:
        return scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except Exception as exc:  # scipy raises several types for a damaged file
        raise DatasetError(f"{path}: not a readable MATLAB file ({exc})") from None


def read_class_names(path: Path) -> list[str]:
    """The class names of a cars_meta.mat, in file order (class k is names[k-1])."""
    mat = _loadmat(path)
    if "class_names" not in mat:
        raise DatasetError(f"{path}: no class_names variable")
    try:
        return [str(_scalar(cell)).strip() for cell in np.asarray(mat["class_names"]).reshape(-1)]
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: malformed class_names ({exc})") from None


def _box(row: np.void, fields: tuple[str, ...]) -> Box | None:
    names = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
    if not all(n in fields for n in names):
        return None
    x1, y1, x2, y2 = (int(_scalar(row[n])) for n in names)
    return x1 - 1, y1 - 1, x2, y2


def read_annotations(path: Path) -> list[Annotation]:
    """The rows of an annotations struct array (labelled or not)."""
    mat = _loadmat(path)
    if "annotations" not in mat:
        raise DatasetError(f"{path}: no annotations variable")
    annos = np.asarray(mat["annotations"]).reshape(-1)
    fields = tuple(annos.dtype.names or ())
    if "fname" not in fields:
        raise DatasetError(f"{path}: annotations have no fname field")
    rows: list[Annotation] = []
    for i, row in enumerate(annos):
        try:
            cls = int(_scalar(row["class"])) if "class" in fields else None
            rows.append(Annotation(str(_scalar(row["fname"])).strip(), _box(row, fields), cls))
        except (ValueError, TypeError) as exc:
            raise DatasetError(f"{path}: malformed annotation row {i + 1} ({exc})") from None
    return rows


def _find(root: Path, name: str) -> Path | None:
    for folder in (root, root / "devkit"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_devkit(folder: Path) -> Devkit:
    """Parse a devkit folder (meta, train annotations, the unlabelled test list)."""
    meta = folder / META_FILE
    train = folder / TRAIN_ANNOS
    test = folder / TEST_ANNOS_UNLABELLED
    return Devkit(
        class_names=read_class_names(meta),
        train=read_annotations(train) if train.is_file() else [],
        test_unlabelled=read_annotations(test) if test.is_file() else [],
    )


def benchmark_split(fname: str) -> Split:
    """Even five-digit file number: test; odd: train (the split every figure uses)."""
    stem = Path(fname).stem
    if not stem.isdigit():
        raise ValueError(f"file name {fname!r} carries no number for the benchmark split")
    return "test" if int(stem) % 2 == 0 else "train"


VALIDATION_SHARE = 0.1


def validation_ids(items: list[LabelledImage], share: float = VALIDATION_SHARE) -> set[str]:
    """The image ids carved from a train split for validation: per class, the first
    round(share * n) images in sha256(image id) order (at least one of a class of three
    or more), so every class is represented and the choice never depends on file order."""
    import hashlib

    if share <= 0:
        return set()
    by_class: dict[str, list[str]] = {}
    for im in items:
        by_class.setdefault(im.label.class_name, []).append(im.image_id)
    out: set[str] = set()
    for ids in by_class.values():
        ids.sort(key=lambda i: hashlib.sha256(i.encode()).hexdigest())
        k = round(share * len(ids))
        if k == 0 and len(ids) >= 3:
            k = 1
        out.update(ids[:k])
    return out


def read_colours(path: Path) -> dict[str, str]:
    """The colour sidecar: image id (or bare train file name) -> canonical colour."""
    colours: dict[str, str] = {}
    if not path.is_file():
        return colours
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key = str(rec.get("path") or rec["fname"])
            word = str(rec["colour"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            log.warning("%s line %d: not a {fname, colour} record; ignored", path, n)
            continue
        colour = canonical_colour(word)
        if colour is None:
            log.warning("%s line %d: unknown colour %r; ignored", path, n, word)
            continue
        colours[key if "/" in key else f"cars_train/{key}"] = colour
    return colours


@dataclass
class StanfordDataset:
    """Labelled images of one data set root, and what could not be used (with reasons)."""

    root: Path
    class_names: list[str]
    images: list[LabelledImage]
    split_source: str
    quarantined: list[tuple[Path, str]] = field(default_factory=list)
    converted: Counter[str] = field(default_factory=Counter)
    annotations: int = 0
    scanned: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS

    def split(self, name: Split) -> list[LabelledImage]:
        return [im for im in self.images if im.split == name]

    def subset(self, name: str, *, share: float | None = None) -> list[LabelledImage]:
        """"train" (the train split less validation), "validation" (carved from the
        train split, `validation_ids`), "test", or "train+validation" (the whole train
        split). Recipes, early stopping and promotion read validation; test is only
        reported."""
        share = VALIDATION_SHARE if share is None else share
        if name == "test":
            return self.split("test")
        train = self.split("train")
        if name == "train+validation":
            return train
        held = validation_ids(train, share)
        if name == "validation":
            return [im for im in train if im.image_id in held]
        if name == "train":
            return [im for im in train if im.image_id not in held]
        raise ConfigError(f"unknown split {name!r}: train, validation, test or "
                          "train+validation")

    def split_sizes(self) -> dict[str, int]:
        counts = Counter(im.split for im in self.images)
        return {s: counts.get(s, 0) for s in SPLITS}

    def open_image(self, item: LabelledImage, *, crop: bool = True) -> Image.Image:
        """The image as RGB, cropped to its box (clamped) unless crop=False."""
        img = load_image(item.path, max_pixels=self.max_pixels)
        return crop_box(img, item.bbox) if crop else img

    def quarantine(self, path: Path, reason: str) -> None:
        log.warning("quarantined %s: %s", path, reason)
        self.quarantined.append((path, reason))

    def scan(self, *, progress: bool = True) -> list[tuple[Path, str]]:
        """Fully decode every image; move unusable ones to `quarantined` (never raises).

        Returns the files quarantined by this pass; `converted` counts the stored modes
        of images that needed converting to RGB (greyscale, CMYK, ...).
        """
        kept: list[LabelledImage] = []
        found: list[tuple[Path, str]] = []
        bar = tqdm(self.images, desc="scanning images", unit="img", disable=not progress)
        for item in bar:
            try:
                _, mode = load_image_with_mode(item.path, max_pixels=self.max_pixels)
            except ImageRejectedError as exc:
                self.quarantine(item.path, exc.reason)
                found.append((item.path, exc.reason))
                continue
            if mode != "RGB":
                self.converted[mode] += 1
                log.debug("converted %s from %s to RGB", item.path, mode)
            kept.append(item)
        self.images = kept
        self.scanned = True
        if found or self.converted:
            log.info(
                "scan: %d usable, %d quarantined, converted to RGB: %s",
                len(kept),
                len(found),
                dict(self.converted) or "none",
            )
        return found

    def summary(self) -> dict[str, Any]:
        """Counts for `carsearch data inspect` (JSON-serialisable)."""
        sizes = self.split_sizes()
        by_split = {s: {im.label.class_name for im in self.split(s)} for s in SPLITS}
        colours = Counter(im.label.colour for im in self.images if im.label.colour)
        bodies = Counter(im.label.body_category or "unknown" for im in self.images)
        return {
            "root": str(self.root),
            "annotations": self.annotations,
            "images": len(self.images),
            "classes": len(self.class_names),
            "makes": len({parse_class_name(n).make for n in self.class_names}),
            "split_source": self.split_source,
            "splits": sizes,
            "classes_in_both_splits": len(by_split["train"] & by_split["test"]),
            "body_categories": dict(sorted(bodies.items())),
            "colours": dict(sorted(colours.items())),
            "scanned": self.scanned,
            "converted_to_rgb": dict(sorted(self.converted.items())),
            "quarantined": [{"path": str(p), "reason": r} for p, r in self.quarantined],
            "quarantined_by_kind": dict(
                sorted(Counter(rejection_kind(r) for _, r in self.quarantined).items())
            ),
        }


def _labelled(
    ds: StanfordDataset,
    annos: list[Annotation],
    folder: str,
    split_of: Any,
    colours: dict[str, str],
) -> None:
    n_classes = len(ds.class_names)
    for anno in annos:
        image_id = f"{folder}/{anno.fname}"
        path = ds.root / folder / anno.fname
        if anno.class_index is None or not 1 <= anno.class_index <= n_classes:
            ds.quarantine(path, f"bad-label: class {anno.class_index} not in 1..{n_classes}")
            continue
        if not path.is_file():
            ds.quarantine(path, "unreadable: file not found")
            continue
        try:
            split = split_of(anno.fname)
        except ValueError as exc:
            ds.quarantine(path, f"bad-label: {exc}")
            continue
        label = parse_class_name(ds.class_names[anno.class_index - 1], colours.get(image_id))
        ds.images.append(LabelledImage(image_id, path, label, split, anno.bbox))


def load_stanford(
    root: Path,
    *,
    split: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> StanfordDataset:
    """Read a Stanford Cars layout (or the rendered catalogue) under `root`.

    Images whose annotation is unusable or whose file is missing are quarantined with
    the reason; call `scan()` to decode every image and quarantine unreadable ones.
    """
    root = Path(root)
    if split is not None and split not in SPLITS:
        raise ConfigError(f"split must be 'train' or 'test', not {split!r}")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory")
    meta, train = _find(root, META_FILE), _find(root, TRAIN_ANNOS)
    if meta is None or train is None:
        raise DatasetError(f"{root}: no {META_FILE} and {TRAIN_ANNOS} (Stanford Cars layout)")
    test = _find(root, TEST_ANNOS_LABELLED)
    ds = StanfordDataset(
        root=root,
        class_names=read_class_names(meta),
        images=[],
        split_source=str(test.name) if test else BENCHMARK_SPLIT,
        max_pixels=max_pixels,
    )
    colours = read_colours(root / COLOUR_SIDECAR)
    train_annos = read_annotations(train)
    test_annos = read_annotations(test) if test else []
    ds.annotations = len(train_annos) + len(test_annos)
    if test:
        _labelled(ds, train_annos, "cars_train", lambda _f: "train", colours)
        _labelled(ds, test_annos, "cars_test", lambda _f: "test", colours)
    else:
        _labelled(ds, train_annos, "cars_train", benchmark_split, colours)
    if split is not None:
        ds.images = [im for im in ds.images if im.split == split]
    log.info(
        "%s: %d images, %d classes, %d quarantined",
        root,
        len(ds.images),
        len(ds.class_names),
        len(ds.quarantined),
    )
    return ds
