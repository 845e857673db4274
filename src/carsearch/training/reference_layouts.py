"""Directories laid out exactly like google's SigLIP checkpoints, with random weights.

No model hub is reachable where this project is built and tested, so the two real
checkpoints it is meant to serve, `google/siglip-base-patch16-224` and
`google/siglip-so400m-patch14-384`, cannot be downloaded. What can be reproduced is
everything about them except the trained weights:

- `config.json`: the values below are transcribed from the public `config.json` files of
  the two hub repositories. Those files set only what differs from transformers'
  `SiglipTextConfig` / `SiglipVisionConfig` defaults (`HUB_CONFIG`); the defaults they
  rely on (12 layers, text length 64, vocabulary 32,000, image 224, patch 16,
  `gelu_pytorch_tanh`, layer-norm eps 1e-6, pad id 1 and the out-of-vocabulary bos/eos
  ids 49406/49407 that transformers' defaults carry) are spelled out in `LAYOUTS` so a
  change of transformers' defaults cannot silently change the shapes.
- the tokenizer: a `SiglipTokenizer` (transformers' slow, sentencepiece-backed class, as
  the hub ships: `spiece.model` plus `tokenizer_config.json`), `</s>` as both eos and pad
  token, `<unk>`, lowercasing, `model_max_length` 64 and `model_input_names`
  `["input_ids"]` (SigLIP reads no attention mask; it was trained on texts padded to 64
  with `</s>` and pools the last position). The hub's `spiece.model` has 32,000 pieces;
  ours is a unigram model trained here with the `sentencepiece` package on the project's
  vehicle-description corpus, which supports only a few hundred pieces (646 with the
  Stanford Cars class names). It is trained with `hard_vocab_limit=False`, so 32,000 is
  a ceiling rather than a demand, and the model's `vocab_size` stays the real 32,000: the
  weights have exactly the real shapes and parameter counts, and the tokenizer uses the
  first few hundred rows of the embedding table. Piece ids 0/1/2 are `<pad>`/`</s>`/
  `<unk>`, as in the real model.
- `preprocessor_config.json`: SigLIP's preprocessing as published: resize to 224 / 384
  square with bicubic resampling (`resample` 3), rescale by 1/255, normalise with mean
  and std 0.5 (to [-1, 1]). It is written by transformers' PIL-backed SigLIP image
  processor, which records itself as `SiglipImageProcessor` exactly as the hub file does.
- `model.safetensors`: a randomly initialised `SiglipModel` of that config (seeded),
  written with `save_pretrained`, float32 as on the hub (`torch_dtype` float32).

Everything is written with `save_pretrained`, so `AutoModel.from_pretrained(dir)`,
`AutoProcessor.from_pretrained(dir)` and the project's `Encoder` and trainer load such a
directory exactly as they would load the downloaded checkpoint. The so400m layout has
about 878 M parameters (3.5 GB of float32 safetensors); the base layout about 203 M.

Building one needs `sentencepiece` (in the project's dev extra).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from carsearch.platform.models.encoder import quiet_config_check

log = logging.getLogger(__name__)

PAD_PIECE, EOS_PIECE, UNK_PIECE = "<pad>", "</s>", "<unk>"
TEXT_MAX_LENGTH = 64
VOCAB_SIZE = 32000
# Every file a real checkpoint directory of these two repositories holds that matters
# for loading (the hub also has README.md, .gitattributes and a flax/`open_clip` copy).
LAYOUT_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "spiece.model",
    "tokenizer_config.json",
)


@dataclass(frozen=True)
class Tower:
    """One tower's shape, as in the published config.json (defaults made explicit)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int


@dataclass(frozen=True)
class ReferenceLayout:
    """A real SigLIP checkpoint's layout: its hub id, towers, image and patch size."""

    name: str
    hub_id: str
    text: Tower
    vision: Tower
    image_size: int
    patch_size: int
    text_max_length: int = TEXT_MAX_LENGTH
    vocab_size: int = VOCAB_SIZE

    def text_config(self) -> dict[str, Any]:
        return {
            "model_type": "siglip_text_model",
            "vocab_size": self.vocab_size,
            "hidden_size": self.text.hidden_size,
            "intermediate_size": self.text.intermediate_size,
            "num_hidden_layers": self.text.num_hidden_layers,
            "num_attention_heads": self.text.num_attention_heads,
            "max_position_embeddings": self.text_max_length,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "attention_dropout": 0.0,
            "pad_token_id": 1,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
        }

    def vision_config(self) -> dict[str, Any]:
        return {
            "model_type": "siglip_vision_model",
            "hidden_size": self.vision.hidden_size,
            "intermediate_size": self.vision.intermediate_size,
            "num_hidden_layers": self.vision.num_hidden_layers,
            "num_attention_heads": self.vision.num_attention_heads,
            "num_channels": 3,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "attention_dropout": 0.0,
        }


