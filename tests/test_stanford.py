"""training.stanford on the real Stanford Cars files, damaged copies, and the catalogue."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import scipy.io
import typer
from PIL import Image
from typer.testing import CliRunner

from carsearch.cli import data as data_cli
from carsearch.data.catalogue import annotations_mat_bytes, write_catalogue
from carsearch.data.stanford import (
    BENCHMARK_SPLIT,
    DatasetError,
    benchmark_split,
    load_stanford,
    read_annotations,
    read_class_names,
    read_devkit,
)
from carsearch.platform.errors import ConfigError
from carsearch.platform.images import rejection_kind
from carsearch.platform.settings import Settings
from carsearch.platform.vehicles import BODY_CATEGORY, MAKE_ALIASES, parse_class_name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stanford(stanford_root: Path) -> Path:
    """The real photos (conftest's stanford_root: skipped where absent, failed under CI)."""
    return stanford_root


@pytest.fixture(scope="module")
def real(stanford: Path):  # type: ignore[no-untyped-def]
    return load_stanford(stanford)


@pytest.fixture(scope="module")
def class_names(stanford: Path) -> list[str]:
    return read_class_names(stanford / "cars_meta.mat")


# ----------------------------------------------------------------- the real files


def test_real_counts_and_benchmark_split(real) -> None:  # type: ignore[no-untyped-def]
    assert len(real.class_names) == 196
    assert len(real.images) == 8144
    assert real.quarantined == []
    assert real.split_source == BENCHMARK_SPLIT
    assert real.split_sizes() == {"train": 4072, "test": 4072}
    for split in ("train", "test"):
        per_class = Counter(im.label.class_name for im in real.split(split))
        assert set(per_class) == set(real.class_names)
    assert min(Counter(im.label.class_name for im in real.split("test")).values()) >= 11
    first = real.images[0]
    assert first.image_id == "cars_train/00001.jpg"
    assert first.split == "train"
    assert first.path.is_file()


def test_real_split_filter(stanford: Path) -> None:
    test = load_stanford(stanford, split="test")
    assert len(test.images) == 4072
    assert all(int(im.path.stem) % 2 == 0 for im in test.images)


def test_every_real_class_name_parses(class_names: list[str]) -> None:
    assert len(class_names) == 196
    for name in class_names:
        label = parse_class_name(name)
        assert label.make in MAKE_ALIASES, name
        assert label.year is not None and 1990 <= label.year <= 2012, name
        assert label.model, name
        assert label.body_type is None or label.body_type in BODY_CATEGORY
    bodies = Counter(parse_class_name(n).body_category for n in class_names)
    assert {
        "sedan",
        "suv",
        "coupe",
        "convertible",
        "hatchback",
        "wagon",
        "minivan",
        "van",
        "pickup",
    } <= set(bodies)


@pytest.mark.parametrize(
    ("name", "make", "model", "body", "year"),
    [
        ("AM General Hummer SUV 2000", "AM General", "Hummer", "SUV", 2000),
        (
            "Aston Martin V8 Vantage Convertible 2012",
            "Aston Martin",
            "V8 Vantage",
            "Convertible",
            2012,
        ),
        ("Land Rover Range Rover SUV 2012", "Land Rover", "Range Rover", "SUV", 2012),
        ("Mercedes-Benz Sprinter Van 2012", "Mercedes-Benz", "Sprinter", "Van", 2012),
        (
            "Rolls-Royce Phantom Drophead Coupe Convertible 2012",
            "Rolls-Royce",
            "Phantom Drophead Coupe",
            "Convertible",
            2012,
        ),
        (
            "Chevrolet Silverado 1500 Extended Cab 2012",
            "Chevrolet",
            "Silverado 1500",
            "Extended Cab",
            2012,
        ),
        ("Dodge Ram Pickup 3500 Quad Cab 2009", "Dodge", "Ram Pickup 3500", "Quad Cab", 2009),
        ("Ram C/V Cargo Van Minivan 2012", "Ram", "C/V Cargo Van", "Minivan", 2012),
        ("Ford F-450 Super Duty Crew Cab 2012", "Ford", "F-450 Super Duty", "Crew Cab", 2012),
        ("Chevrolet Corvette ZR1 2012", "Chevrolet", "Corvette ZR1", None, 2012),
        ("smart fortwo Convertible 2012", "smart", "fortwo", "Convertible", 2012),
    ],
)
def test_real_class_name_spot_checks(
    class_names: list[str], name: str, make: str, model: str, body: str | None, year: int
) -> None:
    assert name in class_names
    label = parse_class_name(name)
    assert (label.make, label.model, label.body_type, label.year) == (make, model, body, year)


def test_devkit_original_parses_the_unlabelled_test_list(stanford: Path) -> None:
    kit = read_devkit(stanford / "devkit-original")
    assert len(kit.class_names) == 196
    assert len(kit.train) == 8144
    assert len(kit.test_unlabelled) == 8041
    assert all(a.class_index is None for a in kit.test_unlabelled)
    assert all(a.bbox is not None for a in kit.test_unlabelled)
    assert {a.class_index for a in kit.train} == set(range(1, 197))
    first = kit.train[0]
    assert (first.fname, first.bbox, first.class_index) == ("00001.jpg", (38, 115, 569, 375), 14)


def test_real_bbox_crop_is_clamped(real, stanford: Path) -> None:  # type: ignore[no-untyped-def]
    item = real.images[0]
    full = real.open_image(item, crop=False)
    assert real.open_image(item).size == full.size  # this copy's boxes are the whole frame
    # the devkit's box refers to the full-size photo: larger than this copy, so clamped
    kit_box = read_devkit(stanford / "devkit-original").train[0].bbox
    assert kit_box is not None and kit_box[2] > full.width
    moved = type(item)(item.image_id, item.path, item.label, item.split, kit_box)
    cropped = real.open_image(moved)
    assert cropped.size == (full.width - kit_box[0], full.height - kit_box[1])


def test_real_scan_sample_is_clean(real) -> None:  # type: ignore[no-untyped-def]
    sample = type(real)(real.root, real.class_names, real.images[:60], real.split_source)
    assert sample.scan(progress=False) == []
    assert len(sample.images) == 60 and sample.scanned


# ----------------------------------------------------------------- damaged copies


def _damage(root: Path) -> dict[str, str]:
    """Break or convert some images of a layout in place; returns fname -> expected outcome."""
    images = root / "cars_train"
    files = sorted(images.glob("*.jpg"))
    (files[0]).write_bytes(b"")
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 3])
    files[2].write_text("<html>not a photo</html>")
    Image.open(files[3]).convert("CMYK").save(files[3], format="JPEG")
    Image.open(files[4]).convert("L").save(files[4], format="JPEG")
    Image.new("RGB", (2400, 1800), (90, 90, 90)).save(files[5], format="JPEG", quality=30)
    return {
        files[0].name: "empty",
        files[1].name: "truncated",
        files[2].name: "not-an-image",
        files[3].name: "CMYK",
        files[4].name: "L",
        files[5].name: "too-many-pixels",
    }


