"""`carsearch serve --ingest --drift-every`: the page, the ingest worker and the drift job
in one process.

Milvus Lite lets one process open its file, so on one machine the page's process also
runs the worker. An image dropped into the inbox while the page serves must become
searchable on the page (through the in-memory search mirror) without a restart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carsearch.platform.db import Database, DriftReport

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402

from ui_world import Server, World, build_world, draw_car, run_server  # noqa: E402

NO_FILTERS = ([], [], [], [], "any", "any")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, compact_model: Path) -> World:
    return build_world(tmp_path_factory.mktemp("ingest-world"), compact_model)


@pytest.fixture(scope="module")
def inbox(world: World) -> Path:
    return world.data_dir.parent / "inbox"


@pytest.fixture(scope="module")
def server(world: World, inbox: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("ingest-log") / "server.log"
    yield from run_server(world, log,
                          args=["--ingest", "--inbox", str(inbox), "--drift-every", "1"])


def captions(client: Client) -> list[str]:
    # Names nothing the filter parser knows: a pure vector search over every image.
    gallery, *_ = client.predict("vehicle photo", 20, *NO_FILTERS, api_name="/search")
    return [item["caption"] for item in gallery]


def test_an_image_dropped_in_the_inbox_becomes_searchable(server: Server, inbox: Path) -> None:
    client = Client(server.url, verbose=False)
    before = captions(client)
    assert before and not any("Tesla" in c for c in before)
    # Write under a dot-name, then rename: the worker never sees a half-written file.
    draw_car(inbox / ".new.png", 99, (200, 30, 30))
    (inbox / "new.png.json").write_text(json.dumps(
        {"make": "Tesla", "model": "Model S", "year": 2012, "colour": "Red",
         "body_type": "Sedan", "source": "inbox"}))
    (inbox / ".new.png").rename(inbox / "new.png")
    deadline = time.monotonic() + 120
    found: list[str] = []
    while time.monotonic() < deadline and not found:
        found = [c for c in captions(client) if "Tesla Model S 2012" in c]
        time.sleep(0.5)
    assert found, (captions(client), server.log.read_text()[-3000:])
    assert len(captions(client)) == len(before) + 1
    assert not (inbox / "new.png").exists()  # moved into the image store
    # The sidecar's "Red" / "Sedan" are filterable as the page's colour=red, body=sedan.
    gallery, *_rest, chips = client.predict("red sedan", 20, *NO_FILTERS, api_name="/search")
    assert set(chips["value"]) == {"colour=red", "body=sedan"}
    caps = [g["caption"] for g in gallery]
    assert caps[0].split(" · ")[2] == "Tesla Model S 2012" and " · not " not in caps[0]
    assert len(caps) == len(before) + 1  # the page filled with the nearest others
    assert all(" · not " in c for c in caps[1:])  # none of them a red sedan
    log = server.log.read_text()
    assert "ingest worker running in this process" in log
    assert "search mirror of" in log and "ready" in log


def test_the_drift_job_runs_on_its_schedule_in_the_page_process(
    server: Server, world: World
) -> None:
    db = Database(world.settings.database_url)
    try:
        deadline = time.monotonic() + 60
        reports: list[DriftReport] = []
        while time.monotonic() < deadline and len(reports) < 2:
            with db.session() as s:
                reports = list(s.query(DriftReport).order_by(DriftReport.id))
            time.sleep(0.5)
    finally:
        db.dispose()
    assert len(reports) >= 2, server.log.read_text()[-3000:]
    first = reports[0].report or {}
    assert first.get("status") == "baseline" and reports[0].model_version_id is not None
    assert "drift job running in this process every 1 s" in server.log.read_text()
