"""What CLI verbs share: the Settings the root built, and running a job on a schedule."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import typer

from carsearch.platform.settings import Settings, load_settings

if TYPE_CHECKING:
    from carsearch.platform.runtime import Platform


def settings_from(ctx: typer.Context) -> Settings:
    """The Settings the `carsearch` root callback built, or fresh ones from the
    environment when a verb runs under another root (a test's own Typer app)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else load_settings()


def once_or_every(platform: Platform, job: Callable[[], None], every: float | None) -> None:
    """Run a job once, or every ``every`` seconds until SIGINT/SIGTERM; then close the
    platform (the scheduled verbs: `evaluate ann`, `drift run`)."""
    from carsearch.platform.ann_audit import run_every

    try:
        if every is None:
            job()
        else:
            run_every(job, every)
    finally:
        platform.close()
