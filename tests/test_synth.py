"""training.synth: the rendered catalogue is deterministic, labelled, and loader-readable."""

from __future__ import annotations

import colorsys
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from carsearch.cli import data as data_cli
from carsearch.data.catalogue import (
    CATALOGUE,
    DEFAULT_SIZE,
    PAINT,
    class_sequence,
    render_vehicle,
    write_catalogue,
)
from carsearch.data.stanford import load_stanford
from carsearch.platform.errors import ConfigError
from carsearch.platform.vehicles import (
    BODY_CATEGORIES,
    COLOURS,
    MAKE_ALIASES,
    parse_class_name,
)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "cat"
    write_catalogue(root, 2 * len(CATALOGUE), seed=11, progress=False)
    return root


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    write_catalogue(tmp_path / "a", 20, seed=3, progress=False)
    write_catalogue(tmp_path / "b", 20, seed=3, progress=False)
    write_catalogue(tmp_path / "c", 20, seed=4, progress=False)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert set(a) >= {
        "cars_meta.mat",
        "cars_train_annos.mat",
        "labels.jsonl",
        "cars_train/00001.jpg",
        "cars_train/00020.jpg",
    }
    assert a == b
    assert a["cars_train/00001.jpg"] != c["cars_train/00001.jpg"]


def test_round_trips_through_the_loader(catalogue: Path) -> None:
    ds = load_stanford(catalogue)
    assert ds.scan(progress=False) == []
    assert ds.class_names == [c.class_name for c in CATALOGUE]
    assert len(ds.images) == 72
    assert ds.split_sizes() == {"train": 36, "test": 36}
    sidecar = {
        json.loads(line)["fname"]: json.loads(line)["colour"]
        for line in (catalogue / "labels.jsonl").read_text().splitlines()
    }
    for item in ds.images:
        assert item.label.colour == sidecar[item.path.name]
        assert item.label.colour in COLOURS
        left, top, right, bottom = item.bbox  # type: ignore[misc]
        assert 0 <= left < right <= DEFAULT_SIZE[0] and 0 <= top < bottom <= DEFAULT_SIZE[1]
        assert (right - left) * (bottom - top) < DEFAULT_SIZE[0] * DEFAULT_SIZE[1]
        crop = ds.open_image(item)
        assert crop.size == (right - left, bottom - top)


def test_labels_cover_every_body_category_make_and_both_splits(catalogue: Path) -> None:
    ds = load_stanford(catalogue)
    assert {im.label.body_category for im in ds.images} == set(BODY_CATEGORIES)
    for split in ("train", "test"):
        assert {im.label.class_name for im in ds.split(split)} == set(ds.class_names)
    assert {im.label.make for im in ds.images} <= set(MAKE_ALIASES)
    assert len({im.label.colour for im in ds.images}) >= 10


def test_catalogue_class_names_parse_like_stanford() -> None:
    assert 24 <= len(CATALOGUE) <= 48
    assert len({c.class_name for c in CATALOGUE}) == len(CATALOGUE)
    for cls in CATALOGUE:
        label = parse_class_name(cls.class_name)
        assert (label.make, label.model, label.body_type, label.year) == (
            cls.make,
            cls.model,
            cls.body,
            cls.year,
        )
        assert label.make in MAKE_ALIASES
    pickups = [c for c in CATALOGUE if parse_class_name(c.class_name).body_category == "pickup"]
    assert pickups and all(c.body.endswith("Cab") for c in pickups)
    assert Counter(c.era for c in CATALOGUE).keys() == {0, 1, 2}


def test_class_sequence_pairs_land_in_both_splits() -> None:
    seq = class_sequence(200, 36, seed=0)
    assert len(seq) == 200
    assert all(seq[i] == seq[i + 1] for i in range(0, 200, 2))
    assert Counter(seq[:72]) == Counter({c: 2 for c in range(36)})
    assert class_sequence(200, 36, seed=0) == seq != class_sequence(200, 36, seed=1)


