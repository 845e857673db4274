"""The two deployment shapes as one fixture, for tests where both the store and the
database matter but the full grid of `database` x `milvus_uri` would only repeat them:
Milvus Lite with SQLite (one process), and the Milvus server with PostgreSQL (the
production shape). Each gets a world from ingest_world: a compact model serving as v1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from carsearch.platform.runtime import Platform
from ingest_world import world


@pytest.fixture(params=["lite-sqlite",
                        pytest.param("server-postgresql",
                                     marks=[pytest.mark.postgres, pytest.mark.milvus_server])])
def shape(request: pytest.FixtureRequest, tmp_path: Path, compact_model: Path
          ) -> Iterator[Platform]:
    from fixtures.common import empty_server
    from fixtures.common import reset_pg as _reset_pg

    if request.param == "lite-sqlite":
        url, uri = f"sqlite:///{tmp_path / 'test.db'}", str(tmp_path / "milvus.db")
    else:
        url = request.getfixturevalue("pg_database")
        _reset_pg(url)
        uri = request.getfixturevalue("milvus_server").uri
        empty_server(uri)
    p = world(tmp_path, url, compact_model, uri)
    yield p
    p.close()
