"""The two deployment shapes as one fixture, for tests where both the store and the
database matter but the full grid of `database` x `milvus_uri` would only repeat them:
Milvus Lite with SQLite (one process), and the Milvus server with PostgreSQL (the
production shape). Each gets a world from ingest_world: the run's published compact
model serving as v1, on a copy of the run's migrated database template."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from carsearch.platform.runtime import Platform
from ingest_world import PublishedModel, world


@pytest.fixture(params=["lite-sqlite",
                        pytest.param("server-postgresql",
                                     marks=[pytest.mark.postgres, pytest.mark.milvus_server])])
def shape(request: pytest.FixtureRequest, tmp_path: Path, make_database,
          published_model: PublishedModel) -> Iterator[Platform]:
    from fixtures.common import empty_server

    if request.param == "lite-sqlite":
        url, uri = make_database("sqlite").url, str(tmp_path / "milvus.db")
    else:
        url = make_database("postgresql").url
        uri = request.getfixturevalue("milvus_server").uri
        empty_server(uri)
    p = world(tmp_path, url, published_model, uri)
    yield p
    p.close()
