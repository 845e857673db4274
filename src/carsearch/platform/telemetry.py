"""Prometheus metrics a process updates as it works: one registry per process.

The search service, the ingest worker and the drift job count here; the health port of
a long-running process (monitoring.health) serves the registry as ``/metrics``, with
figures read from the database at scrape time beside them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


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
        self.drift_runs = Counter(
            "carsearch_drift_runs_total", "Drift job runs in this process, by status",
            ["status"], registry=self.registry)

    def text(self) -> bytes:
        return bytes(generate_latest(self.registry))


METRICS = Metrics()
