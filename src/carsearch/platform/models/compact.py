"""The compact pretrained dual encoder: EfficientNet-Lite0 images, WordLlama-initialised text.

A `transformers` model of its own type (`carsearch_compact`), registered with `AutoConfig`
and `AutoModel` when this module is imported (the encoder's loader and the trainer import
it before `AutoModel.from_pretrained`), so a saved version loads like any SigLIP
checkpoint and exposes what the project uses of `SiglipModel`: `get_text_features`,
`get_image_features`, `logit_scale`, `logit_bias`, `config.text_config.projection_size`
and `config.text_config.max_position_embeddings`.

- Image tower: EfficientNet-Lite0 (`efficientnet_lite_pytorch`'s architecture) up to its
  last convolution, global average pooling (1280-d), a layer norm, a linear projection.
  Its batch norms always run with their running statistics (`train()` keeps them in eval mode): the
  batches two CPU cores afford are too small to re-estimate them.
- Text tower: token embeddings (the WordLlama 256-d Llama-2 token embeddings at build
  time), learned positions, a few pre-norm transformer layers whose residual branches
  start at zero (so an untrained tower is the mean of its token embeddings, and training
  learns what word order adds), a masked mean pool and an MLP projection. The attention
  mask is read from the ids (`pad_token_id`), so callers pass `input_ids` only, as they
  do for SigLIP.

The weights live in the version's own safetensors; the weight packages are only read by
`carsearch base build` (training/pretrained_base.py).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel

MODEL_TYPE = "carsearch_compact"
BACKBONE = "efficientnet-lite0"
BACKBONE_FEATURES = 1280
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# LoRA targets (peft regex, full match): the text tower's attention and MLP linears, its
# projection MLP (all a tower without layers has), and the image tower's 1x1 expansion /
# projection convolutions (groups 1, no padding, so a LoRA convolution beside them sees
# what they see).
LORA_TARGETS = (
    r".*text_model\.layers\.\d+\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"
    r"|.*text_model\.projection\.(0|2)"
    r"|.*vision_model\.backbone\._blocks\.\d+\.(_expand_conv|_project_conv)"
)


@strict
class CompactTextConfig(PreTrainedConfig):
    model_type = "carsearch_compact_text"
    base_config_key = "text_config"

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 1
    num_attention_heads: int = 4
    max_position_embeddings: int = 32
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    projection_size: int = 256


@strict
class CompactVisionConfig(PreTrainedConfig):
    model_type = "carsearch_compact_vision"
    base_config_key = "vision_config"

    backbone: str = BACKBONE
    hidden_size: int = BACKBONE_FEATURES  # the pooled backbone features
    image_size: int = 160
    num_channels: int = 3
    projection_size: int = 256


@strict
class CompactConfig(PreTrainedConfig):
    model_type = MODEL_TYPE
    sub_configs_defaults: ClassVar[dict[str, Any]] = {
        "text_config": CompactTextConfig,
        "vision_config": CompactVisionConfig,
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    logit_scale_init: float = math.log(10.0)
    logit_bias_init: float = -10.0


class TextLayer(nn.Module):
    """A pre-norm transformer layer; both residual branches start at zero."""

    def __init__(self, config: CompactTextConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(d, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, d)
        for zero in (self.out_proj, self.fc2):
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.norm1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        keep = mask[:, None, None, :].bool()
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        x = x + self.out_proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CompactTextModel(nn.Module):
    def __init__(self, config: CompactTextConfig) -> None:
        super().__init__()
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else -1
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        nn.init.normal_(self.position_embedding.weight, std=0.01)
        self.layers = nn.ModuleList(TextLayer(config) for _ in range(config.num_hidden_layers))
        d, p = config.hidden_size, config.projection_size
        self.projection = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, p))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_token_id).to(torch.float32)
        # A text of padding only (an empty string) still attends to its first position.
        mask[:, 0] = 1.0
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)[None]
        for layer in self.layers:
            x = layer(x, mask)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.projection(pooled)


def efficientnet(image_size: int, name: str = BACKBONE) -> nn.Module:
    """The backbone's architecture (no weights), its classifier removed."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(name, image_size=image_size)
    net._fc = nn.Identity()
    # Lite models use ReLU6 (exportable as is); the package's set_swish() would replace it
    # with swish and ruin the pretrained features, so it is never called.
    _plain_pointwise_convs(net)
    return net


def _plain_pointwise_convs(net: nn.Module) -> None:
    """1x1 stride-1 "same" convolutions pad nothing: make them plain `nn.Conv2d`.

    The same weights and state-dict keys; peft can wrap a plain Conv2d with LoRA (it
    builds its LoRA convolutions from the wrapped layer's class, which the package's
    static-padding class refuses without an image size).
    """
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            if (isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d
                    and child.kernel_size == (1, 1) and tuple(child.stride) == (1, 1)):
                plain = nn.Conv2d(child.in_channels, child.out_channels, 1,
                                  groups=child.groups, bias=child.bias is not None)
                setattr(parent, child_name, plain)


class CompactVisionModel(nn.Module):
    def __init__(self, config: CompactVisionConfig) -> None:
        super().__init__()
        self.backbone = efficientnet(config.image_size, config.backbone)
        # ReLU6 features are non-negative with a large common component; normalising
        # them first keeps the projection from starting (and collapsing) on that component
        self.norm = nn.LayerNorm(config.hidden_size)
        self.projection = nn.Linear(config.hidden_size, config.projection_size)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled backbone features (n, 1280): what stage-1 training caches."""
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.backbone.extract_features(x).mean((2, 3))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(self.norm(features))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(pixel_values))


class CompactModel(PreTrainedModel):
    config_class = CompactConfig
    base_model_prefix = "compact"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules: ClassVar[list[str]] = []
    lora_target_modules: ClassVar[str] = LORA_TARGETS

    def __init__(self, config: CompactConfig) -> None:
        super().__init__(config)
        self.text_model = CompactTextModel(config.text_config)
        self.vision_model = CompactVisionModel(config.vision_config)
        self.logit_scale = nn.Parameter(torch.tensor([config.logit_scale_init]))
        self.logit_bias = nn.Parameter(torch.tensor([config.logit_bias_init]))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Modules initialise themselves; weights come from the checkpoint or the build."""

    def train(self, mode: bool = True) -> CompactModel:
        super().train(mode)
        self.vision_model.backbone.eval()  # batch norms keep their running statistics
        return self

    def get_text_features(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.text_model(input_ids)

    def get_image_features(self, pixel_values: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.vision_model(pixel_values)

    def image_backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model.features(pixel_values)

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        return self.vision_model.project(features)

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, **_: Any
    ) -> dict[str, torch.Tensor]:
        image = F.normalize(self.get_image_features(pixel_values), dim=-1)
        text = F.normalize(self.get_text_features(input_ids), dim=-1)
        logits = text @ image.t() * self.logit_scale.exp() + self.logit_bias
        return {"logits_per_text": logits, "logits_per_image": logits.t(),
                "text_embeds": text, "image_embeds": image}


def register() -> None:
    """Make AutoConfig / AutoModel know the compact type (idempotent)."""
    with contextlib.suppress(ValueError):  # already registered
        AutoConfig.register(MODEL_TYPE, CompactConfig)
    with contextlib.suppress(ValueError):
        AutoModel.register(CompactConfig, CompactModel)


register()
