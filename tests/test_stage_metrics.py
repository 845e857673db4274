"""Per-stage timing histograms: an ingest batch observes read, decode, embed and write; a
search observes encode, vector search and metadata (carsearch_*_stage_seconds).

Real parts: SQLite, a Milvus Lite file, the compact model, the queue and the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from carsearch.ingest.worker import IngestWorker
from carsearch.platform.db import queue
from carsearch.platform.runtime import Platform
from carsearch.platform.search.service import SearchRequest
from carsearch.platform.telemetry import INGEST_STAGES, METRICS, SEARCH_STAGES
from ingest_world import PublishedModel, make_image, world

N_IMAGES = 10
CHUNK = 8  # two chunks: 8 images, then 2


def _counts(metric: str, stages: tuple[str, ...]) -> dict[str, float]:
    return {s: METRICS.registry.get_sample_value(f"{metric}_count", {"stage": s}) or 0.0
            for s in stages}


def _sums(metric: str, stages: tuple[str, ...]) -> dict[str, float]:
    return {s: METRICS.registry.get_sample_value(f"{metric}_sum", {"stage": s}) or 0.0
            for s in stages}


@pytest.fixture
def platform(tmp_path: Path, make_database, published_model: PublishedModel
             ) -> Iterator[Platform]:
    p = world(tmp_path, make_database("sqlite").url, published_model, str(tmp_path / "m.db"))
    yield p
    p.close()


def _ingest(p: Platform, tmp_path: Path) -> None:
    files = [make_image(tmp_path / f"car{i}.png", i) for i in range(N_IMAGES)]
    queue.enqueue(p.db, [{"path": str(f), "source": "test", "meta": {}} for f in files])
    stats = IngestWorker(p, batch_size=N_IMAGES, decode_chunk=CHUNK).run_once()
    assert stats.summary.indexed == N_IMAGES


def test_an_ingest_batch_observes_every_stage(platform: Platform, tmp_path: Path) -> None:
    metric = "carsearch_ingest_stage_seconds"
    before, sums_before = _counts(metric, INGEST_STAGES), _sums(metric, INGEST_STAGES)
    _ingest(platform, tmp_path)
    after, sums_after = _counts(metric, INGEST_STAGES), _sums(metric, INGEST_STAGES)
    delta = {s: after[s] - before[s] for s in INGEST_STAGES}
    # read and decode once per image; embed and write once per chunk written together
    assert delta == {"read": N_IMAGES, "decode": N_IMAGES, "embed": 2, "write": 2}
    assert all(sums_after[s] > sums_before[s] for s in INGEST_STAGES), (sums_before,
                                                                       sums_after)


def test_a_search_observes_every_stage(platform: Platform, tmp_path: Path) -> None:
    _ingest(platform, tmp_path)
    metric = "carsearch_search_stage_seconds"
    before, sums_before = _counts(metric, SEARCH_STAGES), _sums(metric, SEARCH_STAGES)
    result = platform.search.search(SearchRequest("a vehicle photo", 5))
    assert len(result.hits) == 5
    after, sums_after = _counts(metric, SEARCH_STAGES), _sums(metric, SEARCH_STAGES)
    assert {s: after[s] - before[s] for s in SEARCH_STAGES} == dict.fromkeys(SEARCH_STAGES, 1)
    assert all(sums_after[s] > sums_before[s] for s in SEARCH_STAGES)


def test_every_stage_is_exported_before_any_observation() -> None:
    """A fresh process's /metrics shows every stage (at zero), so a dashboard and a scrape
    see the series before the first batch or search."""
    text = METRICS.text().decode()
    for s in INGEST_STAGES:
        assert f'carsearch_ingest_stage_seconds_count{{stage="{s}"}}' in text
    for s in SEARCH_STAGES:
        assert f'carsearch_search_stage_seconds_count{{stage="{s}"}}' in text
