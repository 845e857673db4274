"""GPU where there is one: the exact index and the encoder give the CPU's answers on a GPU.

The GPU tests run only where a CUDA device exists (FAISS's GPU build for the exact index,
torch with CUDA for the encoder) and skip elsewhere, saying which is missing. The device
choice itself, and the exact index's GPU search path (position -> id mapping, padding,
adds and removals after the copy), are tested on the CPU too: there the GPU copy is faked
by a CPU clone of the flat index, the one thing that cannot exist on a machine without a
GPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from carsearch.platform.errors import ConfigError
from carsearch.platform.models.encoder import Encoder, resolve_device
from carsearch.platform.settings import Settings
from carsearch.platform.vectors import exact as exact_mod
from carsearch.platform.vectors.exact import (
    INDEX_FILE,
    ExactIndex,
    choose_exact_device,
    faiss_gpu_unavailable,
)

FAISS_GPU_MISSING = faiss_gpu_unavailable()
needs_faiss_gpu = pytest.mark.skipif(
    FAISS_GPU_MISSING is not None,
    reason=f"exact index on the GPU: {FAISS_GPU_MISSING}",
)
TORCH_CUDA_MISSING = (
    None if torch.cuda.is_available()
    else "torch built without CUDA" if torch.version.cuda is None
    else "no CUDA device (torch.cuda.is_available() is False)"
)
needs_torch_cuda = pytest.mark.skipif(
    TORCH_CUDA_MISSING is not None, reason=f"encoder on the GPU: {TORCH_CUDA_MISSING}"
)

SCORE_ATOL = 1e-5


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_same_topk(cpu: tuple[np.ndarray, np.ndarray], gpu: tuple[np.ndarray, np.ndarray],
                     atol: float = SCORE_ATOL) -> None:
    """Same ids and scores; ids may differ only where the CPU scores tie within atol."""
    (s_cpu, i_cpu), (s_gpu, i_gpu) = cpu, gpu
    assert i_cpu.shape == i_gpu.shape and i_gpu.dtype == np.int64
    np.testing.assert_array_equal(np.isneginf(s_cpu), np.isneginf(s_gpu))
    finite = np.isfinite(s_cpu)
    np.testing.assert_allclose(s_gpu[finite], s_cpu[finite], rtol=0, atol=atol)
    for row, col in zip(*np.nonzero(i_cpu != i_gpu), strict=True):
        # a swap of near-equal neighbours: the GPU's id holds a CPU-ranked tie at this rank
        ties = i_cpu[row][np.abs(s_cpu[row] - s_cpu[row, col]) <= 2 * atol]
        assert i_gpu[row, col] in ties, (row, col)


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.choice(10**9, size=3000, replace=False).astype(np.int64)
    return ids, unit(rng, 3000, 64), unit(rng, 20, 64)


# --- the device choice, on any machine ---------------------------------------------------


def test_choose_exact_device_modes() -> None:
    assert choose_exact_device("off", None) == (False, "gpu off")
    assert choose_exact_device("off", "no CUDA device")[0] is False
    assert choose_exact_device("auto", None)[0] is True
    assert choose_exact_device("on", None)[0] is True
    assert choose_exact_device("auto", "no CUDA device") == (False, "no CUDA device")
    with pytest.raises(ConfigError, match=r"CARSEARCH_EXACT_GPU=on.*no CUDA device"):
        choose_exact_device("on", "no CUDA device")
    with pytest.raises(ValueError, match="auto, on, off"):
        choose_exact_device("yes", None)


def test_exact_index_device_here(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="carsearch.platform.vectors.exact"):
        auto = ExactIndex(8)
    assert auto.device == ("cpu" if FAISS_GPU_MISSING else "gpu:0")
    assert f"searches on {auto.device}" in caplog.text  # the device is in the log
    assert ExactIndex(8, gpu="off").device == "cpu"
    if FAISS_GPU_MISSING:
        assert FAISS_GPU_MISSING in caplog.text  # and why it is not the GPU
        with pytest.raises(ConfigError, match=FAISS_GPU_MISSING):
            ExactIndex(8, gpu="on")


def test_resolve_device() -> None:
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("cpu", cuda_available=True) == "cpu"  # off means off
    assert resolve_device(" CUDA:1 ", cuda_available=True) == "cuda:1"
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda", cuda_available=False)
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == here
    assert Encoder("/nowhere", device="auto").device == here  # constructing never loads
    assert Encoder("/nowhere").device == "cpu"  # the library default stays the CPU


def test_gpu_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARSEARCH_EXACT_GPU", raising=False)
    monkeypatch.delenv("CARSEARCH_DEVICE", raising=False)
    settings = Settings()
    assert (settings.device, settings.exact_gpu) == ("auto", "auto")
    monkeypatch.setenv("CARSEARCH_EXACT_GPU", "off")
    monkeypatch.setenv("CARSEARCH_DEVICE", "cpu")
    settings = Settings()
    assert (settings.device, settings.exact_gpu) == ("cpu", "off")
    monkeypatch.setenv("CARSEARCH_EXACT_GPU", "sometimes")
    with pytest.raises(ValueError, match="exact_gpu"):
        Settings()


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in GPU: FAISS 'sees' one and the GPU copy is a CPU clone of the flat index."""
    monkeypatch.setattr(exact_mod, "faiss_gpu_unavailable", lambda: None)
    monkeypatch.setattr(exact_mod, "_flat_to_gpu", faiss.clone_index)


