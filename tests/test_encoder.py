"""The Encoder against a real compact SigLIP built into a temp dir (and a real LoRA)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AutoModel

from carsearch.platform.errors import ModelNotFoundError
from carsearch.platform.models.encoder import Encoder
from carsearch.training.base_model import INIT_LOGIT_BIAS, build_compact_base

CLASS_NAMES = ["Chevrolet Silverado 1500 Extended Cab 2012", "BMW M3 Coupe 2012"]
TEXTS = [
    "red 2012 chevy silverado pickup",
    "older model mercedes coupe",
    "white bmw m3",
    "blue ford f-150 regular cab from '07",
    "a black suv",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_compact_base(
        tmp_path_factory.mktemp("enc") / "base", seed=1, class_names=CLASS_NAMES
    )


@pytest.fixture(scope="module")
def encoder(model_dir: Path) -> Encoder:
    return Encoder(model_dir, batch_size=64, torch_threads=1)


def _images(n: int) -> list[Image.Image]:
    """Real PIL images of different sizes, modes and content."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        h, w = 40 + 7 * i, 90 - 5 * i
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


def _unit_rows(x: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5))


def test_text_vectors_are_unit_float32(encoder: Encoder, model_dir: Path) -> None:
    vectors = encoder.encode_text(TEXTS)
    dim = AutoModel.from_pretrained(model_dir).config.vision_config.hidden_size
    assert encoder.dim == dim
    assert vectors.shape == (len(TEXTS), dim)
    assert vectors.dtype == np.float32
    assert _unit_rows(vectors)


def test_image_vectors_are_unit_float32(encoder: Encoder) -> None:
    vectors = encoder.encode_images(_images(4))
    assert vectors.shape == (4, encoder.dim)
    assert vectors.dtype == np.float32
    assert _unit_rows(vectors)


def test_empty_input_gives_empty_array(encoder: Encoder) -> None:
    assert encoder.encode_text([]).shape == (0, encoder.dim)
    assert encoder.encode_images([]).shape == (0, encoder.dim)
    assert encoder.encode_text([]).dtype == np.float32


def test_batching_matches_one_batch(encoder: Encoder, model_dir: Path) -> None:
    small = Encoder(model_dir, batch_size=2)
    assert np.allclose(small.encode_text(TEXTS), encoder.encode_text(TEXTS), atol=1e-5)
    images = _images(5)
    assert np.allclose(small.encode_images(images), encoder.encode_images(images), atol=1e-5)


def test_same_text_same_vector_other_text_other_vector(encoder: Encoder) -> None:
    vectors = encoder.encode_text(["white bmw m3", "red chevy pickup", "white bmw m3"])
    assert np.allclose(vectors[0], vectors[2], atol=1e-6)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
    # The same text alone and within a batch: padding makes every text the same length.
    alone = encoder.encode_text(["white bmw m3"])
    assert np.allclose(alone[0], vectors[0], atol=1e-5)


def test_text_longer_than_the_model_is_truncated(encoder: Encoder) -> None:
    long_text = " ".join(["very"] * 200) + " red pickup"
    vectors = encoder.encode_text([long_text])
    assert vectors.shape == (1, encoder.dim)
    assert _unit_rows(vectors)


def test_images_of_any_mode_are_converted_to_rgb(encoder: Encoder) -> None:
    rgb = _images(1)[0]
    as_gray = rgb.convert("L")
    as_rgba = rgb.convert("RGBA")
    vectors = encoder.encode_images([rgb, as_rgba, as_gray, as_gray.convert("RGB")])
    assert np.allclose(vectors[0], vectors[1], atol=1e-5)  # opaque alpha changes nothing
    assert np.allclose(vectors[2], vectors[3], atol=1e-5)  # gray is converted like RGB
    assert not np.allclose(vectors[0], vectors[2], atol=1e-3)


