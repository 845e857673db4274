"""The two test tiers (tests/conftest.py): which tests `make test` runs, and that under CI
a missing real-photo set fails the tests that need it instead of skipping them. Each case
runs pytest in a subprocess on a few existing tests (the full tier: ~3 pytest start-ups)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.common import REPO

pytestmark = pytest.mark.full  # three pytest subprocesses: CI checks the tiers


def _pytest(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k not in {"CI", "CARSEARCH_STANFORD_ROOT"}}
    e.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=REPO, env=e, capture_output=True, text=True, timeout=240)


def test_the_fast_tier_keeps_the_embedded_shape_and_leaves_the_rest() -> None:
    p = _pytest("--collect-only", "-q", "-m", "not full", "tests/test_migrations.py",
                "tests/test_cli.py", "tests/test_base_model.py")
    fast = {ln for ln in p.stdout.splitlines() if "::" in ln}
    assert "tests/test_migrations.py::test_upgrade_then_downgrade[sqlite]" in fast
    assert "tests/test_migrations.py::test_unreachable_database_is_one_line" in fast
    assert "tests/test_cli.py::test_help_lists_every_verb" in fast
    # PostgreSQL shapes, a named slow test, the real photos: the full tier only
    assert not any("postgresql" in t for t in fast), fast
    assert "tests/test_cli.py::test_round_trip" not in fast
    assert "tests/test_base_model.py::test_stanford_class_names_read_from_meta" not in fast
    assert "tests/test_base_model.py::test_stanford_class_names_absent_file_gives_none" in fast
    full = _pytest("--collect-only", "-q", "-m", "full", "tests/test_migrations.py")
    assert "tests/test_migrations.py::test_upgrade_then_downgrade[postgresql]" in full.stdout


def test_under_ci_missing_real_photos_fail_instead_of_skipping(tmp_path: Path) -> None:
    test = "tests/test_base_model.py::test_stanford_class_names_read_from_meta"
    away = str(tmp_path / "no-stanford")
    here = _pytest("-q", test, CARSEARCH_STANFORD_ROOT=away)
    assert here.returncode == 0 and "1 skipped" in here.stdout, here.stdout
    ci = _pytest("-q", test, CARSEARCH_STANFORD_ROOT=away, CI="true")
    assert ci.returncode == 1, ci.stdout
    assert "CI must run the real-photo tests" in ci.stdout
