"""The test suite's own layout: no test module imports another (shared fixtures and
helpers live in tests/conftest.py and tests/fixtures/), so what a module uses is visible
and a fixture change has one home."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another_or_conftest() -> None:
    offenders = {
        f"{path.name} imports {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for name in _imported_modules(path)
        if name == "conftest" or (name.startswith("test_") and name != path.stem)
    }
    assert not offenders, (
        f"{sorted(offenders)}: move what is shared into tests/fixtures/ (a fixture module "
        "goes in conftest.py's pytest_plugins) and import it from there")
