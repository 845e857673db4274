"""Exact inner-product search with FAISS: the ground truth for measuring Milvus ANN recall.

``ExactIndex`` wraps ``faiss.IndexIDMap2(faiss.IndexFlatIP(dim))`` over L2-normalised float32
vectors keyed by int64 image ids, so inner product = cosine similarity.

Normalisation policy: vectors are checked, not silently fixed. ``add``/``search`` raise
``ValueError`` when a vector's L2 norm differs from 1 by more than ``NORM_TOLERANCE`` — a
non-unit vector almost always means the embedder skipped its normalisation, and then scores
are not comparable with Milvus's. Pass ``normalize=True`` to normalise instead (zero vectors
still raise).

Saved form (a directory): ``index.faiss`` (``faiss.write_index``) and ``index.json`` with the
dimension, model version name, vector count and the sha256 of ``index.faiss``; ``load``
verifies all of them and raises ``ArtifactTamperedError`` on a mismatch. The JSON beside the
file only catches accidents: whoever can write one can write the other. So the platform
saves with a ``ledger`` (``carsearch.platform.artifacts``), which records the sha256 of both
files in the database, and loads with it: a file that differs from the record, or an index
with no record, is refused with the file named, before FAISS parses a byte of it. ``load``
reads each file once and parses those bytes, so the file checked is the file loaded.

Ties: FAISS does not order results of exactly equal score by id; do not rely on their order.

GPU: where FAISS is a GPU build (the ``gpu`` extra) and sees a CUDA device, searches run on
GPU 0 (``gpu="auto"``, the default; ``"on"`` fails without one, ``"off"`` stays on the CPU;
``Settings.exact_gpu``). The CPU index stays the source of truth: adds, removals, ids and the
saved file are the CPU ``IndexIDMap2`` exactly as without a GPU, so ``index.faiss`` and its
sha256 do not depend on where it was searched. The GPU holds a copy of the flat vectors
(``index_cpu_to_gpu``), made on the first search, extended by later adds and remade after a
removal; searches with k above FAISS's GPU limit (2048) run on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from carsearch.platform.artifacts import EXACT_INDEX, ArtifactLedger
from carsearch.platform.errors import ArtifactTamperedError, ConfigError, ModelNotFoundError
from carsearch.platform.images import sha256_file

__all__ = [
    "INDEX_FILE",
    "META_FILE",
    "NORM_TOLERANCE",
    "ExactIndex",
    "GpuMode",
    "choose_exact_device",
    "faiss_gpu_unavailable",
    "set_threads",
]

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
NORM_TOLERANCE = 1e-3
_FORMAT = 1

GpuMode = Literal["auto", "on", "off"]
_GPU_MODES = ("auto", "on", "off")
_GPU_DEVICE = 0
_GPU_MAX_K = 2048  # FAISS's GPU k-selection limit; a larger k searches on the CPU
# One StandardGpuResources per process (each reserves up to 1.5 GiB of scratch memory); it
# is not thread-safe, so every GPU call holds this lock.
_gpu_lock = threading.Lock()
_gpu_resources: Any = None


def faiss_gpu_unavailable() -> str | None:
    """Why FAISS cannot search on a GPU in this process, or None when it can."""
    if not all(hasattr(faiss, n) for n in ("StandardGpuResources", "index_cpu_to_gpu")):
        return "faiss built without GPU support"
    try:
        count = int(faiss.get_num_gpus())
    except (AttributeError, RuntimeError) as exc:
        return f"no CUDA device ({exc})"
    return None if count > 0 else "no CUDA device"


def choose_exact_device(mode: str, unavailable: str | None) -> tuple[bool, str]:
    """Whether the exact index searches on the GPU, and why, for ``mode`` (auto|on|off)
    given ``unavailable`` (``faiss_gpu_unavailable()``: None where a GPU can be used)."""
    if mode not in _GPU_MODES:
        raise ValueError(f"gpu must be one of {', '.join(_GPU_MODES)}, got {mode!r}")
    if mode == "off":
        return False, "gpu off"
    if unavailable is None:
        return True, f"gpu {mode}"
    if mode == "on":
        raise ConfigError(f"the exact index was asked to search on a GPU "
                          f"(CARSEARCH_EXACT_GPU=on) but {unavailable}")
    return False, unavailable


def _flat_to_gpu(flat: Any) -> Any:
    """A GPU copy of a CPU flat index (call with ``_gpu_lock`` held)."""
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_gpu_resources, _GPU_DEVICE, flat)


def exact_dir(data_dir: Path, version: str) -> Path:
    """Where a version's exact index is saved: ``data_dir/exact/<version>/``."""
    return Path(data_dir) / "exact" / version

