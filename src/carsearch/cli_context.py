"""What every CLI verb needs from the Typer context: the Settings the root built."""

from __future__ import annotations

import typer

from carsearch.platform.settings import Settings, load_settings


def settings_from(ctx: typer.Context) -> Settings:
    """The Settings the `carsearch` root callback built, or fresh ones from the
    environment when a verb runs under another root (a test's own Typer app)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else load_settings()