@pytest.mark.usefixtures("fake_gpu")
def test_gpu_search_path_matches_cpu(data) -> None:
    ids, vectors, queries = data
    cpu = ExactIndex.from_arrays(ids, vectors, gpu="off")
    gpu = ExactIndex.from_arrays(ids, vectors, gpu="on")
    assert (cpu.device, gpu.device) == ("cpu", "gpu:0")
    for k in (1, 10, 2048):
        assert_same_topk(cpu.search(queries, k), gpu.search(queries, k), atol=0)
    assert gpu._gpu_flat is not None
    rng = np.random.default_rng(1)
    extra_ids = np.arange(5, 105, dtype=np.int64)
    extra = unit(rng, 100, 64)
    for index in (cpu, gpu):  # an add extends the copy, a removal remakes it
        index.add(extra_ids, extra)
        index.remove(ids[:500])
        index.upsert(extra_ids[:10], unit(np.random.default_rng(2), 10, 64))
    assert len(gpu) == len(cpu) == 2600
    assert_same_topk(cpu.search(queries, 50), gpu.search(queries, 50), atol=0)
    assert_same_topk(cpu.search(extra[:3], 5), gpu.search(extra[:3], 5), atol=0)


@pytest.mark.usefixtures("fake_gpu")
def test_gpu_path_padding_empty_index_and_large_k(data) -> None:
    ids, vectors, queries = data
    small_cpu = ExactIndex.from_arrays(ids[:30], vectors[:30], gpu="off")
    small_gpu = ExactIndex.from_arrays(ids[:30], vectors[:30], gpu="on")
    scores, got = small_gpu.search(queries, 40)  # k > n: padded with -1 / -inf
    assert (got[:, 30:] == -1).all() and np.isneginf(scores[:, 30:]).all()
    assert_same_topk(small_cpu.search(queries, 40), (scores, got), atol=0)
    empty = ExactIndex(64, gpu="on")
    scores, got = empty.search(queries[:2], 3)
    assert (got == -1).all() and np.isneginf(scores).all()
    gpu = ExactIndex.from_arrays(ids, vectors, gpu="on")
    _, got = gpu.search(queries[:2], 2500)  # above the GPU's k limit: the CPU index answers
    assert gpu._gpu_flat is None and got.shape == (2, 2500)