class ExactIndex:
    """Brute-force inner-product index over unit vectors with int64 ids (-1 is reserved)."""

    def __init__(
        self,
        dim: int,
        *,
        model_version: str | None = None,
        threads: int | None = None,
        gpu: GpuMode = "auto",
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if threads is not None:
            set_threads(threads)
        self.dim = dim
        self.model_version = model_version
        self._index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._use_gpu, why = choose_exact_device(
            gpu, None if gpu == "off" else faiss_gpu_unavailable()
        )
        self._gpu_flat: Any = None  # GPU copy of the flat vectors, made on the first search
        self._id_array: np.ndarray | None = None  # position -> id, for GPU results
        log.info("exact index (dim %d) searches on %s (%s)", dim, self.device, why)

    @classmethod
    def from_arrays(
        cls,
        ids: np.ndarray,
        vectors: np.ndarray,
        *,
        model_version: str | None = None,
        normalize: bool = False,
        threads: int | None = None,
        gpu: GpuMode = "auto",
    ) -> ExactIndex:
        """A new index holding ``vectors`` under ``ids`` (dimension taken from the vectors)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D (n, dim), got shape {vectors.shape}")
        index = cls(vectors.shape[1], model_version=model_version, threads=threads, gpu=gpu)
        index.add(ids, vectors, normalize=normalize)
        return index

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def device(self) -> str:
        """Where searches run: ``"cpu"`` or ``"gpu:0"``."""
        return f"gpu:{_GPU_DEVICE}" if self._use_gpu else "cpu"

    def ids(self) -> np.ndarray:
        """The stored ids, in storage order."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def add(self, ids: np.ndarray, vectors: np.ndarray, *, normalize: bool = False) -> None:
        """Add vectors under new ids; an id already present (or repeated) raises ValueError."""
        id_arr = _check_ids(ids)
        mat = self._prepare(vectors, normalize=normalize)
        if mat.shape[0] != id_arr.shape[0]:
            raise ValueError(f"{id_arr.shape[0]} ids for {mat.shape[0]} vectors")
        clash = np.intersect1d(id_arr, self.ids())
        if clash.size:
            raise ValueError(f"{clash.size} ids already in the index, e.g. {int(clash[0])}")
        if id_arr.size:
            self._index.add_with_ids(mat, id_arr)
            self._id_array = None
            if self._gpu_flat is not None:  # appended in the same order as the CPU index
                with _gpu_lock:
                    self._gpu_flat.add(mat)

    def upsert(self, ids: np.ndarray, vectors: np.ndarray, *, normalize: bool = False) -> None:
        """Add vectors, replacing any stored under the same ids."""
        id_arr = _check_ids(ids)
        mat = self._prepare(vectors, normalize=normalize)  # validate before removing anything
        self.remove(id_arr)
        self.add(id_arr, mat)

    def remove(self, ids: np.ndarray) -> int:
        """Remove the given ids (unknown ids are ignored); returns how many were removed."""
        id_arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if not id_arr.size:
            return 0
        removed = int(self._index.remove_ids(faiss.IDSelectorBatch(id_arr)))
        if removed:
            self._id_array = None
            self._gpu_flat = None  # remade from the CPU index on the next search
        return removed

    def search(
        self, queries: np.ndarray, k: int, *, normalize: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: ``(scores float32 (nq, k), ids int64 (nq, k))``, best first.

        Where the index holds fewer than k vectors the rest of each row is padded with id -1
        and score -inf.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        mat = self._prepare(queries, normalize=normalize)
        if not mat.shape[0]:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        result = None
        if self._use_gpu and len(self) and k <= _GPU_MAX_K:
            try:
                result = self._search_gpu(mat, k)
            except RuntimeError as exc:  # out of GPU memory, a k the build cannot select
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                if self._gpu_flat is None:  # the copy itself failed: stay on the CPU
                    self._use_gpu = False
                log.warning("exact index: GPU search failed (%s); searching on the CPU%s",
                            first, "" if self._use_gpu else " from now on")
        scores, ids = result if result is not None else self._index.search(mat, k)
        scores[ids == -1] = -np.inf
        return scores, ids.astype(np.int64, copy=False)

    def _search_gpu(self, mat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search the GPU copy (made here when missing); positions mapped back to ids."""
        n = len(self)
        kk = min(k, n)
        with _gpu_lock:
            if self._gpu_flat is None:
                self._gpu_flat = _flat_to_gpu(faiss.downcast_index(self._index.index))
                log.info("exact index: %d vectors (dim %d) copied to GPU %d",
                         n, self.dim, _GPU_DEVICE)
            scores, pos = self._gpu_flat.search(mat, kk)
        if self._id_array is None:
            self._id_array = self.ids()
        ids = np.where(pos >= 0, self._id_array[np.clip(pos, 0, None)], -1)
        if kk < k:  # pad as the CPU index does
            pad = ((0, 0), (0, k - kk))
            scores = np.pad(scores, pad, constant_values=-np.inf)
            ids = np.pad(ids, pad, constant_values=-1)
        return scores, ids

    def save(self, directory: str | Path, *, ledger: ArtifactLedger | None = None,
             key: str | None = None) -> Path:
        """Write ``index.faiss`` and ``index.json`` into ``directory`` (created if needed);
        with a ``ledger``, record their sha256 under ``key`` (default: the directory's name,
        which ``exact_dir`` makes the model version's).

        The file is always the CPU index, wherever searches run.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index_path = directory / INDEX_FILE
        tmp = directory / (INDEX_FILE + ".tmp")
        faiss.write_index(self._index, str(tmp))
        os.replace(tmp, index_path)
        meta = {
            "format": _FORMAT,
            "metric": "inner_product",
            "dim": self.dim,
            "model_version": self.model_version,
            "count": len(self),
            "sha256": sha256_file(index_path),
        }
        tmp_meta = directory / (META_FILE + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_meta, directory / META_FILE)
        if ledger is not None:
            ledger.record(EXACT_INDEX, key or directory.name, directory, [INDEX_FILE, META_FILE])
        log.info("saved exact index (%d vectors, dim %d) to %s", len(self), self.dim, directory)
        return directory

    @classmethod
    def load(
        cls, directory: str | Path, *, threads: int | None = None, gpu: GpuMode = "auto",
        ledger: ArtifactLedger | None = None, key: str | None = None,
    ) -> ExactIndex:
        """Read an index saved by ``save``, verifying its checksum, dimension and count;
        with a ``ledger``, first verifying both files against the sha256 recorded under
        ``key`` (default: the directory's name) when they were saved."""
        directory = Path(directory)
        index_path, meta_path = directory / INDEX_FILE, directory / META_FILE
        if not index_path.is_file() or not meta_path.is_file():
            raise ModelNotFoundError(f"no exact index at {directory} (needs {INDEX_FILE}, "
                                     f"{META_FILE})")
        for path in (index_path, meta_path):
            if path.is_symlink():
                raise ArtifactTamperedError(f"{path}: a symlink; refusing to load it")
        data, meta_bytes = index_path.read_bytes(), meta_path.read_bytes()
        if ledger is not None:
            _check_recorded(ledger, key or directory.name, directory,
                            {INDEX_FILE: data, META_FILE: meta_bytes})
        try:
            meta = json.loads(meta_bytes.decode("utf-8"))
            dim, count, digest = int(meta["dim"]), int(meta["count"]), str(meta["sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactTamperedError(f"{meta_path}: unreadable metadata ({exc})") from exc
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactTamperedError(f"{index_path}: sha256 does not match {META_FILE}")
        raw = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if not isinstance(raw, faiss.IndexIDMap2) or raw.d != dim or raw.ntotal != count:
            raise ArtifactTamperedError(f"{index_path}: index type, dim or count differ from "
                                        f"{META_FILE}")
        index = cls(dim, model_version=meta.get("model_version"), threads=threads, gpu=gpu)
        index._index = raw
        return index

    def _prepare(self, vectors: np.ndarray, *, normalize: bool) -> np.ndarray:
        """Validate a (n, dim) float matrix; return it as contiguous float32 unit rows."""
        arr = np.asarray(vectors)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"expected shape (n, {self.dim}), got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"vectors must be floating point, got {arr.dtype}")
        mat = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(mat).all():
            raise ValueError("vectors contain NaN or infinite values")
        norms = np.linalg.norm(mat, axis=1)
        if normalize:
            if (norms == 0).any():
                raise ValueError("cannot normalise a zero vector")
            return mat / norms[:, None]
        bad = np.abs(norms - 1.0) > NORM_TOLERANCE
        if bad.any():
            raise ValueError(f"{int(bad.sum())} vectors are not L2-normalised "
                             f"(e.g. norm {float(norms[bad][0]):.4f}); pass normalize=True")
        return mat


def _check_recorded(ledger: ArtifactLedger, key: str, directory: Path,
                    contents: dict[str, bytes]) -> None:
    """The bytes read from each file against the sha256 the ledger recorded at save."""
    expected = ledger.recorded(EXACT_INDEX, key)
    if expected is None:
        raise ArtifactTamperedError(f"{directory}: no sha256 was recorded for this exact "
                                    f"index ({key}); refusing to load it")
    for name, data in contents.items():
        if expected.get(name) != hashlib.sha256(data).hexdigest():
            raise ArtifactTamperedError(f"{directory / name}: sha256 differs from the one "
                                        "recorded when it was saved; refusing to load it")


def set_threads(n: int) -> None:
    """Set FAISS's OpenMP thread count (process-wide)."""
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    faiss.omp_set_num_threads(n)


def _check_ids(ids: np.ndarray) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"ids must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if (arr < 0).any():
        raise ValueError("ids must be non-negative (-1 marks a missing result)")
    if np.unique(arr).size != arr.size:
        raise ValueError("ids repeat within one call")
    return arr

