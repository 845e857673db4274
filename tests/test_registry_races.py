"""Retire against promote, forced in both orders on SQLite and PostgreSQL (issue 22, item 8).

Each race holds one party in a thread at the point the race needs (a barrier inside the
registry's own read of the row, or inside the artifact check a promotion makes before it
switches), runs the other party to the end, then lets the first go on. Whatever the
order, one version serves, and `retire --drop` never drops the serving collection.
Real parts: SQLite and the real PostgreSQL, a Milvus Lite file, a compact model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from carsearch.lifecycle.reindex import drop_version_data
from carsearch.platform.db import Database, VersionStatus
from carsearch.platform.models.registry import Registry, RegistryError
from carsearch.platform.runtime import Platform
from ingest_world import PublishedModel, world


@pytest.fixture
def plat(tmp_path: Path, compact_model: Path, published_model: PublishedModel,
         database: Database) -> Iterator[Platform]:
    p = world(tmp_path, database.url, published_model, str(tmp_path / "milvus.db"))
    p.registry.publish(compact_model, name="v2")
    for name in ("v1", "v2"):
        v = p.registry.get(name)
        p.store.ensure_collection(v.collection, v.dim)
    yield p
    p.close()


def _statuses(p: Platform) -> dict[str, VersionStatus]:
    return {v.name: v.status for v in p.registry.list()}


class _Held:
    """Runs ``fn`` in a thread that stops at the first call of ``Registry.<method>``
    made from that thread (after the real call, so the row has been read) until
    ``release``; calls from other threads pass straight through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, method: str,
                 fn: Callable[[], Any]) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        self.error: BaseException | None = None
        self.result: Any = None
        real = getattr(Registry, method)
        held = self

        def holding(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            if threading.current_thread() is held.thread and not held.reached.is_set():
                held.reached.set()
                assert held.go.wait(60), "never released"
            return out

        monkeypatch.setattr(Registry, method,
                            staticmethod(holding) if method == "_get" else holding)

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as exc:  # handed to the test
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.reached.wait(60), "the held party never reached its point"

    def release(self) -> None:
        self.go.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def _retire_and_drop(p: Platform, name: str) -> list[str]:
    """What `carsearch models retire NAME --drop` does."""
    return drop_version_data(p, p.registry.retire(name))


def test_a_retire_that_read_a_candidate_before_its_promotion_is_refused(
    plat: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retire (with --drop) reads v2 as a candidate and stops; v2 is promoted; retire
    goes on. Before: v2 retired, v1 a candidate, nothing served, and --drop dropped the
    serving collection. Now the retire is refused and v2 serves with its collection."""
    held = _Held(monkeypatch, "_get", lambda: _retire_and_drop(plat, "v2"))
    assert plat.registry.promote("v2").status == VersionStatus.serving
    held.release()
    assert isinstance(held.error, RegistryError) and "serving" in str(held.error)
    assert _statuses(plat) == {"v1": VersionStatus.candidate, "v2": VersionStatus.serving}
    assert plat.store.has_collection(plat.registry.require_serving().collection)


def test_a_promotion_that_read_a_candidate_before_its_retire_switches_nothing(
    plat: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The promotion of v2 reads it as a candidate and stops (checking its artifact);
    v2 is retired and its collection dropped; the promotion goes on. Before: v2 served
    with its collection dropped (then refilled). Now the promotion switches nothing and
    v1 still serves."""
    v2 = plat.registry.get("v2")
    held = _Held(monkeypatch, "verify", lambda: plat.registry.promote("v2"))
    assert _retire_and_drop(plat, "v2") == [f"collection {v2.collection}"]
    held.release()
    assert isinstance(held.error, RegistryError) and "retired" in str(held.error)
    assert _statuses(plat) == {"v1": VersionStatus.serving, "v2": VersionStatus.retired}
    assert plat.store.has_collection(plat.registry.require_serving().collection)
    with pytest.raises(RegistryError, match="retired"):
        plat.registry.promote("v2")  # retired is for good


def test_a_rollback_racing_a_retire_of_its_target_leaves_the_current_version(
    plat: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rollback is a promotion of the previous version: the same compare-and-set."""
    plat.registry.promote("v2")
    held = _Held(monkeypatch, "verify", lambda: plat.registry.rollback())
    plat.registry.retire("v1")
    held.release()
    assert isinstance(held.error, RegistryError)
    assert _statuses(plat) == {"v1": VersionStatus.retired, "v2": VersionStatus.serving}