def test_real_photos_encode(encoder: Encoder, stanford_root: Path) -> None:
    files = sorted((stanford_root / "cars_train").glob("*.jpg"))[:3]
    assert files, f"no Stanford Cars photos in {stanford_root / 'cars_train'}"
    photos = [Image.open(f) for f in files]
    vectors = encoder.encode_images(photos)
    assert vectors.shape == (3, encoder.dim)
    assert _unit_rows(vectors)


def test_logit_scale_and_bias_come_from_the_model(encoder: Encoder) -> None:
    assert np.exp(encoder.logit_scale) == pytest.approx(10.0)
    assert encoder.logit_bias == pytest.approx(INIT_LOGIT_BIAS)


def test_loads_lazily_and_once_across_threads(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    enc = Encoder(model_dir)
    assert not enc.loaded
    assert enc.model_id == str(model_dir)
    with (
        caplog.at_level(logging.INFO, logger="carsearch.platform.models.encoder"),
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        dims = list(pool.map(lambda _: enc.dim, range(8)))
    assert enc.loaded
    assert set(dims) == {enc.dim}
    loads = [r for r in caplog.records if r.getMessage().startswith("loading encoder")]
    assert len(loads) == 1


def test_missing_model_directory_raises_model_not_found(tmp_path: Path) -> None:
    enc = Encoder(tmp_path / "nowhere")  # constructing never loads
    with pytest.raises(ModelNotFoundError, match="nowhere") as info:
        enc.encode_text(["red car"])
    assert "\n" not in str(info.value)


def test_directory_without_a_model_raises_model_not_found(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotFoundError) as info:
        Encoder(tmp_path).encode_images(_images(1))
    assert "\n" not in str(info.value)


def test_invalid_hub_id_raises_model_not_found() -> None:
    # Not a valid repo id, so it fails before any network access.
    with pytest.raises(ModelNotFoundError):
        Encoder("not a valid / model id!!").load()


def test_unknown_hub_id_offline_raises_model_not_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Offline: the local cache has no such model and the hub is not asked.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="nobody/no-such-siglip") as info:
        Encoder("nobody/no-such-siglip").load()
    assert "\n" not in str(info.value)


def test_concurrent_text_encoding_agrees(encoder: Encoder) -> None:
    expected = encoder.encode_text(TEXTS)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: encoder.encode_text(TEXTS), range(8)))
    for got in results:
        assert np.allclose(got, expected, atol=1e-5)


def _save_lora(model_dir: Path, out: Path, *, random_b: bool) -> Path:
    base = AutoModel.from_pretrained(model_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        # False: both LoRA matrices random, so the adapter changes the model;
        # True (peft's default): B is zero, so the merged model equals the base.
        init_lora_weights=not random_b,
    )
    get_peft_model(base, config).save_pretrained(out)
    return out


def test_lora_adapter_changes_the_vectors(
    encoder: Encoder, model_dir: Path, tmp_path: Path
) -> None:
    adapter = _save_lora(model_dir, tmp_path / "lora", random_b=True)
    tuned = Encoder(model_dir, adapter=adapter)
    assert tuned.model_id.endswith(str(adapter))
    images = _images(3)
    tuned_text, tuned_images = tuned.encode_text(TEXTS), tuned.encode_images(images)
    assert _unit_rows(tuned_text) and _unit_rows(tuned_images)
    assert not np.allclose(tuned_text, encoder.encode_text(TEXTS), atol=1e-3)
    assert not np.allclose(tuned_images, encoder.encode_images(images), atol=1e-3)


def test_zero_lora_adapter_leaves_the_vectors(
    encoder: Encoder, model_dir: Path, tmp_path: Path
) -> None:
    adapter = _save_lora(model_dir, tmp_path / "zero", random_b=False)
    tuned = Encoder(model_dir, adapter=adapter)
    assert np.allclose(tuned.encode_text(TEXTS), encoder.encode_text(TEXTS), atol=1e-5)


def test_missing_adapter_raises_model_not_found(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="adapter"):
        Encoder(model_dir, adapter=tmp_path / "no-adapter").load()


def test_batch_size_must_be_positive(model_dir: Path) -> None:
    with pytest.raises(ValueError):
        Encoder(model_dir, batch_size=0)
