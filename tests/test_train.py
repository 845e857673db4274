"""The training loop, end to end on real rendered images and a real compact SigLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from carsearch.data.stanford import load_stanford
from carsearch.lifecycle.publish import promotion_decision, run_job
from carsearch.platform.db import Database, RunStatus, TrainingRun, VersionStatus
from carsearch.platform.errors import ConfigError
from carsearch.platform.models.encoder import Encoder
from carsearch.platform.models.registry import Registry
from carsearch.training.loss import siglip_loss
from carsearch.training.train_data import Collate, SampleStream, TrainSet, data_fingerprint
from carsearch.training.trainer import (
    FULL_EPOCHS,
    LORA_EPOCHS,
    DualEncoder,
    apply_lora,
    base_is_pretrained,
    build_model,
    load_base,
    lora_wrapped_modules,
    text_length_of,
    total_steps,
    train,
)
from train_helpers import tiny_catalogue, tiny_config, weights


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_catalogue(tmp_path_factory.mktemp("cat") / "catalogue")


def test_lora_wraps_q_and_v_of_both_towers(compact_model: Path) -> None:
    net, _ = load_base(str(compact_model))
    layers = net.config.text_config.num_hidden_layers
    model = apply_lora(net, rank=4)
    wrapped = lora_wrapped_modules(model)
    for tower in ("text_model", "vision_model"):
        for proj in ("q_proj", "v_proj"):
            hits = [n for n in wrapped if f".{tower}." in n and n.endswith(f"self_attn.{proj}")]
            assert len(hits) == layers, (tower, proj, wrapped)
    assert all(n.endswith(("q_proj", "v_proj")) for n in wrapped)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.endswith(("logit_scale", "logit_bias")) for n in names)


def test_scalars_receive_gradients_and_change(compact_model: Path, catalogue: Path) -> None:
    net, processor = load_base(str(compact_model))
    module = DualEncoder(apply_lora(net, rank=4))
    data = TrainSet.from_dataset(load_stanford(catalogue), image_size=64, limit=8,
                                 progress=False)
    batch = Collate(processor, text_length_of(module.siglip, processor))(
        [SampleStream(data, 8, seed=0)[i] for i in range(8)]
    )
    before = {n: float(getattr(module.siglip, n).detach()) for n in ("logit_scale", "logit_bias")}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    image, text, scale, bias = module(batch["pixel_values"], batch["input_ids"])
    siglip_loss(image, text, scale, bias, batch["classes"]).backward()
    for name in before:
        grad = getattr(module.siglip, name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    opt.step()
    for name, value in before.items():
        assert float(getattr(module.siglip, name).detach()) != value, name


def test_compact_base_defaults_to_full_training(compact_model: Path, tmp_path: Path) -> None:
    assert not base_is_pretrained(str(compact_model))
    cfg = tiny_config(tmp_path, compact_model, tmp_path / "run", full=None)
    _, _, full = build_model(cfg)
    assert full
    cfg.full = False
    module, _, full = build_model(cfg)
    assert not full and lora_wrapped_modules(module)


def test_only_train_split_reaches_training(catalogue: Path, tmp_path: Path) -> None:
    ds = load_stanford(catalogue)
    test_ids = {im.image_id for im in ds.split("test")}
    train_ids = {im.image_id for im in ds.split("train")}
    assert test_ids and train_ids and not test_ids & train_ids
    queries = tmp_path / "queries.jsonl"
    lines = [{"image_id": i, "query": f"query for {i}", "generator": "t", "accepted": True,
              "reason": None} for i in sorted(test_ids | train_ids)]
    queries.write_text("".join(json.dumps(x) + "\n" for x in lines))
    data = TrainSet.from_dataset(ds, image_size=64, queries_path=queries, progress=False)
    assert set(data.image_ids) == train_ids
    flat = {q for qs in data.queries for q in qs}
    assert flat == {f"query for {i}" for i in train_ids}
    stream = SampleStream(data, 3 * len(data), seed=0)
    texts = {stream[p]["text"] for p in range(len(stream))}
    assert not any(t.endswith(tuple(test_ids)) for t in texts)
    assert {stream[p]["index"] for p in range(len(data))} == set(range(len(data)))
    # the fingerprint covers the train ids and the query file
    assert data.fingerprint == data_fingerprint(sorted(train_ids), data.meta["queries_source"])
    generated = TrainSet.from_dataset(ds, image_size=64, progress=False)
    assert generated.fingerprint != data.fingerprint
    assert any(generated.queries)


def test_sample_stream_is_a_function_of_seed_and_position(catalogue: Path) -> None:
    data = TrainSet.from_dataset(load_stanford(catalogue), image_size=64, limit=6,
                                 progress=False)
    a, b = SampleStream(data, 12, seed=5), SampleStream(data, 12, seed=5)
    for p in (0, 7, 11):
        x, y = a[p], b[p]
        assert x["text"] == y["text"] and x["index"] == y["index"]
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    with pytest.raises(IndexError):
        a[12]


@pytest.fixture
def ledger_db(tmp_path: Path) -> str:
    """A migrated SQLite database: where the checkpoints' hashes are recorded."""
    from carsearch.platform.db import migrate

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate.upgrade(url)
    return url