@pytest.mark.parametrize(
    "change",
    [
        {"make": "Audi"},  # grille and badge
        {"body": "Sedan", "model": "X"},  # silhouette
        {"year": 1995},  # lamps, bumpers, wheels
    ],
)
def test_each_labelled_field_changes_the_picture(change: dict[str, object]) -> None:
    base = CATALOGUE[0]  # Chevrolet Silverado 1500 Regular Cab 2012
    img_a, box = render_vehicle(base, "red", np.random.default_rng(5))
    img_b, _ = render_vehicle(replace(base, **change), "red", np.random.default_rng(5))  # type: ignore[arg-type]
    diff = np.abs(np.asarray(img_a, dtype=int) - np.asarray(img_b, dtype=int)).sum(axis=2)
    changed = diff > 40
    assert changed.sum() >= 20
    _, xs = np.nonzero(changed)
    assert xs.min() >= box[0] - 2 and xs.max() <= box[2] + 2  # only the vehicle changed


def _hsv(rgb: np.ndarray) -> tuple[float, float, float]:
    h, sat, v = colorsys.rgb_to_hsv(*(float(x) / 255 for x in rgb))
    return h * 360, sat, v


@pytest.mark.parametrize("colour", COLOURS)
def test_paint_colour_is_what_changes_with_the_colour_label(colour: str) -> None:
    """Pixels that change with the colour label alone show that paint's hue and brightness."""
    other = "purple" if colour != "purple" else "orange"
    hue, sat, val = _hsv(np.array(PAINT[colour]))
    for k, cls in enumerate(CATALOGUE[::5]):
        img_a, _ = render_vehicle(cls, colour, np.random.default_rng(k))
        img_b, _ = render_vehicle(cls, other, np.random.default_rng(k))
        a, b = np.asarray(img_a, dtype=float), np.asarray(img_b, dtype=float)
        changed = np.abs(a - b).sum(axis=2) > 60
        assert changed.sum() > 100
        h, s, v = _hsv(np.median(a[changed], axis=0))
        if val < 0.2:
            assert v < 0.25, (cls.class_name, colour, v)
        else:
            assert 0.7 < v / val < 1.3, (cls.class_name, colour, v)  # lighting varies
        if sat > 0.3:  # chromatic paint: same hue, clearly saturated
            assert min(abs(h - hue), 360 - abs(h - hue)) < 16, (cls.class_name, colour, h)
            assert s > 0.3, (cls.class_name, colour, s)
        elif sat < 0.1:  # black, white, silver, grey: neutral
            assert s < 0.2, (cls.class_name, colour, s)


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    write_catalogue(tmp_path, 4, seed=0, progress=False)
    with pytest.raises(ConfigError, match="--force"):
        write_catalogue(tmp_path, 2, seed=0, progress=False)
    write_catalogue(tmp_path, 2, seed=0, force=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "cars_train").iterdir()) == ["00001.jpg", "00002.jpg"]
    assert len(load_stanford(tmp_path).images) == 2
    with pytest.raises(ConfigError):
        write_catalogue(tmp_path / "x", 0, progress=False)


def test_custom_size(tmp_path: Path) -> None:
    write_catalogue(tmp_path, 2, size=(160, 120), progress=False)
    assert Image.open(tmp_path / "cars_train" / "00001.jpg").size == (160, 120)


def test_synth_command(tmp_path: Path) -> None:
    root = typer.Typer()

    @root.callback()
    def _noop() -> None:
        pass

    root.add_typer(data_cli.app, name="data")
    out = tmp_path / "cat"
    args = ["data", "synth", "--out", str(out), "--n", "6", "--seed", "9", "--json"]
    result = CliRunner().invoke(root, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 6 and report["classes"] == len(CATALOGUE) and report["seed"] == 9
    assert report["images_per_s"] > 0
    assert len(load_stanford(out).images) == 6
    again = CliRunner().invoke(root, args)
    assert again.exit_code != 0 and isinstance(again.exception, ConfigError)
