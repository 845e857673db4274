"""Shared pieces of the training tests: a tiny rendered catalogue and a tiny config."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from carsearch.data.catalogue import write_catalogue
from carsearch.training.trainer import TrainConfig


def tiny_catalogue(out: Path, n: int = 48) -> Path:
    """A real rendered catalogue in the Stanford layout (even file number = test)."""
    write_catalogue(out, n, seed=3, size=(64, 48), progress=False)
    return out


def tiny_config(data: Path, base: Path, out: Path, **overrides: object) -> TrainConfig:
    fields: dict[str, object] = {
        "data": data, "base": str(base), "out": out, "steps": 4, "batch_size": 8,
        "limit": 16, "full": True, "progress": False, "seed": 1,
    }
    fields.update(overrides)
    return TrainConfig(**fields)  # type: ignore[arg-type]


def weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))
