"""The README's commands are the ones the project provides."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, flags=re.M))


def test_readme_starts_with_the_two_commands() -> None:
    lines = [ln.strip() for ln in (REPO / "README.md").read_text().splitlines()]
    first_block = lines[lines.index("```sh") + 1 : lines.index("```")]
    assert first_block[:2] == ["make demo", "make test"]
    assert lines.index("```sh") < 12, "the two commands come first"
    assert {"demo", "test"} <= _make_targets()


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (REPO / ".ci" / "run").read_text()


def _code_lines() -> list[str]:
    """Lines inside the README's fenced code blocks, without a leading `$ `."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", (REPO / "README.md").read_text(),
                        flags=re.M | re.S)
    return [ln.strip().removeprefix("$ ") for b in blocks for ln in b.splitlines()]


def test_every_make_target_in_the_readme_exists() -> None:
    for target in [m[1] for ln in _code_lines() if (m := re.match(r"make ([a-z][\w-]*)", ln))]:
        assert target in _make_targets(), target


def test_every_carsearch_verb_in_the_readme_exists() -> None:
    from typer.main import get_command

    from carsearch.cli import app

    root = get_command(app)
    lines = _code_lines()
    verbs = {m[1] for ln in lines
             if (m := re.match(r"(?:\S+=\S+ )*(?:\.venv/bin/)?carsearch ([a-z]+)", ln))}
    assert {"search", "db", "models"} <= verbs
    for verb in verbs:
        assert verb in root.commands, f"README shows `carsearch {verb}`, which does not exist"  # type: ignore[attr-defined]
