"""ONNX export of both towers: parity with PyTorch on real preprocessing, the manifest's
hashes, and ONNX Runtime as the encoder of search and ingest (`--encoder onnx`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carsearch.platform.errors import ModelNotFoundError
from carsearch.platform.models.encoder import Encoder
from carsearch.platform.models.onnx import (
    MANIFEST,
    MAX_ABS_DIFF,
    MIN_COSINE,
    OnnxEncoder,
    export_onnx,
    sample_inputs,
)
from test_cli import env, one_line_error, run  # noqa: F401  (the CLI fixture and helpers)


@pytest.fixture(scope="module")
def exported(compact_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "export"
    export_onnx(compact_model, out)
    return out


def test_the_export_matches_pytorch(exported: Path, compact_model: Path) -> None:
    manifest = json.loads((exported / MANIFEST).read_text())
    assert set(manifest["files"]) == {"vision.onnx", "text.onnx", "image_policy.json"}
    parity = manifest["parity"]
    assert max(parity["vision_max_abs"], parity["text_max_abs"]) <= MAX_ABS_DIFF
    assert min(parity["vision_min_cos"], parity["text_min_cos"]) >= MIN_COSINE
    # Checked again here on other inputs, batch sizes the export never saw included.
    torch_enc, onnx_enc = Encoder(compact_model, batch_size=3), OnnxEncoder(exported,
                                                                             batch_size=5)
    images, texts = sample_inputs(11, seed=7)
    a, b = torch_enc.encode_images(images), onnx_enc.encode_images(images)
    assert a.shape == b.shape == (11, torch_enc.dim)
    assert np.abs(a - b).max() <= MAX_ABS_DIFF and (a * b).sum(1).min() >= MIN_COSINE
    c, d = torch_enc.encode_text(texts), onnx_enc.encode_text(texts)
    assert np.abs(c - d).max() <= MAX_ABS_DIFF and (c * d).sum(1).min() >= MIN_COSINE
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert onnx_enc.logit_scale == pytest.approx(torch_enc.logit_scale)
    assert onnx_enc.logit_bias == pytest.approx(torch_enc.logit_bias)
    assert onnx_enc.encode_text([]).shape == (0, torch_enc.dim)


def test_a_changed_graph_is_refused(exported: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    graph = copy / "vision.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelNotFoundError, match="changed since it was exported"):
        OnnxEncoder(copy).encode_images([Image.new("RGB", (32, 32))])
    with pytest.raises(ModelNotFoundError, match="no ONNX export"):
        OnnxEncoder(tmp_path / "nothing").load()


def test_export_command_and_onnx_for_ingest_and_search(
        env: dict[str, str], tmp_path: Path, compact_model: Path) -> None:  # noqa: F811
    run(["db", "upgrade"], env)
    run(["models", "publish", str(compact_model), "--name", "v1", "--promote"], env)
    out = json.loads(run(["models", "export", "v1", "--onnx", str(tmp_path / "gw"), "--json"],
                         env).stdout)
    assert (tmp_path / "gw" / "vision.onnx").is_file() and out["parity"]["vision_min_cos"] > 0.9999
    text = run(["models", "export", "v1", "--onnx", str(tmp_path / "gw2")], env).stdout
    assert "parity with PyTorch: vision max |diff|" in text

    rng = np.random.default_rng(0)
    rows = []
    for i, cls in enumerate(["Ford F-150 Regular Cab 2012", "BMW M3 Coupe 2012",
                             "Jeep Wrangler SUV 2012"]):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
        rows.append(json.dumps({"path": f"{i}.png", "class_name": cls}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    summary = json.loads(run(["ingest", "manifest", str(tmp_path / "m.jsonl"), "--encoder",
                              "onnx", "--json"], env).stdout)
    assert summary["indexed"] == 3
    assert (tmp_path / "data" / "models" / "_onnx" / "v1" / MANIFEST).is_file()
    by = {}
    for encoder in ("torch", "onnx"):
        res = json.loads(run(["search", "a vehicle", "--no-parse", "--encoder", encoder,
                              "--json"], env).stdout)
        by[encoder] = res["hits"]
    assert [h["image_id"] for h in by["torch"]] == [h["image_id"] for h in by["onnx"]]
    assert [h["score"] for h in by["torch"]] == pytest.approx(
        [h["score"] for h in by["onnx"]], abs=1e-3)
    one_line_error(run(["search", "x", "--encoder", "tensorrt"], env, ok=False),
                   "--encoder is torch or onnx")
