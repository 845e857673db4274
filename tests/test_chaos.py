"""The chaos run in a bounded form (bench/chaos.py has the full one): both shapes, real
processes killed with SIGKILL and at crash points, a Milvus server restarted, reconcile,
promotions and drift beside the worker; then nothing lost, doubled or stranded.

The schedule of faults is drawn from the seed, so the seeds here are chosen (by replaying
chaos.py's draws) to give every kind of fault in few rounds: on the server shape a plain
worker SIGKILL, a worker crash point, the server restart, a reconcile during ingest, a
promotion and two drift runs at once in 6 rounds; on the Lite shape each of the worker's
three crash points, a reconcile, a promotion and a drift run in 3 rounds (every round
SIGKILLs the page too). The tests check that the schedule held. Each crash point is also
forced alone, on both Milvus shapes, in tests/test_ingest_worker.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fixtures.common import REPO

pytestmark = pytest.mark.slow


def load_chaos() -> ModuleType:
    """bench/ is scripts, not a package: load chaos.py as a module."""
    if "chaos" in sys.modules:
        return sys.modules["chaos"]
    spec = importlib.util.spec_from_file_location("chaos", REPO / "bench" / "chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = module
    spec.loader.exec_module(module)
    return module


def _assert_clean(res: object) -> None:
    r = res  # a chaos.ChaosResult
    assert (r.lost, r.doubled, r.stranded) == (0, 0, 0), r.problems  # type: ignore[attr-defined]
    assert r.milvus_equals_db and r.indexed > 0  # type: ignore[attr-defined]
    assert r.queries_ok > 0  # type: ignore[attr-defined]


@pytest.mark.postgres
@pytest.mark.milvus_server
def test_chaos_on_postgresql_and_a_milvus_server(tmp_path: Path, pg_database: str,
                                                 compact_model: Path) -> None:
    from carsearch.platform.vectors.server import LocalMilvusServer
    from fixtures.common import reset_pg as _reset_pg

    chaos = load_chaos()
    _reset_pg(pg_database)
    with LocalMilvusServer(tmp_path / "milvus") as server:  # its own: it gets restarted
        res = chaos.run_server_shape(tmp_path / "run", compact_model, pg_database, server,
                                     rounds=6, per_round=4, milvus_restarts=1, seed=128)
    _assert_clean(res)
    assert res.faults.get("Milvus server killed and restarted") == 1
    for fault in ("worker SIGKILL", "worker crash at after_upsert", "reconcile during ingest",
                  "promotion", "drift twice at once"):
        assert res.faults.get(fault) == 1, (fault, res.faults)


def test_chaos_on_sqlite_and_milvus_lite(tmp_path: Path, compact_model: Path) -> None:
    chaos = load_chaos()
    res = chaos.run_lite_shape(tmp_path / "run", compact_model, rounds=3, per_round=4, seed=59)
    _assert_clean(res)
    for fault in (*(f"crash at {p}" for p in chaos.CRASH_POINTS), "reconcile between crashes",
                  "promotion", "drift run between crashes"):
        assert res.faults.get(fault) == 1, (fault, res.faults)
