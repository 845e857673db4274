"""Prometheus metrics a process updates as it works: one registry per process.

The search service, the ingest worker and the drift job count here; the health port of
a long-running process (monitoring.health) serves the registry as ``/metrics``, with
figures read from the database at scrape time beside them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The stages a per-stage timing histogram has, as clip-retrieval's runner reports them.
# Ingest: read (the file's bytes, hashed), decode (to a bounded image), embed (a chunk of
# images through the serving encoder), write (the chunk's vectors into Milvus and its rows
# into the database). Search: encode (the query), vector_search (Milvus or the mirror,
# every relaxation tier), metadata (the hits' rows from the database).
INGEST_STAGES = ("read", "decode", "embed", "write")
SEARCH_STAGES = ("encode", "vector_search", "metadata")
STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5,
                 5.0, 10.0)


class Metrics:
    """The Prometheus metrics a process updates as it works (one registry per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.search_latency = Histogram(
            "carsearch_search_latency_seconds",
            "Search service latency (encode, vector search, metadata), by query kind and "
            "by what answered it (mirror, milvus_lite, milvus_server)",
            ["kind", "path"], registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5),
        )
        self.queries = Counter(
            "carsearch_queries_total", "Searches by outcome (ok, empty, bad_input, error)",
            ["outcome"], registry=self.registry)
        self.queries_relaxed = Counter(
            "carsearch_queries_relaxed_total",
            "Text searches whose filters read from the text were relaxed to fill the page",
            registry=self.registry)
        self.ingested = Counter(
            "carsearch_ingest_images_total", "Images this process ingested, by outcome",
            ["outcome"], registry=self.registry)
        self.batches = Counter(
            "carsearch_ingest_batches_total", "Ingest batches this process ran, by outcome",
            ["outcome"], registry=self.registry)
        self.ingest_paused = Gauge(
            "carsearch_ingest_paused",
            "1 while this process's ingest worker holds back claiming because of a lasting "
            "failure, by cause (no_serving_version, vector_store, disk_full)",
            ["cause"], registry=self.registry)
        self.ingest_stage = Histogram(
            "carsearch_ingest_stage_seconds",
            "Ingest time by stage: read and decode per image; embed and write per chunk "
            "of images written together",
            ["stage"], registry=self.registry, buckets=STAGE_BUCKETS)
        self.search_stage = Histogram(
            "carsearch_search_stage_seconds",
            "Search time by stage, per search: encode the query, vector search, metadata",
            ["stage"], registry=self.registry, buckets=STAGE_BUCKETS)
        for stage in INGEST_STAGES:  # exported (at zero) before the first observation
            self.ingest_stage.labels(stage)
        for stage in SEARCH_STAGES:
            self.search_stage.labels(stage)
        self.drift_runs = Counter(
            "carsearch_drift_runs_total", "Drift job runs in this process, by status",
            ["status"], registry=self.registry)

    @contextmanager
    def ingest_timer(self, stage: str) -> Iterator[None]:
        """Observe how long the block took as ingest stage ``stage``."""
        t0 = perf_counter()
        try:
            yield
        finally:
            self.ingest_stage.labels(stage).observe(perf_counter() - t0)

    def text(self) -> bytes:
        return bytes(generate_latest(self.registry))


METRICS = Metrics()
