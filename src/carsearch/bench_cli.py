"""`carsearch bench ...` (vector benchmarks) and the `carsearch evaluate ann` command.

`app` is the `bench` sub-app; `ann_command` is a plain command function that the root CLI
registers as `carsearch evaluate ann`. Settings come from the root context's `obj`.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

import typer

from carsearch.cli_context import HealthPort, once_or_every, settings_from
from carsearch.platform.errors import ConfigError
from carsearch.platform.settings import Settings

__all__ = ["ann_command", "app"]

log = logging.getLogger(__name__)

app = typer.Typer(
    name="bench",
    help="Benchmarks: Milvus Lite against FAISS exact search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("vectors")
def vectors_command(
    ctx: typer.Context,
    n: Annotated[int, typer.Option(min=100, help="Number of stored vectors.")] = 10_000,
    dim: Annotated[int, typer.Option(min=2, help="Vector dimension.")] = 192,
    queries: Annotated[int, typer.Option(min=10, help="Number of queries.")] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="Queries per batched call.")] = 32,
    clusters: Annotated[int, typer.Option(min=1, help="Gaussian clusters in the data.")] = 1000,
    threads: Annotated[bool, typer.Option(help="Also measure FAISS/torch thread counts.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not markdown.")] = False,
) -> None:
    """Insert/flush/build times, latency p50/p95 and recall@10 of Milvus Lite configurations
    next to FAISS exact search, on synthetic clustered unit vectors."""
    from carsearch.platform import vector_bench as vb

    settings = settings_from(ctx)
    report = vb.run_vector_bench(n, dim, n_queries=queries, batch_size=batch_size,
                                 n_clusters=clusters, workdir=_workdir(settings))
    thread_results = vb.thread_bench(n, dim) if threads else []
    if as_json:
        out: dict[str, Any] = report.to_dict()
        if thread_results:
            out["threads"] = [r.to_dict() for r in thread_results]
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(vb.to_markdown(report))
    if thread_results:
        typer.echo(vb.thread_markdown(thread_results, report.machine))


def _workdir(settings: Settings) -> str | None:
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return str(settings.data_dir)


def ann_command(
    ctx: typer.Context,
    queries: Annotated[str, typer.Option(
        help="Query set: 'classes' (the evaluation queries) or 'logged' (query log sample).")
    ] = "classes",
    n: Annotated[int, typer.Option(min=1, help="Number of queries.")] = 200,
    k: Annotated[int, typer.Option(min=1, max=1000, help="Top-k compared.")] = 100,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    every: Annotated[float | None, typer.Option(
        help="Repeat every SECONDS until SIGINT/SIGTERM.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    health_port: Annotated[int, HealthPort] = 0,
) -> None:
    """Audit Milvus ANN results of the serving version against FAISS exact search; the
    report (recall@1/10/k, score agreement, latency) is printed and recorded."""
    from carsearch.platform.ann_audit import run_ann_audit
    from carsearch.platform.runtime import Platform

    if queries not in ("classes", "logged"):
        raise ConfigError(f"--queries must be 'classes' or 'logged', got {queries!r}")
    platform = Platform(settings_from(ctx))

    def once() -> None:
        report = run_ann_audit(platform, queries=queries,  # type: ignore[arg-type]
                               n=n, k=k, seed=seed, progress=not as_json)
        typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())

    once_or_every(platform, once, every, name="ann-audit", health_port=health_port)
