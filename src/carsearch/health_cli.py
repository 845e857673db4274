"""`carsearch health`: is this deployment (or one process of it) ready?

With ``--port`` it asks a running process's health port (what docker-compose
healthchecks call); without, it checks the database, Milvus and the serving version
from here. Exit status 0 when ready, 1 when not.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Annotated, Any

import typer

from carsearch.cli_context import settings_from


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
        from carsearch.platform.health import readiness
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
