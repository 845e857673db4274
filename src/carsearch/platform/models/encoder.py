"""The SigLIP encoder every process shares: text and images in, unit vectors out.

A model is a hub id or a directory that `AutoModel` / `AutoProcessor` load (the compact
base this project builds, `google/siglip-base-patch16-224`, or a published version),
optionally with a LoRA adapter merged in. It loads lazily, once, under a lock, so a
server may build an Encoder at start-up and pay for the load on the first request.

Text is always padded to the model's maximum length: SigLIP pools the last position.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from carsearch.platform.errors import ConfigError, ModelNotFoundError
from carsearch.platform.models.image_policy import ImagePolicy, frame_images, read_policy

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class _Loaded:
    model: Any
    processor: Any
    dim: int
    text_max_length: int
    logit_scale: float
    logit_bias: float
    policy: ImagePolicy


def resolve_device(device: str, *, cuda_available: bool | None = None) -> str:
    """The torch device an Encoder runs on (``Settings.device``, CARSEARCH_DEVICE).

    ``auto``: ``cuda`` where torch sees a CUDA device, else ``cpu``; ``cpu`` stays on the
    CPU whatever is present; ``cuda``/``cuda:N`` without a CUDA device is a ConfigError;
    any other torch device name (``mps``) is used as given. ``cuda_available`` overrides
    ``torch.cuda.is_available()`` (tests).
    """
    name = device.strip().lower()
    if cuda_available is None and (name == "auto" or name.startswith("cuda")):
        cuda_available = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if cuda_available else "cpu"
    if name.startswith("cuda") and not cuda_available:
        raise ConfigError(f"device {device!r}: torch sees no CUDA device (use auto or cpu)")
    return name


def _looks_like_path(model: str | Path) -> bool:
    text = str(model)
    return isinstance(model, Path) or text.startswith((".", "/", "~")) or Path(text).exists()


@contextmanager
def quiet_config_check() -> Iterator[None]:
    """Silence transformers' token-id check on its own default SiglipTextConfig.

    Printing or saving a SigLIP config diffs it against `SiglipTextConfig()`, whose
    default bos/eos ids (49406/49407) lie outside its default vocabulary (32000), and
    transformers warns about that default, not about the model being loaded.
    """
    config_log = logging.getLogger("transformers.configuration_utils")
    level = config_log.level
    config_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        config_log.setLevel(level)


def _from_pretrained(source: str, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoProcessor

    import carsearch.platform.models.compact  # noqa: F401  (registers the compact type)

    with quiet_config_check():
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        net = AutoModel.from_pretrained(source, **kwargs)
    return net, processor


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _load_model(model: str | Path, device: str) -> tuple[Any, Any]:
    """Load from a directory, else from the local hub cache, else (if online) the hub."""
    source = str(model)
    is_path = _looks_like_path(model)
    if is_path and not Path(source).expanduser().is_dir():
        raise ModelNotFoundError(f"no model directory at {source}")
    try:
        if is_path:
            net, processor = _from_pretrained(str(Path(source).expanduser()))
        else:
            try:
                # A cached hub model loads without touching the network; only then ask
                # the hub, which on a machine without access retries for minutes
                # (set HF_HUB_OFFLINE=1 there to fail at once).
                net, processor = _from_pretrained(source, local_files_only=True)
            except OSError:
                if _hub_offline():
                    raise
                net, processor = _from_pretrained(source)
    # ImportError: google's SigLIP checkpoints ship a SiglipTokenizer, which needs the
    # sentencepiece package; without it transformers raises ImportError.
    except (OSError, ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"cannot load model {source!r}: {first}") from None
    if not hasattr(net, "get_text_features") or not hasattr(net, "get_image_features"):
        raise ModelNotFoundError(f"{source!r} is not a dual encoder (no text/image features)")
    return net.to(device), processor


def _merge_adapter(net: Any, adapter: str | Path) -> Any:
    from peft import PeftModel

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelNotFoundError(f"no LoRA adapter at {adapter} (adapter_config.json missing)")
    try:
        return PeftModel.from_pretrained(net, str(path)).merge_and_unload()
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"cannot load LoRA adapter {adapter}: {exc}") from None


def pooled_features(output: Any) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4, a pooling output in 5."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    return output[1] if isinstance(output, tuple) else output[0]


def _batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _text_max_length(net: Any, processor: Any) -> int:
    text_config = getattr(net.config, "text_config", None)
    limit = getattr(text_config, "max_position_embeddings", None)
    tokenizer_limit = getattr(processor.tokenizer, "model_max_length", None)
    candidates = [n for n in (limit, tokenizer_limit) if isinstance(n, int) and 0 < n < 100_000]
    if not candidates:
        raise ModelNotFoundError("model declares no maximum text length")
    return min(candidates)


def _embedding_dim(net: Any) -> int:
    text_config = net.config.text_config
    projection = getattr(text_config, "projection_size", None)
    return int(projection or text_config.hidden_size)


def _scalar(net: Any, name: str, default: float) -> float:
    value = getattr(net, name, None)
    return float(value.detach().reshape(-1)[0]) if isinstance(value, torch.Tensor) else default


class Encoder:
    """Encodes text and images into L2-normalised float32 vectors of one SigLIP model."""

    def __init__(
        self,
        model: str | Path,
        *,
        adapter: str | Path | None = None,
        device: str = "cpu",
        batch_size: int = 64,
        torch_threads: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._model_ref = model
        self._adapter = adapter
        self._device = resolve_device(device)
        self._batch_size = batch_size
        self._torch_threads = torch_threads
        self._lock = threading.Lock()
        # A fast tokenizer called with padding/truncation options mutates its Rust
        # state; two threads at once fail with "Already borrowed".
        self._tokenizer_lock = threading.Lock()
        self._loaded: _Loaded | None = None

    @property
    def model_id(self) -> str:
        """The model as given (hub id or directory), with the adapter where there is one."""
        base = str(self._model_ref)
        return f"{base}+{self._adapter}" if self._adapter else base

    @property
    def device(self) -> str:
        return self._device

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def dim(self) -> int:
        return self._load().dim

    @property
    def logit_scale(self) -> float:
        """The model's log temperature; a pair scores `cos * exp(logit_scale) + logit_bias`."""
        return self._load().logit_scale

    @property
    def logit_bias(self) -> float:
        return self._load().logit_bias

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def load(self) -> None:
        """Load now rather than on the first encode (a server's warm-up)."""
        self._load()

    def _load(self) -> _Loaded:
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load_locked()
            return self._loaded

    def _load_locked(self) -> _Loaded:
        if self._torch_threads is not None:
            torch.set_num_threads(self._torch_threads)
        log.info("loading encoder %s on %s", self.model_id, self._device)
        net, processor = _load_model(self._model_ref, self._device)
        if self._adapter is not None:
            net = _merge_adapter(net, self._adapter)
        net.eval()
        return _Loaded(
            model=net,
            processor=processor,
            dim=_embedding_dim(net),
            text_max_length=_text_max_length(net, processor),
            logit_scale=_scalar(net, "logit_scale", 0.0),
            logit_bias=_scalar(net, "logit_bias", 0.0),
            policy=self._policy_locked(),
        )

    def _policy_locked(self) -> ImagePolicy:
        ref = self._model_ref
        policy = read_policy(Path(str(ref)).expanduser() if _looks_like_path(ref) else None)
        if policy.source != "file":
            log.info("encoder %s: %s", self.model_id, policy.source)
        return policy

    @property
    def policy(self) -> ImagePolicy:
        """The version's image policy (image_policy.json, or the implied one)."""
        return self._load().policy

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors (n, dim) for the texts, padded to the model's length as SigLIP is."""
        loaded = self._load()

        def run(batch: Sequence[str]) -> torch.Tensor:
            with self._tokenizer_lock:
                inputs = loaded.processor.tokenizer(
                    list(batch),
                    padding="max_length",
                    truncation=True,
                    max_length=loaded.text_max_length,
                    return_tensors="pt",
                )
            args = {k: v.to(self._device) for k, v in inputs.items() if k in _TEXT_INPUTS}
            return pooled_features(loaded.model.get_text_features(**args))

        return self._encode(list(texts), run, loaded.dim)

    def encode_images(
        self,
        images: Sequence[Image.Image],
        boxes: Sequence[Sequence[float] | None] | None = None,
    ) -> np.ndarray:
        """Unit vectors (n, dim) for the images under the version's image policy: each
        framed (cropped to its box, where `boxes` gives one), then sized and normalised by
        the version's processor. Every caller embeds images through here."""
        loaded = self._load()
        framed = frame_images(loaded.policy, images, boxes)

        def run(batch: Sequence[Image.Image]) -> torch.Tensor:
            rgb = list(batch)
            inputs = loaded.processor.image_processor(images=rgb, return_tensors="pt")
            pixels = inputs["pixel_values"].to(self._device)
            return pooled_features(loaded.model.get_image_features(pixel_values=pixels))

        return self._encode(framed, run, loaded.dim)

    def _encode(
        self, items: list[T], run: Callable[[Sequence[T]], torch.Tensor], dim: int
    ) -> np.ndarray:
        if not items:
            return np.zeros((0, dim), dtype=np.float32)
        parts: list[np.ndarray] = []
        with torch.inference_mode():
            for batch in _batches(items, self._batch_size):
                feats = run(batch).float()
                feats = torch.nn.functional.normalize(feats, p=2, dim=-1)
                parts.append(feats.cpu().numpy())
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


_TEXT_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids"})