# Transcribed from https://huggingface.co/google/siglip-base-patch16-224/blob/main/config.json
# and https://huggingface.co/google/siglip-so400m-patch14-384/blob/main/config.json: the
# keys those files set (besides "architectures": ["SiglipModel"], "initializer_factor":
# 1.0, "model_type": "siglip", "torch_dtype": "float32"). Everything else is a default.
HUB_CONFIG: dict[str, dict[str, dict[str, Any]]] = {
    "base": {
        "text_config": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "model_type": "siglip_text_model",
            "num_attention_heads": 12,
            "vocab_size": 32000,
        },
        "vision_config": {"model_type": "siglip_vision_model", "patch_size": 16},
    },
    "so400m": {
        "text_config": {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "model_type": "siglip_text_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
        },
        "vision_config": {
            "hidden_size": 1152,
            "image_size": 384,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
        },
    },
}

LAYOUTS: dict[str, ReferenceLayout] = {
    "base": ReferenceLayout(
        name="base",
        hub_id="google/siglip-base-patch16-224",
        text=Tower(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12),
        vision=Tower(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12),
        image_size=224,
        patch_size=16,
    ),
    "so400m": ReferenceLayout(
        name="so400m",
        hub_id="google/siglip-so400m-patch14-384",
        text=Tower(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                   num_attention_heads=16),
        vision=Tower(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                     num_attention_heads=16),
        image_size=384,
        patch_size=14,
    ),
}


def layout(name: str) -> ReferenceLayout:
    """The layout named "base" or "so400m" (or by its hub id)."""
    for item in LAYOUTS.values():
        if name in (item.name, item.hub_id):
            return item
    raise KeyError(f"unknown reference layout {name!r}: one of {', '.join(LAYOUTS)}")


def siglip_config(spec: ReferenceLayout) -> Any:
    """The `SiglipConfig` of a layout."""
    from transformers import SiglipConfig

    with quiet_config_check():
        return SiglipConfig(
            text_config=spec.text_config(),
            vision_config=spec.vision_config(),
            initializer_factor=1.0,
        )


def _sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError as exc:  # pragma: no cover - a dev dependency
        raise ImportError(
            "building a reference layout needs the sentencepiece package "
            "(pip install -e '.[dev]' or pip install sentencepiece)"
        ) from exc
    return sentencepiece


def train_spiece(lines: Iterable[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    """A unigram SentencePiece model (the bytes of `spiece.model`) trained on `lines`.

    Ids 0, 1, 2 are `<pad>`, `</s>`, `<unk>` and there is no bos, as in SigLIP's
    `spiece.model`. `vocab_size` is a ceiling (`hard_vocab_limit=False`): a small corpus
    yields fewer pieces.
    """
    spm = _sentencepiece()
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in lines if line.strip()]),
        model_writer=out,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece=PAD_PIECE,
        eos_piece=EOS_PIECE,
        unk_piece=UNK_PIECE,
        num_threads=1,  # deterministic, and two cores are all there is
        minloglevel=2,
    )
    return out.getvalue()


def default_corpus() -> list[str]:
    """The text the tokenizer is trained on: the compact base's vehicle corpus."""
    from carsearch.training.base_model import stanford_class_names, vehicle_corpus

    return list(vehicle_corpus(stanford_class_names()))


def siglip_tokenizer(spiece_path: Path, max_length: int = TEXT_MAX_LENGTH) -> Any:
    """transformers' slow `SiglipTokenizer` over a `spiece.model`, set up as google's."""
    _sentencepiece()
    from transformers import SiglipTokenizer

    return SiglipTokenizer(
        vocab_file=str(spiece_path),
        eos_token=EOS_PIECE,
        unk_token=UNK_PIECE,
        pad_token=EOS_PIECE,
        do_lower_case=True,
        model_max_length=max_length,
        model_input_names=["input_ids"],
    )


def siglip_image_processor(image_size: int) -> Any:
    """SigLIP's published preprocessing: bicubic resize, 1/255, mean/std 0.5."""
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # PIL.Image.BICUBIC
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def random_model(config: Any, seed: int) -> Any:
    """A `SiglipModel` with transformers' own random initialisation, fixed by `seed`."""
    from transformers import SiglipModel

    devices: list[int] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = SiglipModel(config)
    return model.eval()


def build_reference_layout(
    name: str,
    out_dir: Path,
    *,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    spec: ReferenceLayout | None = None,
) -> Path:
    """Write the `name` layout ("base" or "so400m") into `out_dir`; return `out_dir`.

    The same seed and corpus give the same files. Peak memory is about one copy of the
    float32 weights (3.5 GB for so400m) plus what `save_pretrained` buffers. `spec`, when
    given, replaces the named layout's shapes (the tests drive the so400m layout's depth,
    heads, patch and image size at narrow widths this way).
    """
    spec = spec or layout(name)
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    spiece = out_dir / "spiece.model"
    spiece.write_bytes(train_spiece(corpus if corpus is not None else default_corpus()))
    tokenizer = siglip_tokenizer(spiece, spec.text_max_length)
    tokenizer.save_pretrained(out_dir)
    siglip_image_processor(spec.image_size).save_pretrained(out_dir)
    model = random_model(siglip_config(spec), seed)
    with quiet_config_check():
        model.save_pretrained(out_dir, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    log.info(
        "built the %s layout (%s, %d parameters, %d tokenizer pieces) in %s in %.1f s",
        spec.name, spec.hub_id, n, len(tokenizer), out_dir, time.perf_counter() - start,
    )
    return out_dir
