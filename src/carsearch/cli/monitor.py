"""Monitoring verbs: `carsearch drift run`, `carsearch evaluate ann`, `carsearch health`.

`drift_app` is the `drift` sub-app; `ann_command` is registered as `carsearch evaluate ann`
and `health_command` as `carsearch health`. Settings come from the root context.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from datetime import datetime
from typing import Annotated, Any

import typer

from carsearch.cli.context import HealthPort, once_or_every, settings_from
from carsearch.platform.errors import ConfigError

__all__ = ["ann_command", "drift_app", "health_command", "parse_since"]

log = logging.getLogger(__name__)

# --- drift ----------------------------------------------------------------------------------

drift_app = typer.Typer(help="Drift monitoring: isolated clusters of new embeddings trigger "
                  "retraining.", no_args_is_help=True)


def parse_since(value: str) -> datetime:
    """An ISO-8601 date or time; without an offset it is taken as UTC."""
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        raise ConfigError(
            f"--since must be an ISO-8601 date or time (2025-01-31T12:00:00+00:00), "
            f"got {value!r}"
        ) from None


@drift_app.command("run")
def run_command(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(
        help="Check images ingested since this ISO time (default: since the last report; "
             "the first run records a baseline).")] = None,
    every: Annotated[float | None, typer.Option(
        help="Repeat every SECONDS until SIGINT/SIGTERM.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    health_port: Annotated[int, HealthPort] = 0,
) -> None:
    """Compare the kNN density of newly indexed images with the collection's, record a
    drift report, and start the retrain command when isolated clusters are found."""
    from carsearch.monitoring.drift import run_drift
    from carsearch.platform.runtime import Platform

    start = parse_since(since) if since is not None else None
    if start is not None and every is not None:
        raise ConfigError("--since checks one window; --every follows the last report: "
                          "use one of them")
    platform = Platform(settings_from(ctx))

    def once() -> None:
        run = run_drift(platform, since=start, progress=not as_json and every is None)
        typer.echo(json.dumps(run.to_dict(), indent=2) if as_json else run.summary())

    once_or_every(platform, once, every, name="drift-job", health_port=health_port)


# --- the ANN audit ---------------------------------------------------------------------------


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
    from carsearch.monitoring.ann_audit import run_ann_audit
    from carsearch.platform.runtime import Platform

    if queries not in ("classes", "logged"):
        raise ConfigError(f"--queries must be 'classes' or 'logged', got {queries!r}")
    platform = Platform(settings_from(ctx))

    def once() -> None:
        report = run_ann_audit(platform, queries=queries,  # type: ignore[arg-type]
                               n=n, k=k, seed=seed, progress=not as_json)
        typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())

    once_or_every(platform, once, every, name="ann-audit", health_port=health_port)


# --- health ---------------------------------------------------------------------------------


def health_command(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(
        min=1, max=65535, help="Ask the process whose --health-port this is.")] = None,
    host: Annotated[str | None, typer.Option(
        help="Host of that port (default CARSEARCH_HEALTH_HOST).")] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole answer.")] = False,
) -> None:
    """Readiness: loops alive, database, Milvus and a serving version answering."""
    settings = settings_from(ctx)
    if port is not None:
        ok, body = _ask(host or settings.health_host, port, timeout)
    else:
        from carsearch.monitoring.health import readiness
        from carsearch.platform.runtime import Platform

        platform = Platform(settings)
        try:
            checks = readiness(platform)
        finally:
            platform.close()
        ok = all(c["ok"] for c in checks.values())
        body = {"ok": ok, "checks": checks}
    if as_json:
        typer.echo(json.dumps(body, indent=2, default=str))
    else:
        typer.echo(_summary(ok, body))
    raise typer.Exit(0 if ok else 1)


def _ask(host: str, port: int, timeout: float) -> tuple[bool, dict[str, Any]]:
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200, json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503: not ready, with the reasons
        return False, json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, {"ok": False, "error": f"no answer from {url}: {exc}"}


def _summary(ok: bool, body: dict[str, Any]) -> str:
    parts = [f"{'ready' if ok else 'NOT READY'}"]
    if body.get("error"):
        parts.append(str(body["error"]))
    for name, check in (body.get("checks") or {}).items():
        parts.append(f"{name}: {check.get('detail') if check.get('ok') else check.get('error')}")
    for loop in body.get("loops") or []:
        parts.append(f"loop {loop['name']}: {loop['state']}"
                     + (f" ({loop['last_error']})" if loop.get("last_error") else ""))
    return "; ".join(parts)
