"""The compact SigLIP base: a real SiglipModel that the Auto classes load like any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor, SiglipModel, SiglipProcessor
from typer.testing import CliRunner

from carsearch.cli.base import app
from carsearch.platform.errors import CarsearchError
from carsearch.training.base_model import (
    BUILD_INFO,
    EOS_TOKEN,
    INIT_LOGIT_BIAS,
    build_compact_base,
    stanford_class_names,
)

EXTRA = ["zxq roadrunner"] * 3
CLASS_NAMES = [
    "Chevrolet Silverado 1500 Extended Cab 2012",
    "Mercedes-Benz C-Class Sedan 2012",
    "BMW M3 Coupe 2012",
    "Ford F-150 Regular Cab 2007",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "model"
    return build_compact_base(out, seed=7, class_names=CLASS_NAMES, corpus=EXTRA)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModel.from_pretrained(path).state_dict()


def test_auto_classes_load_a_siglip_model_and_processor(base_dir: Path) -> None:
    model = AutoModel.from_pretrained(base_dir)
    processor = AutoProcessor.from_pretrained(base_dir)
    assert isinstance(model, SiglipModel)
    assert isinstance(processor, SiglipProcessor)
    assert processor.image_processor.size == {"height": 64, "width": 64}
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    assert list(processor.image_processor.image_std) == [0.5, 0.5, 0.5]
    vision = model.config.vision_config
    text = model.config.text_config
    assert (vision.image_size, vision.patch_size) == (64, 16)
    # Both towers project into the same space.
    assert text.projection_size == vision.hidden_size
    assert text.vocab_size == len(processor.tokenizer)


def test_round_trip_keeps_every_weight(base_dir: Path, tmp_path: Path) -> None:
    model = AutoModel.from_pretrained(base_dir)
    model.save_pretrained(tmp_path)
    again = _weights(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again[name]), name


def test_build_info_describes_the_model(base_dir: Path) -> None:
    info = json.loads((base_dir / BUILD_INFO).read_text())
    model = AutoModel.from_pretrained(base_dir)
    assert info["seed"] == 7
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert 1_000_000 < info["parameters"] < 10_000_000
    assert info["embedding_dim"] == model.config.vision_config.hidden_size
    assert info["pretrained"] is False


def test_temperature_and_bias_start_for_small_batches(base_dir: Path) -> None:
    model = AutoModel.from_pretrained(base_dir)
    assert model.logit_scale.exp().item() == pytest.approx(10.0)
    assert model.logit_bias.item() == pytest.approx(INIT_LOGIT_BIAS)
    assert -5.0 < INIT_LOGIT_BIAS < -3.0  # about -log(64), not the paper's -10


def test_untrained_text_embeddings_are_not_collapsed(base_dir: Path) -> None:
    model = AutoModel.from_pretrained(base_dir)
    tokenizer = AutoProcessor.from_pretrained(base_dir).tokenizer
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert torch.count_nonzero(model.text_model.embeddings.token_embedding.weight[eos_id]) == 0
    texts = ["Audi A4 Wagon 2006", "red pickup truck", "a photo of a car", "bmw m3 coupe"]
    ids = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids)
    emb = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)
    off_diagonal = (emb @ emb.T)[~torch.eye(len(texts), dtype=torch.bool)]
    assert off_diagonal.mean().item() < 0.85


def test_tokenizer_pads_right_to_max_length_ending_in_pad(base_dir: Path) -> None:
    tokenizer = AutoProcessor.from_pretrained(base_dir).tokenizer
    max_len = AutoModel.from_pretrained(base_dir).config.text_config.max_position_embeddings
    texts = ["Red 2012 Chevy Silverado", "bmw", "a b c d e f g h i j k l m n o p q r s t u v"]
    ids = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (3, max_len)
    assert tokenizer.pad_token == EOS_TOKEN
    # The last position, the one SigLIP pools, is the pad token for every text,
    # including one truncated to fit.
    assert (ids[:, -1] == tokenizer.pad_token_id).all()
    short = tokenizer.convert_ids_to_tokens(ids[1])
    assert short[0] != EOS_TOKEN and short[-1] == EOS_TOKEN
    first_pad = short.index(EOS_TOKEN)
    assert all(tok == EOS_TOKEN for tok in short[first_pad:])


def test_tokenizer_lowercases_and_knows_vehicle_words(base_dir: Path) -> None:
    tokenizer = AutoProcessor.from_pretrained(base_dir).tokenizer
    assert tokenizer("RED CHEVY").input_ids == tokenizer("red chevy").input_ids
    # Words of the built-in corpus and of the extra corpus are whole tokens.
    for word in ("silverado", "chevy", "pickup", "2012", "roadrunner"):
        pieces = tokenizer.tokenize(word)
        assert len(pieces) == 1, (word, pieces)
    assert tokenizer.unk_token_id not in tokenizer("zebra 1999 coupé").input_ids


def test_same_seed_builds_identical_model(base_dir: Path, tmp_path: Path) -> None:
    again = build_compact_base(
        tmp_path / "again", seed=7, class_names=CLASS_NAMES, corpus=EXTRA
    )
    first, second = _weights(base_dir), _weights(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (base_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_other_seed_builds_other_weights(base_dir: Path, tmp_path: Path) -> None:
    other = build_compact_base(
        tmp_path / "other", seed=8, class_names=CLASS_NAMES, corpus=EXTRA
    )
    name = "text_model.embeddings.token_embedding.weight"
    assert not torch.equal(_weights(base_dir)[name], _weights(other)[name])


def test_image_size_must_fit_patches(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple"):
        build_compact_base(tmp_path, image_size=60, class_names=CLASS_NAMES)


def test_stanford_class_names_read_from_meta(stanford_root: Path) -> None:
    names = stanford_class_names(stanford_root / "cars_meta.mat")
    assert len(names) == 196
    assert "Chevrolet Silverado 1500 Extended Cab 2012" in names


def test_stanford_class_names_absent_file_gives_none(tmp_path: Path) -> None:
    assert stanford_class_names(tmp_path / "nope.mat") == []


def test_cli_builds_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "cli-model"
    runner = CliRunner()
    result = runner.invoke(app, ["build", "--out", str(out), "--seed", "3", "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    info = json.loads((out / BUILD_INFO).read_text())
    assert f"{info['parameters']:,}" in result.output
    assert AutoModel.from_pretrained(out).config.vision_config.image_size == 32

    refused = runner.invoke(app, ["build", "--out", str(out)])
    assert refused.exit_code != 0
    assert isinstance(refused.exception, CarsearchError)
    assert "--force" in str(refused.exception)

    forced = runner.invoke(app, ["build", "--out", str(out), "--seed", "4", "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / BUILD_INFO).read_text())["seed"] == 4