def test_gpu_copy_failure_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch, data,
                                            caplog: pytest.LogCaptureFixture) -> None:
    def out_of_memory(flat: object) -> object:
        raise RuntimeError("StandardGpuResources: alloc fail (cudaMalloc error out of memory)")

    monkeypatch.setattr(exact_mod, "faiss_gpu_unavailable", lambda: None)
    monkeypatch.setattr(exact_mod, "_flat_to_gpu", out_of_memory)
    ids, vectors, queries = data
    cpu = ExactIndex.from_arrays(ids, vectors, gpu="off")
    gpu = ExactIndex.from_arrays(ids, vectors, gpu="on")
    with caplog.at_level("WARNING", logger="carsearch.platform.vectors.exact"):
        assert_same_topk(cpu.search(queries, 10), gpu.search(queries, 10), atol=0)
    assert gpu.device == "cpu" and "out of memory" in caplog.text


# --- on a GPU --------------------------------------------------------------------------------


@needs_faiss_gpu
@pytest.mark.parametrize(("n", "k"), [(3000, 1), (3000, 10), (3000, 100), (3000, 2048),
                                      (30, 40)])
def test_exact_index_on_gpu_matches_cpu(data, n: int, k: int) -> None:
    ids, vectors, queries = data
    cpu = ExactIndex.from_arrays(ids[:n], vectors[:n], gpu="off")
    gpu = ExactIndex.from_arrays(ids[:n], vectors[:n], gpu="on")
    assert gpu.device == "gpu:0"
    assert_same_topk(cpu.search(queries, k), gpu.search(queries, k))
    assert gpu._gpu_flat is not None  # the search really ran on the GPU copy


@needs_faiss_gpu
def test_exact_index_on_gpu_after_changes(data) -> None:
    ids, vectors, queries = data
    cpu = ExactIndex.from_arrays(ids, vectors, gpu="off")
    gpu = ExactIndex.from_arrays(ids, vectors, gpu="on")
    gpu.search(queries, 10)  # copies to the GPU
    rng = np.random.default_rng(3)
    new_ids, new = np.arange(10, 60, dtype=np.int64), unit(rng, 50, 64)
    for index in (cpu, gpu):
        index.add(new_ids, new)
        assert_same_topk(cpu.search(new[:5], 10), gpu.search(new[:5], 10))
        index.remove(ids[::3])
    assert_same_topk(cpu.search(queries, 20), gpu.search(queries, 20))


@needs_faiss_gpu
def test_saved_file_is_the_cpu_index(data, tmp_path: Path) -> None:
    ids, vectors, queries = data
    cpu = ExactIndex.from_arrays(ids, vectors, gpu="off")
    gpu = ExactIndex.from_arrays(ids, vectors, gpu="on")
    gpu.search(queries, 5)
    cpu.save(tmp_path / "cpu")
    gpu.save(tmp_path / "gpu")

    def digest(d: Path) -> str:
        return hashlib.sha256((d / INDEX_FILE).read_bytes()).hexdigest()

    assert digest(tmp_path / "gpu") == digest(tmp_path / "cpu")
    raw = faiss.read_index(str(tmp_path / "gpu" / INDEX_FILE))
    assert isinstance(raw, faiss.IndexIDMap2)
    loaded = ExactIndex.load(tmp_path / "gpu", gpu="on")
    assert_same_topk(cpu.search(queries, 10), loaded.search(queries, 10))


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from carsearch.training.base_model import build_compact_base

    return build_compact_base(tmp_path_factory.mktemp("gpu") / "base", seed=2)


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 70 - 4 * i, 3), dtype=np.uint8))
            for i in range(n)]


@needs_torch_cuda
def test_encoder_on_gpu_matches_cpu(gpu_model: Path) -> None:
    cpu = Encoder(gpu_model, device="cpu")
    gpu = Encoder(gpu_model, device="auto")
    assert gpu.device == "cuda"
    texts = ["red 2012 chevy pickup", "older model mercedes coupe", "a black suv", "x"]
    for a, b in ((cpu.encode_text(texts), gpu.encode_text(texts)),
                 (cpu.encode_images(_images(5)), gpu.encode_images(_images(5)))):
        assert a.shape == b.shape and b.dtype == np.float32
        cosine = (a * b).sum(axis=1)
        assert cosine.min() >= 0.9999, cosine
