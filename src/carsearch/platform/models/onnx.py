"""ONNX export of both towers, and an encoder that runs them with ONNX Runtime.

The vehicle design extracts embeddings at the camera, not in the data centre: a camera
gateway runs the vision tower and sends vectors. `export_onnx` writes

    DIR/vision.onnx      pixel_values (n, 3, H, W) -> unit image embeddings (n, dim)
    DIR/text.onnx        input_ids (n, L)           -> unit text embeddings (n, dim)
    DIR/onnx.json        the manifest: sha256 of each graph, dim, text length, image
                         size, logit_scale / logit_bias, the parity measured at export
    DIR/image_policy.json the version's framing (see image_policy), hashed in the manifest
    DIR/<processor files> the tokenizer and image preprocessor (save_pretrained: JSON and
                         the tokenizer's own files, no pickles)

from a model version as the registry verified it (LoRA adapters are merged before export),
with the batch axis dynamic. The L2 normalisation is part of each graph, so a gateway
needs nothing but ONNX Runtime and the preprocessing config. `check_parity` runs both
runtimes on the same inputs (images through the real preprocessor, texts through the real
tokenizer) and reports the largest absolute difference and the lowest cosine.

`OnnxEncoder` has the `Encoder` interface (encode_text, encode_images, dim, logit_scale,
logit_bias), so `CARSEARCH_ENCODER=onnx` (or `--encoder onnx` on search and ingest)
swaps it in everywhere the platform encodes; it refuses graphs whose hash differs from
the manifest.

The manifest beside the graphs is not what they are trusted by: whoever can rewrite a
graph can rewrite `onnx.json` to match. Given a ledger, `export_onnx` records the sha256
of every file of the export in the database (`artifact_hashes`, kind ``onnx_export``,
keyed by the export's resolved directory), and the platform checks them before it loads
an export (platform/search/service.py). The manifest is written as `onnx.json.part` and
renamed to `onnx.json` only once the parity check has run and the hashes are recorded:
an export cut short (a crash in the parity check) has no manifest, and is made again on
the next use instead of failing every later start.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from carsearch.platform.errors import ModelNotFoundError
from carsearch.platform.images import sha256_file
from carsearch.platform.models.image_policy import (
    POLICY_FILE,
    ImagePolicy,
    frame_images,
    read_policy,
    write_policy,
)

log = logging.getLogger(__name__)

MANIFEST = "onnx.json"
# The manifest until the parity check has run and the hashes are recorded.
PARTIAL_MANIFEST = MANIFEST + ".part"
# The artifact_hashes kind of an export (keyed by its resolved directory).
ONNX_EXPORT = "onnx_export"
OPSET = 17
# Parity the export must reach (the bar): on unit vectors, at most this absolute
# difference per component and at least this cosine, for every sample.
MAX_ABS_DIFF = 1e-3
MIN_COSINE = 0.9999


@dataclass(frozen=True)
class Parity:
    vision_max_abs: float
    vision_min_cos: float
    text_max_abs: float
    text_min_cos: float

    @property
    def ok(self) -> bool:
        return (max(self.vision_max_abs, self.text_max_abs) <= MAX_ABS_DIFF
                and min(self.vision_min_cos, self.text_min_cos) >= MIN_COSINE)


def _towers(net: Any) -> tuple[Any, Any]:
    import torch

    from carsearch.platform.models.encoder import pooled_features

    class Vision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            feats = pooled_features(self.net.get_image_features(pixel_values=pixel_values))
            return torch.nn.functional.normalize(feats, p=2, dim=-1)

    class Text(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            feats = pooled_features(self.net.get_text_features(input_ids=input_ids))
            return torch.nn.functional.normalize(feats, p=2, dim=-1)

    return Vision().eval(), Text().eval()


def _no_hook(point: str) -> None:
    pass


def export_key(out_dir: Path) -> str:
    """The artifact_hashes key of an export: its resolved directory."""
    return str(Path(out_dir).resolve())


def export_onnx(model: str | Path, out_dir: Path, *, adapter: str | Path | None = None,
                check: bool = True, ledger: Any = None,
                hook: Callable[[str], None] = _no_hook) -> dict[str, Any]:
    """Export both towers of ``model`` to ``out_dir``; returns the manifest written.

    ``ledger`` (an `ArtifactLedger`): record the sha256 of every file of the export
    under (`ONNX_EXPORT`, `export_key(out_dir)`) before the manifest takes its name.
    ``hook`` is called with "parity" in the middle of the parity check (tests crash
    there)."""
    import warnings

    import torch

    from carsearch.platform.models.encoder import Encoder

    enc = Encoder(model, adapter=adapter)
    loaded = enc._load()
    net, processor = loaded.model, loaded.processor
    out_dir.mkdir(parents=True, exist_ok=True)
    side = int(net.config.vision_config.image_size)
    size = (side, side)
    vision, text = _towers(net)
    pixels = torch.zeros(2, 3, size[0], size[1])
    ids = torch.zeros(2, loaded.text_max_length, dtype=torch.long)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(vision, (pixels,), str(out_dir / "vision.onnx"),
                          input_names=["pixel_values"], output_names=["embeds"],
                          dynamic_axes={"pixel_values": {0: "n"}, "embeds": {0: "n"}},
                          opset_version=OPSET, dynamo=False)
        torch.onnx.export(text, (ids,), str(out_dir / "text.onnx"),
                          input_names=["input_ids"], output_names=["embeds"],
                          dynamic_axes={"input_ids": {0: "n"}, "embeds": {0: "n"}},
                          opset_version=OPSET, dynamo=False)
    processor.save_pretrained(str(out_dir))
    write_policy(out_dir, loaded.policy)  # the gateway frames images as the version does
    manifest: dict[str, Any] = {
        "source": enc.model_id,
        "files": {name: sha256_file(out_dir / name)
                  for name in ("vision.onnx", "text.onnx", POLICY_FILE)},
        "dim": loaded.dim, "text_max_length": loaded.text_max_length,
        "image_size": list(size), "logit_scale": loaded.logit_scale,
        "logit_bias": loaded.logit_bias, "opset": OPSET,
    }
    (out_dir / MANIFEST).unlink(missing_ok=True)  # an older export's: not this one's
    partial = out_dir / PARTIAL_MANIFEST
    partial.write_text(json.dumps(manifest, indent=2))
    if check:
        manifest["parity"] = asdict(check_parity(enc, out_dir, manifest=PARTIAL_MANIFEST,
                                                 hook=hook))
        partial.write_text(json.dumps(manifest, indent=2))
    if ledger is not None:
        from carsearch.platform.artifacts import hash_files

        names = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*")
                       if p.is_file() and p.name != PARTIAL_MANIFEST)
        files = hash_files(out_dir, names)
        files[MANIFEST] = sha256_file(partial)  # under the name it is about to take
        ledger.record_hashes(ONNX_EXPORT, export_key(out_dir), files)
    os.replace(partial, out_dir / MANIFEST)
    log.info("exported %s to %s", enc.model_id, out_dir)
    return manifest


def sample_inputs(n: int = 8, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """Images and texts for a parity check: noise photos of a few sizes, typed queries."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8))
              for h, w in rng.integers(40, 300, (n, 2))]
    texts = ["red 2012 chevy pickup", "older model mercedes coupe", "a photo of a sedan.",
             "white suv", "jeep", "blue hatchback from the late 2000s", "x", "ford f-150"]
    return images, (texts * (n // len(texts) + 1))[:n]


def check_parity(torch_encoder: Any, out_dir: Path, n: int = 8, *,
                 manifest: str = MANIFEST, hook: Callable[[str], None] = _no_hook) -> Parity:
    """PyTorch against ONNX Runtime on the same images and texts."""
    onnx_enc = OnnxEncoder(out_dir, manifest=manifest)
    images, texts = sample_inputs(n)
    a, b = torch_encoder.encode_images(images), onnx_enc.encode_images(images)
    hook("parity")
    c, d = torch_encoder.encode_text(texts), onnx_enc.encode_text(texts)
    return Parity(float(np.abs(a - b).max()), float((a * b).sum(1).min()),
                  float(np.abs(c - d).max()), float((c * d).sum(1).min()))


class OnnxEncoder:
    """`Encoder`'s interface over an export: ONNX Runtime sessions on the CPU."""

    def __init__(self, export_dir: str | Path, *, batch_size: int = 64,
                 threads: int | None = None, manifest: str = MANIFEST,
                 verify: Callable[[], Any] | None = None) -> None:
        """``verify`` is called before the graphs are opened (the platform checks the
        hashes recorded in the database there; it raises to refuse)."""
        self.export_dir = Path(export_dir)
        self._manifest = manifest
        self._verify = verify
        self._batch_size = batch_size
        self._threads = threads
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        self._state: tuple[Any, Any, Any, dict[str, Any]] | None = None

    @property
    def model_id(self) -> str:
        return f"onnx:{self.export_dir}"

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def loaded(self) -> bool:
        return self._state is not None

    def load(self) -> None:
        self._load()

    def _load(self) -> tuple[Any, Any, Any, dict[str, Any]]:
        with self._lock:
            if self._state is None:
                self._state = self._open()
            return self._state

    def _open(self) -> tuple[Any, Any, Any, dict[str, Any]]:
        import onnxruntime as ort
        from transformers import AutoProcessor

        path = self.export_dir / self._manifest
        if not path.is_file():
            raise ModelNotFoundError(f"no ONNX export at {self.export_dir} ({MANIFEST} missing)")
        if self._verify is not None:
            self._verify()
        manifest = json.loads(path.read_text())
        for name, digest in manifest["files"].items():
            if sha256_file(self.export_dir / name) != digest:
                raise ModelNotFoundError(f"{self.export_dir / name} changed since it was "
                                         "exported (sha256 differs from the manifest)")
        opts = ort.SessionOptions()
        if self._threads is not None:
            opts.intra_op_num_threads = self._threads
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        vision = ort.InferenceSession(str(self.export_dir / "vision.onnx"), opts,
                                      providers=providers)
        text = ort.InferenceSession(str(self.export_dir / "text.onnx"), opts,
                                    providers=providers)
        processor = AutoProcessor.from_pretrained(str(self.export_dir))
        return vision, text, processor, manifest

    @property
    def dim(self) -> int:
        return int(self._load()[3]["dim"])

    @property
    def logit_scale(self) -> float:
        return float(self._load()[3]["logit_scale"])

    @property
    def logit_bias(self) -> float:
        return float(self._load()[3]["logit_bias"])

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        _vision, text, processor, manifest = self._load()
        out = []
        for start in range(0, len(texts), self._batch_size):
            with self._tokenizer_lock:
                ids = processor.tokenizer(
                    list(texts[start:start + self._batch_size]), padding="max_length",
                    truncation=True, max_length=int(manifest["text_max_length"]),
                    return_tensors="np")["input_ids"]
            out.append(text.run(None, {"input_ids": ids.astype(np.int64)})[0])
        return _stack(out, int(manifest["dim"]))

    @property
    def policy(self) -> ImagePolicy:
        """The exported version's image policy (copied beside the graphs at export)."""
        return read_policy(self.export_dir)

    def encode_images(
        self,
        images: Sequence[Image.Image],
        boxes: Sequence[Sequence[float] | None] | None = None,
    ) -> np.ndarray:
        vision, _text, processor, manifest = self._load()
        framed = frame_images(self.policy, images, boxes)
        out = []
        for start in range(0, len(framed), self._batch_size):
            rgb = framed[start:start + self._batch_size]
            pixels = processor.image_processor(images=rgb, return_tensors="np")["pixel_values"]
            out.append(vision.run(None, {"pixel_values": pixels.astype(np.float32)})[0])
        return _stack(out, int(manifest["dim"]))


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    if not parts:
        return np.zeros((0, dim), dtype=np.float32)
    arr = np.concatenate(parts).astype(np.float32)
    # The graphs normalise; normalise again so float rounding leaves exact unit vectors.
    return np.ascontiguousarray(arr / np.linalg.norm(arr, axis=1, keepdims=True))
