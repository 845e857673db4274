"""`python -m carsearch.ui serve`: the search page without the full CLI (tests, containers).

Same as `carsearch serve`; settings come from the CARSEARCH_* environment.
"""

from __future__ import annotations

import logging
import sys

import typer

from carsearch.platform.errors import CarsearchError
from carsearch.platform.settings import apply_thread_settings, load_settings
from carsearch.ui_cli import serve_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _root(ctx: typer.Context) -> None:
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "milvus_lite", "faiss.loader"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    apply_thread_settings(settings)
    ctx.obj = settings


app.command("serve")(serve_command)


def main() -> None:
    try:
        app()
    except CarsearchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
