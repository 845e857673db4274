"""Model registry on SQLite and PostgreSQL: publish, promote, roll back, retire, tamper."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from carsearch.platform.db import Database, VersionStatus
from carsearch.platform.errors import ArtifactTamperedError, ModelNotFoundError
from carsearch.platform.models.registry import Registry, RegistryError, artifact_sha256


@pytest.fixture
def registry(database: Database, tmp_path: Path) -> Registry:
    return Registry(database, tmp_path / "models")


def _status(reg: Registry) -> dict[str, str]:
    return {v.name: v.status.value for v in reg.list()}


def test_publish_copies_and_hashes(registry: Registry, compact_model: Path) -> None:
    v = registry.publish(compact_model, name="v1", base_model="compact", metrics={"mAP": 0.1})
    assert v.status == VersionStatus.candidate
    assert Path(v.artifact_path) != compact_model
    assert v.artifact_sha256 == artifact_sha256(compact_model)
    assert v.dim > 0
    assert v.collection == "carsearch_v1"
    assert registry.get("v1").metrics == {"mAP": 0.1}
    with pytest.raises(RegistryError, match="already exists"):
        registry.publish(compact_model, name="v1")


def test_promote_rollback_retire(registry: Registry, compact_model: Path) -> None:
    for name in ("v1", "v2", "v3"):
        registry.publish(compact_model, name=name)
    assert registry.serving() is None
    registry.promote("v1")
    registry.promote("v2")
    assert _status(registry) == {"v1": "candidate", "v2": "serving", "v3": "candidate"}
    registry.promote("v3")
    registry.rollback()
    assert registry.serving().name == "v2"  # type: ignore[union-attr]
    with pytest.raises(RegistryError, match="serving"):
        registry.retire("v2")
    registry.retire("v1")
    with pytest.raises(RegistryError, match="retired"):
        registry.promote("v1")
    assert _status(registry)["v1"] == "retired"
    assert sum(s == "serving" for s in _status(registry).values()) == 1


def test_rollback_without_history_is_refused(registry: Registry, compact_model: Path) -> None:
    registry.publish(compact_model, name="only")
    registry.promote("only")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()


def test_tampered_artifact_is_refused(registry: Registry, compact_model: Path) -> None:
    v = registry.publish(compact_model, name="v1")
    weights = next(Path(v.artifact_path).glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactTamperedError, match="changed since it was published"):
        registry.promote("v1")
    assert registry.serving() is None


def test_unusable_artifacts(registry: Registry, compact_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        registry.publish(tmp_path / "nothing-here")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(compact_model, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(RegistryError, match="safetensors"):
        registry.publish(no_weights)
    with pytest.raises(RegistryError, match="unusable version name"):
        registry.publish(compact_model, name="../escape")
    with pytest.raises(ModelNotFoundError):
        registry.promote("nope")