def _check_damaged(root: Path, total: int, expected: dict[str, str]) -> None:
    ds = load_stanford(root, max_pixels=4_000_000)
    assert len(ds.images) == total
    found = ds.scan(progress=False)
    reasons = {p.name: rejection_kind(r) for p, r in ds.quarantined}
    bad = {k: v for k, v in expected.items() if v not in ("CMYK", "L")}
    assert reasons == bad
    assert len(found) == len(bad)
    assert all(r for _, r in ds.quarantined)
    assert ds.converted == Counter({"CMYK": 1, "L": 1})
    assert len(ds.images) == total - len(bad)
    for item in ds.images:
        assert ds.open_image(item).mode == "RGB"
    summary = ds.summary()
    assert summary["images"] == total - len(bad)
    assert summary["converted_to_rgb"] == {"CMYK": 1, "L": 1}
    assert sum(summary["quarantined_by_kind"].values()) == len(bad)


def test_damaged_catalogue_is_converted_or_quarantined(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    write_catalogue(root, 12, seed=5, progress=False)
    _check_damaged(root, 12, _damage(root))


def test_damaged_copy_of_real_layout(stanford: Path, tmp_path: Path) -> None:
    root = tmp_path / "stanford"
    (root / "cars_train").mkdir(parents=True)
    shutil.copy(stanford / "cars_meta.mat", root)
    annos = read_annotations(stanford / "cars_train_annos.mat")[:10]
    for a in annos:
        shutil.copy(stanford / "cars_train" / a.fname, root / "cars_train" / a.fname)
    rows = [(a.bbox or (0, 0, 1, 1), a.class_index or 1, a.fname) for a in annos]
    (root / "cars_train_annos.mat").write_bytes(annotations_mat_bytes(rows))
    _check_damaged(root, 10, _damage(root))


def test_missing_files_and_bad_labels_are_quarantined_not_dropped(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    write_catalogue(root, 6, seed=1, progress=False)
    (root / "cars_train" / "00002.jpg").unlink()
    rows = [((0, 0, 10, 10), 1, f"{i:05d}.jpg") for i in range(1, 7)]
    rows[3] = ((0, 0, 10, 10), 99, "00004.jpg")
    (root / "cars_train_annos.mat").write_bytes(annotations_mat_bytes(rows))
    ds = load_stanford(root)
    assert len(ds.images) == 4
    assert {p.name: rejection_kind(r) for p, r in ds.quarantined} == {
        "00002.jpg": "unreadable",
        "00004.jpg": "bad-label",
    }
    assert ds.annotations == 6


def test_labelled_test_file_takes_precedence(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    write_catalogue(root, 8, seed=2, progress=False)
    shutil.copytree(root / "cars_train", root / "cars_test")
    rows = [((1, 1, 20, 20), 3, f"{i:05d}.jpg") for i in (1, 2, 3)]
    (root / "cars_test_annos_withlabels.mat").write_bytes(annotations_mat_bytes(rows))
    ds = load_stanford(root)
    assert ds.split_source == "cars_test_annos_withlabels.mat"
    assert ds.split_sizes() == {"train": 8, "test": 3}
    assert {im.image_id for im in ds.split("test")} == {f"cars_test/{i:05d}.jpg" for i in (1, 2, 3)}
    assert all(im.bbox == (1, 1, 20, 20) for im in ds.split("test"))


def test_annotations_in_a_devkit_subfolder(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    write_catalogue(root, 4, seed=2, progress=False)
    (root / "devkit").mkdir()
    for name in ("cars_meta.mat", "cars_train_annos.mat"):
        (root / name).rename(root / "devkit" / name)
    assert len(load_stanford(root).images) == 4


def test_user_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such directory"):
        load_stanford(tmp_path / "absent")
    with pytest.raises(DatasetError, match="Stanford Cars layout"):
        load_stanford(tmp_path)
    (tmp_path / "cars_meta.mat").write_bytes(b"garbage")
    (tmp_path / "cars_train_annos.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a readable MATLAB file"):
        load_stanford(tmp_path)
    with pytest.raises(ConfigError):
        load_stanford(tmp_path, split="validation")


def test_benchmark_split_rule() -> None:
    assert benchmark_split("00001.jpg") == "train"
    assert benchmark_split("08144.jpg") == "test"
    with pytest.raises(ValueError):
        benchmark_split("car.jpg")


def test_colour_sidecar_is_read(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    write_catalogue(root, 6, seed=4, progress=False)
    lines = (root / "labels.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"fname": "00001.jpg", "colour": "Gray"})
    lines.append("not json")
    (root / "labels.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_stanford(root)
    assert ds.images[0].label.colour == "grey"
    assert all(im.label.colour for im in ds.images)


# ----------------------------------------------------------------- the CLI


def _cli() -> typer.Typer:
    root = typer.Typer()

    @root.callback()
    def _settings(ctx: typer.Context) -> None:
        ctx.obj = Settings(max_image_pixels=4_000_000)

    root.add_typer(data_cli.app, name="data")
    return root


def test_inspect_json_on_damaged_catalogue(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    write_catalogue(root, 12, seed=5, progress=False)
    _damage(root)
    result = CliRunner().invoke(_cli(), ["data", "inspect", "--root", str(root), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["images"] == 8 and out["annotations"] == 12 and out["classes"] == 36
    assert out["splits"]["train"] + out["splits"]["test"] == 8
    assert out["quarantined_by_kind"] == {
        "empty": 1,
        "not-an-image": 1,
        "too-many-pixels": 1,
        "truncated": 1,
    }
    assert all(q["reason"] and q["path"] for q in out["quarantined"])
    assert out["converted_to_rgb"] == {"CMYK": 1, "L": 1}


def test_inspect_text_on_real_layout(stanford: Path) -> None:
    result = CliRunner().invoke(_cli(), ["data", "inspect", "--root", str(stanford), "--no-scan"])
    assert result.exit_code == 0, result.output
    assert "images: 8144 usable of 8144 annotated" in result.stdout
    assert "splits: train 4072, test 4072" in result.stdout
    assert "8041 unlabelled test annotations" in result.stdout


def test_inspect_json_on_real_layout(stanford: Path) -> None:
    args = ["data", "inspect", "--root", str(stanford), "--json", "--no-scan"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["images"], out["classes"], out["classes_in_both_splits"]) == (8144, 196, 196)
    assert out["devkit"] == {"classes": 196, "train_annotations": 8144, "unlabelled_test": 8041}


def test_real_mat_layout_matches_what_synth_writes(stanford: Path, tmp_path: Path) -> None:
    real = scipy.io.loadmat(str(stanford / "cars_train_annos.mat"))["annotations"]
    write_catalogue(tmp_path / "cat", 3, progress=False)
    ours = scipy.io.loadmat(str(tmp_path / "cat" / "cars_train_annos.mat"))["annotations"]
    assert ours.dtype.names == real.dtype.names
    assert ours.shape == (1, 3) and real.shape[0] == 1
    meta_real = scipy.io.loadmat(str(stanford / "cars_meta.mat"))["class_names"]
    meta_ours = scipy.io.loadmat(str(tmp_path / "cat" / "cars_meta.mat"))["class_names"]
    assert meta_ours.dtype == meta_real.dtype and meta_ours.shape[0] == 1
