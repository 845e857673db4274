"""The real SigLIP checkpoint layouts, end to end: google/siglip-base-patch16-224 and
google/siglip-so400m-patch14-384 with random weights (training/reference_layouts.py).

Each layout is built once (its config, a SiglipTokenizer over a locally trained
spiece.model, the real image preprocessing), then driven through the platform as the
downloaded checkpoint would be: the Encoder loads it with from_pretrained, text is padded
to 64 with </s> as SigLIP was trained, it is published and serves, images are ingested
into Milvus Lite + SQLite, the trainer runs two LoRA steps on q_proj/v_proj of both
towers (batch 2), the merged model is published and promoted (re-indexing every image),
and search answers from the new version.

The base layout runs at its real size (203 M parameters). The so400m layout's real size
(878 M parameters, 3.5 GB of float32 written four times, 9.3 GB peak RSS, 5.8-6.9 min on
2 cores) is checked without its weights: both architectures are built on PyTorch's meta
device from the same config, and their parameter count and every tensor's name and shape
are compared with the published checkpoints' (and, for base, with the file the real build
wrote). The so400m layout is then driven end to end at narrow widths (`NARROW`): its
published depth (27 layers a tower), heads (16), patch (14), image size (384), vocabulary
and text length, with 64-wide layers instead of 1152 (the LoRA wrapping, the merge, the
padding and the 27x27 patch grid are what the widths do not change).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import SiglipTokenizer  # needs sentencepiece (a main dependency)

from carsearch.ingest.worker import IngestWorker
from carsearch.lifecycle.reindex import promote_with_backfill
from carsearch.platform.errors import ModelNotFoundError
from carsearch.platform.models.encoder import Encoder
from carsearch.training.reference_layouts import (
    EOS_PIECE,
    HUB_CONFIG,
    LAYOUT_FILES,
    TEXT_MAX_LENGTH,
    ReferenceLayout,
    Tower,
    build_reference_layout,
    layout,
    siglip_config,
)
from carsearch.training.trainer import LORA_TARGETS, base_is_pretrained, load_base, train
from ingest_world import assert_invariant, make_image, world
from train_helpers import tiny_catalogue, tiny_config

# Parameter counts of the two architectures (the published checkpoints' 203.2 M and 878.0 M).
PARAMETERS = {"base": 203_155_970, "so400m": 877_960_498}
LORA_RANK = 4
# The so400m layout as the end-to-end test drives it: its depth and heads, narrow widths.
NARROW = Tower(hidden_size=64, intermediate_size=128, num_hidden_layers=27,
               num_attention_heads=16)


def driven(name: str) -> ReferenceLayout:
    """The layout the module builds: base as published, so400m at `NARROW` widths."""
    spec = layout(name)
    return spec if name == "base" else replace(spec, text=NARROW, vision=NARROW)


def meta_shapes(spec: ReferenceLayout) -> dict[str, tuple[int, ...]]:
    """Every tensor a `SiglipModel` of the layout saves, with its shape: built on the meta
    device (no memory, no weights), from the same config the build writes."""
    from transformers import SiglipModel

    with torch.device("meta"):
        model = SiglipModel(siglip_config(spec))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@contextmanager
def phase(times: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    times[name] = round(time.perf_counter() - start, 1)


@pytest.fixture(scope="module", params=["base", "so400m"])
def reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """(layout name, directory), as `driven` shapes it; removed afterwards."""
    name: str = request.param
    root = tmp_path_factory.mktemp(f"layout-{name}")
    start = time.perf_counter()
    out = build_reference_layout(name, root / layout(name).hub_id.split("/")[1], seed=0,
                                 spec=driven(name))
    print(f"\n[{name}] layout built in {time.perf_counter() - start:.1f} s")
    try:
        yield name, out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118


def _tensor(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


@pytest.mark.parametrize("name", ["base", "so400m"])
def test_the_architecture_has_the_published_shapes(name: str) -> None:
    """The real-size config and every tensor's shape, without the weights: the parameter
    count is the published checkpoint's, the config carries the hub's values."""
    spec = layout(name)
    config = json.loads(siglip_config(spec).to_json_string(use_diff=True))
    for tower, values in HUB_CONFIG[name].items():
        assert {k: config[tower][k] for k in values} == values, tower
    text, vision = config["text_config"], config["vision_config"]
    assert text["vocab_size"] == 32000 and text["max_position_embeddings"] == 64
    assert (vision["image_size"], vision["patch_size"]) == (spec.image_size, spec.patch_size)
    assert text["num_hidden_layers"] == vision["num_hidden_layers"] == (
        12 if name == "base" else 27)
    shapes = meta_shapes(spec)
    assert sum(int(torch.Size(s).numel()) for s in shapes.values()) == PARAMETERS[name]
    assert shapes["text_model.embeddings.token_embedding.weight"] == (32000, text["hidden_size"])
    patches = (spec.image_size // spec.patch_size) ** 2  # 196 and 729 (27 x 27)
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (
        patches, vision["hidden_size"])
    width = spec.vision.hidden_size
    for tower in ("text_model", "vision_model"):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            key = f"{tower}.encoder.layers.{spec.vision.num_hidden_layers - 1}.self_attn.{proj}"
            assert shapes[f"{key}.weight"] == (width, width), key


def test_the_layout_matches_the_published_checkpoint(reference: tuple[str, Path]) -> None:
    name, path = reference
    spec = driven(name)
    assert {p.name for p in path.iterdir()} == set(LAYOUT_FILES)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "siglip" and config["architectures"] == ["SiglipModel"]
    widths = {"hidden_size", "intermediate_size"} if name == "so400m" else set()  # NARROW
    for tower, values in HUB_CONFIG[name].items():
        want = {k: v for k, v in values.items() if k not in widths}
        assert {k: config[tower][k] for k in want} == want, tower
    text, vision = config["text_config"], config["vision_config"]
    assert text["vocab_size"] == 32000 and text["max_position_embeddings"] == 64
    assert (vision["image_size"], vision["patch_size"]) == (spec.image_size, spec.patch_size)
    assert text["num_hidden_layers"] == vision["num_hidden_layers"] == (
        12 if name == "base" else 27)
    shapes = _safetensors_shapes(path / "model.safetensors")
    # What the build wrote is what the meta-device model of the same layout holds (so the
    # real-size so400m check above, made that way, speaks for the file it would write).
    assert shapes == meta_shapes(spec)
    if name == "base":
        assert sum(int(torch.Size(s).numel()) for s in shapes.values()) == PARAMETERS[name]
    assert shapes["text_model.embeddings.token_embedding.weight"] == (32000, text["hidden_size"])
    patches = (spec.image_size // spec.patch_size) ** 2
    assert shapes["vision_model.embeddings.position_embedding.weight"] == (
        patches, vision["hidden_size"])

    pre = json.loads((path / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "SiglipImageProcessor"
    assert pre["size"] == {"height": spec.image_size, "width": spec.image_size}
    assert (pre["resample"], pre["rescale_factor"]) == (3, 1 / 255)
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]
    assert pre["do_resize"] and pre["do_rescale"] and pre["do_normalize"]
    tok = json.loads((path / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "SiglipTokenizer"
    assert (tok["model_max_length"], tok["model_input_names"]) == (64, ["input_ids"])
    assert tok["eos_token"] == tok["pad_token"] == EOS_PIECE and tok["do_lower_case"]
    # Nothing marks it as the compact base: the trainer treats it as pre-trained (LoRA).
    assert base_is_pretrained(str(path))


class TokenizerSpy:
    """Records how every SiglipTokenizer call was padded and what it returned."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, Any]] = []
        original = SiglipTokenizer.__call__

        def spy(tokenizer: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(tokenizer, *args, **kwargs)
            ids = torch.as_tensor(out["input_ids"])
            self.calls.append({"padding": kwargs.get("padding"),
                               "max_length": kwargs.get("max_length"),
                               "shape": tuple(ids.shape), "last": ids[..., -1].tolist(),
                               "keys": sorted(out.keys())})
            return out

        monkeypatch.setattr(SiglipTokenizer, "__call__", spy)

    def check(self) -> None:
        assert self.calls
        for call in self.calls:
            assert call["padding"] == "max_length", call
            assert call["max_length"] == TEXT_MAX_LENGTH and call["shape"][-1] == 64, call
            assert set(call["last"]) == {1}, call  # the last position is always </s>
            assert call["keys"] == ["input_ids"], call  # no attention mask, as trained


def test_load_train_publish_reindex_search(
    reference: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    make_database
) -> None:
    name, path = reference
    spec = driven(name)
    dim = spec.vision.hidden_size
    built = sum(int(torch.Size(s).numel()) for s in meta_shapes(spec).values())
    times: dict[str, float] = {}
    spy = TokenizerSpy(monkeypatch)

    with phase(times, "encoder load + 1 text"):
        enc = Encoder(path, batch_size=2, torch_threads=2)
        vec = enc.encode_text(["Red 2012 Chevy pickup!"])
    loaded = enc._load()
    assert type(loaded.model).__name__ == "SiglipModel"
    assert isinstance(loaded.processor.tokenizer, SiglipTokenizer)
    assert loaded.text_max_length == 64 and enc.dim == dim and vec.shape == (1, dim)
    assert loaded.processor.tokenizer.pad_token_id == loaded.processor.tokenizer.eos_token_id == 1
    spy.check()
    del enc, loaded

    p = world(tmp_path, make_database("sqlite").url, path, str(tmp_path / "milvus.db"))
    try:
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        for i in range(2):
            make_image(inbox / f"car{i}.png", i, size=(96, 72))
        (inbox / "car0.png.json").write_text(json.dumps({"make": "Ford", "colour": "red"}))
        with phase(times, "ingest 2 images (v1)"):
            assert IngestWorker(p, inbox=inbox, batch_size=2).run_once().summary.indexed == 2
        ids = assert_invariant(p)

        catalogue = tiny_catalogue(tmp_path / "catalogue", n=8)
        cfg = tiny_config(catalogue, path, tmp_path / "run", steps=2, batch_size=2, limit=2,
                          full=None, lora_rank=LORA_RANK)
        with phase(times, "train 2 LoRA steps, merge, save"):
            result = train(cfg)
        assert result.finished and not result.full and result.model_dir is not None
        assert len(result.counters.losses) == 2
        assert all(loss == loss and loss > 0 for loss in result.counters.losses)  # finite
        # LoRA on q_proj and v_proj of every layer of both towers, and the two scalars:
        # each wrapped d x d matrix trains r*d + d*r parameters.
        layers = spec.vision.num_hidden_layers
        assert spec.text.num_hidden_layers == layers and spec.text.hidden_size == dim
        assert result.trainable_parameters == 2 * layers * len(LORA_TARGETS) * (
            2 * LORA_RANK * dim) + 2
        assert result.parameters == built + result.trainable_parameters - 2

        with phase(times, "publish merged (v2)"):
            v2 = p.registry.publish(result.model_dir, name="v2", base_model=spec.hub_id)
        shutil.rmtree(result.model_dir)  # the registry holds the copy
        merged = Path(v2.artifact_path) / "model.safetensors"
        base = path / "model.safetensors"
        assert not any("lora" in key for key in _safetensors_shapes(merged))
        for tower in ("text_model", "vision_model"):
            prefix = f"{tower}.encoder.layers.{layers - 1}.self_attn"
            for proj, trained in (("q_proj", True), ("v_proj", True), ("k_proj", False),
                                  ("out_proj", False)):
                key = f"{prefix}.{proj}.weight"
                same = torch.equal(_tensor(base, key), _tensor(merged, key))
                assert same is not trained, key
        assert json.loads((merged.parent / "config.json").read_text())["vision_config"][
            "image_size"] == spec.image_size

        with phase(times, "promote v2 + re-index 2 images"):
            _, report = promote_with_backfill(p, "v2", progress=False)
        assert report.embedded == 2 and p.store.alias_target() == "carsearch_v2"
        assert assert_invariant(p) == ids

        with phase(times, "search (text, similar)"):
            res = p.search.search_text("red ford", k=5)
            assert res.version == "v2" and {h.image_id for h in res.hits} == ids
            first = res.hits[0].image_id
            similar = p.search.search_similar(first, k=2)
        assert similar.hits[0].image_id == first
        assert abs(similar.hits[0].score - 1.0) < 1e-3
        spy.check()  # training, ingest and search all padded to 64
    finally:
        p.close()
        shutil.rmtree(p.settings.model_dir, ignore_errors=True)  # v1 and v2
    print(f"\n[{name}] phases (s): {times}")


def test_a_missing_sentencepiece_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without sentencepiece, transformers cannot build google's SiglipTokenizer and raises
    ImportError; the encoder and the trainer say so as a ModelNotFoundError (one line in
    the CLI), not a stack trace. (Simulated: the package is a dev dependency here.)"""
    import transformers

    def no_sentencepiece(*args: Any, **kwargs: Any) -> Any:
        raise ImportError("\nSiglipTokenizer requires the SentencePiece library but it was "
                          "not found in your environment.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", no_sentencepiece)
    with pytest.raises(ModelNotFoundError, match="requires the SentencePiece library"):
        Encoder(tmp_path).load()
    with pytest.raises(ModelNotFoundError, match="requires the SentencePiece library"):
        load_base(str(tmp_path))
