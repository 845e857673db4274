"""The store boundary is sealed: the data path (search, ingest) names no concrete store
and asks nothing of Milvus's administration; every store implements both Protocols; the
mirror's decisions answer through the Protocol."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest

from carsearch.platform.vectors.memory import ExactStore
from carsearch.platform.vectors.milvus import MilvusStore
from carsearch.platform.vectors.mirror import MirroredStore
from carsearch.platform.vectors.protocol import VectorAdmin, VectorRow, VectorStore
from fixtures.common import REPO

SRC = REPO / "src" / "carsearch"
CONCRETE = {"carsearch.platform.vectors.milvus", "carsearch.platform.vectors.mirror",
            "carsearch.platform.vectors.memory"}
# Code that may hold only the VectorStore Protocol (backup, the ANN audit and the
# benchmarks work on Milvus itself, by design; the status page shows the alias and what
# answers searches, through VectorAdmin).
DATA_PATH = [SRC / "platform" / "search", SRC / "ingest", SRC / "lifecycle", SRC / "ui",
             SRC / "training", SRC / "data", SRC / "monitoring" / "drift.py"]
ADMIN_USERS = {SRC / "ui" / "status.py"}


def _members(proto: type) -> set[str]:
    out: set[str] = set()
    for cls in proto.__mro__:
        if cls in (Protocol, object) or not getattr(cls, "_is_protocol", False):
            continue
        out |= {n for n in [*vars(cls), *getattr(cls, "__annotations__", {})]
                if not n.startswith("_")}
    return out


ADMIN_ONLY = _members(VectorAdmin) - _members(VectorStore)


def _files() -> list[Path]:
    return [f for p in DATA_PATH for f in ([p] if p.is_file() else sorted(p.rglob("*.py")))
            if f not in ADMIN_USERS]


def _store_expr(node: ast.AST) -> bool:
    """`store`, `self.store`, `p.store`, `writer.store`, `platform.store` ..."""
    return (isinstance(node, ast.Name) and node.id == "store") or (
        isinstance(node, ast.Attribute) and node.attr == "store")


def test_admin_members_are_the_milvus_ones() -> None:
    assert {"is_lite", "flush", "alias_target", "point_alias", "index_info",
            "search_backend"} == ADMIN_ONLY
    assert "needs_flush" not in _members(VectorStore) | _members(VectorAdmin)


def test_the_data_path_names_no_concrete_store() -> None:
    for path in _files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in CONCRETE, f"{path.relative_to(REPO)}: {node.module}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                names = {getattr(n, "id", None) for n in ast.walk(node.args[1])}
                assert not names & {"MilvusStore", "MirroredStore", "ExactStore"}, path


def test_the_data_path_asks_nothing_of_the_administration() -> None:
    """Search and ingest reach aliases, flushes and index info only through
    `Platform.admin` (and only lifecycle does)."""
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ADMIN_ONLY:
                assert not _store_expr(node.value), (
                    f"{path.relative_to(REPO)}:{node.lineno} uses store.{node.attr}: "
                    "administration goes through Platform.admin")
    for path in [*sorted((SRC / "platform" / "search").rglob("*.py")),
                 *sorted((SRC / "ingest").rglob("*.py"))]:
        assert ".admin" not in path.read_text(), f"{path.relative_to(REPO)} uses admin"


@pytest.fixture
def stores(tmp_path: Path) -> Any:
    opened = [ExactStore(), MilvusStore(str(tmp_path / "a.db")),
              MirroredStore(str(tmp_path / "b.db"))]
    yield opened
    for s in opened:
        s.close()


def test_every_store_implements_both_protocols(stores: list[Any]) -> None:
    for store in stores:
        missing = sorted(n for n in _members(VectorStore) | _members(VectorAdmin)
                         if not hasattr(store, n))
        assert not missing, f"{type(store).__name__} lacks {missing}"


def test_the_serving_decisions_answer_through_the_protocol(stores: list[Any]) -> None:
    """prepare / retain / search_path / settle: the caller never asks which store."""
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(6, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    paths = []
    for store in stores:
        for name in ("old", "new"):
            store.ensure_collection(name, 8)
            store.upsert(name, list(range(6)), vecs, [VectorRow(make="Ford")] * 6)
            store.settle(name)
        store.prepare(["old", "new"], wait=True)
        paths.append(store.search_path("old"))
        store.retain(["new"])
        assert store.search(name, vecs[:1], 1)[0][0].id == 0
        assert store.count("old") == 6  # retain frees caches, never data
        paths.append(store.search_path("old"))
    assert paths == ["memory", "memory", "milvus_lite", "milvus_lite", "mirror", "milvus_lite"]