def test_resume_continues_exactly(
    compact_model: Path, catalogue: Path, tmp_path: Path, ledger_db: str
) -> None:
    straight = train(tiny_config(catalogue, compact_model, tmp_path / "straight", grad_accum=2))
    assert straight.model_dir is not None
    cfg = tiny_config(catalogue, compact_model, tmp_path / "split", grad_accum=2, stop_after=2,
                      ledger_db=ledger_db)
    half = train(cfg)
    assert half.model_dir is None and half.counters.step == 2
    cfg.stop_after, cfg.resume = 0, True
    resumed = train(cfg)
    assert resumed.counters.step == 4 and resumed.model_dir is not None
    assert resumed.counters.losses == pytest.approx(straight.counters.losses, rel=1e-5)
    a, b = weights(straight.model_dir), weights(resumed.model_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    base = weights(compact_model)
    assert any(not torch.equal(base[k], a[k]) for k in a)


def test_resume_needs_a_checkpoint(compact_model: Path, catalogue: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to resume"):
        train(tiny_config(catalogue, compact_model, tmp_path / "none", resume=True))


class _Payload:
    """Unpickled, it opens (creates) ``marker``: what a hostile pickle could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_a_tampered_checkpoint_is_refused_before_anything_is_unpickled(
    compact_model: Path, catalogue: Path, tmp_path: Path, ledger_db: str
) -> None:
    """Whoever can write the run directory cannot change or run code through a resume:
    every file is checked against the sha256 the database recorded when the checkpoint
    was written, and a changed, added or missing file is refused with its name."""
    import shutil

    from carsearch.platform.artifacts import CHECKPOINT, ArtifactLedger
    from carsearch.platform.db import Database
    from carsearch.platform.errors import ArtifactTamperedError
    from carsearch.training.trainer import checkpoint_key, latest_checkpoint

    cfg = tiny_config(catalogue, compact_model, tmp_path / "run", stop_after=2,
                      ledger_db=ledger_db)
    train(cfg)
    ckpt = latest_checkpoint(cfg.out)
    assert ckpt is not None
    files = sorted(p.name for p in ckpt.iterdir())
    # Weights as safetensors, counters as JSON: no pickle of our own to unpickle.
    assert "model.safetensors" in files and "counters.json" in files
    assert not any(f.startswith("custom_checkpoint") or (f.endswith(".bin") and "model" in f)
                   for f in files)
    db = Database(ledger_db)
    try:
        assert sorted(ArtifactLedger(db).recorded(CHECKPOINT, checkpoint_key(ckpt)) or {}) \
            == files
    finally:
        db.dispose()
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt, pristine)
    cfg.stop_after, cfg.resume = 0, True

    def refused(path: Path) -> None:
        with pytest.raises(ArtifactTamperedError) as err:
            train(cfg)
        assert str(path) in str(err.value)
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)

    # 1. A pickle Accelerate would load with weights_only=False (a registered object's
    # state): refused as an unrecorded file, and never unpickled.
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), ckpt / "custom_checkpoint_0.pkl")
    refused(ckpt / "custom_checkpoint_0.pkl")
    assert not marker.exists()
    # 2. One byte of the optimizer state changed.
    opt = ckpt / "optimizer.bin"
    raw = bytearray(opt.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    opt.write_bytes(bytes(raw))
    refused(opt)
    # 3. The counters moved on (the run would skip data): refused.
    counters = ckpt / "counters.json"
    counters.write_text(counters.read_text().replace('"step": 2', '"step": 3'))
    refused(counters)
    # 4. A recorded file removed.
    (ckpt / "scheduler.bin").unlink()
    refused(ckpt / "scheduler.bin")
    # 5. A checkpoint no database recorded (another run's, copied in as a whole).
    cfg_other = tiny_config(catalogue, compact_model, tmp_path / "other", stop_after=2)
    train(cfg_other)  # no ledger: its checkpoint is not recorded
    other = latest_checkpoint(cfg_other.out)
    assert other is not None
    newer = ckpt.with_name("step-0000009")
    shutil.copytree(other, newer)
    with pytest.raises(ArtifactTamperedError, match="no sha256 was recorded"):
        train(cfg)
    shutil.rmtree(newer)
    # 6. Without the database nothing can be checked: no resume.
    with pytest.raises(ConfigError, match="ledger_db"):
        train(tiny_config(catalogue, compact_model, tmp_path / "run", resume=True))
    # Untouched, it resumes and finishes.
    done = train(cfg)
    assert done.counters.step == 4 and done.model_dir is not None


def test_end_to_end_train_evaluate_publish_promote(
    compact_model: Path, catalogue: Path, database: Database, tmp_path: Path
) -> None:
    registry = Registry(database, tmp_path / "models")
    cfg = tiny_config(catalogue, compact_model, tmp_path / "run", full=False, lora_rank=4)
    report = run_job(cfg, db=database, registry=registry, promote=True, eval_limit=16)

    results = json.loads((tmp_path / "run" / "evaluation_results.json").read_text())
    assert set(results["models"]) == {"zero_shot", "fine_tuned"}
    for column in results["models"].values():
        assert {"recall@1", "recall@5", "recall@10", "mAP", "MRR"} <= column.keys()
    assert results["n_images"] == 16 and results["training"]["steps"] == 4

    assert report.version is not None and report.promoted
    version = registry.get(report.version)
    assert version.status == VersionStatus.serving
    assert version.base_model == str(compact_model)
    assert version.metrics["mAP"] == results["models"]["fine_tuned"]["mAP"]
    assert version.params["lora_rank"] == 4 and version.params["data_fingerprint"]
    artifact = registry.verify(version)
    assert not any("lora" in k for k in weights(artifact))
    vec = Encoder(artifact).encode_text(["red chevy pickup"])
    assert vec.shape == (1, 192) and np.isclose(np.linalg.norm(vec), 1.0, atol=1e-4)

    with database.session() as s:
        row = s.scalar(select(TrainingRun).where(TrainingRun.id == report.run_id))
        assert row is not None and row.status == RunStatus.finished
        assert row.model_version_id == version.id and row.finished_at is not None
        assert row.data_fingerprint == version.params["data_fingerprint"]
        assert row.config is not None and row.config["steps"] == 4
        outcome = row.metrics["outcome"]  # what the Status tab's flywheel shows
        assert outcome["promoted"] and outcome["version"] == version.name
        assert outcome["reason"] == report.promotion_reason


def test_promotion_decision() -> None:
    ev = {"models": {"fine_tuned": {"mAP": 0.5}, "serving": {"mAP": 0.6}}}
    assert promotion_decision(ev, "mAP", None)[0]
    ok, reason = promotion_decision(ev, "mAP", "v1")
    assert not ok and reason == "mAP 0.5000 is below serving v1 (0.6000)"
    ev["models"]["serving"]["mAP"] = 0.5  # at least as good: promoted
    assert promotion_decision(ev, "mAP", "v1") == (True, "mAP 0.5000 equals serving v1 "
                                                         "(0.5000)")
    ev["models"]["serving"]["mAP"] = 0.4
    assert promotion_decision(ev, "mAP", "v1")[0]


def test_failed_run_is_recorded(compact_model: Path, database: Database, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "missing", compact_model, tmp_path / "run")
    with pytest.raises(Exception, match="missing"):
        run_job(cfg, db=database, registry=None)
    with database.session() as s:
        row = s.scalars(select(TrainingRun)).one()
        assert row.status == RunStatus.failed and row.error


def test_default_epochs_depend_on_full_training(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path, tmp_path / "run", steps=0, epochs=0.0, batch_size=10)
    assert total_steps(cfg, 100, full=True) == round(FULL_EPOCHS * 10)
    assert total_steps(cfg, 100, full=False) == round(LORA_EPOCHS * 10)
    cfg.epochs = 2.0
    assert total_steps(cfg, 100, full=True) == total_steps(cfg, 100, full=False) == 20
    cfg.steps = 7
    assert total_steps(cfg, 100, full=True) == 7
    cfg.steps, cfg.epochs = 0, -1.0
    with pytest.raises(ConfigError):
        total_steps(cfg, 100)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_each_loss_trains_through_the_real_loops(
    loss: str, compact_model: Path, catalogue: Path, tmp_path: Path
) -> None:
    """`--loss`: the trainer's Accelerate loop (with accumulation) and stage 1 on cached
    features, a few rendered images each; the softmax leaves the bias alone (it cancels)."""
    from carsearch.training.pretrained_base import PretrainedSpec, build_pretrained_base
    from carsearch.training.stage1 import Stage1Config, train_stage1

    cfg = tiny_config(catalogue, compact_model, tmp_path / "run", loss=loss, steps=2,
                      batch_size=4, grad_accum=2, limit=8)
    result = train(cfg)
    assert result.counters.step == 2 and result.model_dir is not None
    assert all(np.isfinite(x) and x > 0 for x in result.counters.losses)
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert recorded["loss"] == loss
    before, after = weights(compact_model), weights(result.model_dir)
    assert not torch.equal(before["logit_scale"], after["logit_scale"])
    assert torch.equal(before["logit_bias"], after["logit_bias"]) == (loss == "softmax")

    base = build_pretrained_base(tmp_path / "base", spec=PretrainedSpec(image_size=64))
    s1 = train_stage1(Stage1Config(data=catalogue, base=str(base), out=tmp_path / "s1",
                                   cache_dir=tmp_path / "cache", steps=2, batch_size=4,
                                   grad_accum=2, loss=loss, progress=False))
    assert len(s1.losses) == 2 and all(np.isfinite(x) and x > 0 for x in s1.losses)
    assert json.loads((tmp_path / "s1" / "stage1.json").read_text())["config"]["loss"] == loss
    before, after = weights(base), weights(s1.model_dir)
    assert not torch.equal(before["logit_scale"], after["logit_scale"])
    assert torch.equal(before["logit_bias"], after["logit_bias"]) == (loss == "softmax")


def test_an_unknown_loss_is_refused(compact_model: Path, catalogue: Path, tmp_path: Path) -> None:
    from carsearch.training.stage1 import Stage1Config, train_stage1

    with pytest.raises(ConfigError, match="sigmoid, softmax"):
        train(tiny_config(catalogue, compact_model, tmp_path / "run", loss="hinge"))
    with pytest.raises(ConfigError, match="sigmoid, softmax"):
        train_stage1(Stage1Config(data=catalogue, base=str(compact_model), out=tmp_path / "s1",
                                  cache_dir=tmp_path / "cache", loss="hinge"))
