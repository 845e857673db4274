"""docker-compose.yml against the Compose Specification schema (no Docker engine runs
on these machines, so the file is validated, not started)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    if not SCHEMA.is_file():
        pytest.skip(f"the Compose schema is not at {SCHEMA}")
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def test_compose_file_matches_the_specification(
    compose: dict, validator: jsonschema.Draft7Validator
) -> None:
    assert [e.message for e in validator.iter_errors(compose)] == []


def test_the_validation_catches_a_broken_file(
    compose: dict, validator: jsonschema.Draft7Validator
) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["search"]["restart"] = 3
    broken["services"]["search"]["healthcheck"] = {"interval": ["5s"]}
    assert len(list(validator.iter_errors(broken))) >= 2


def test_the_platform_runs_against_the_production_parts(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "milvus", "ollama", "migrate", "ingest", "search", "ann-audit",
            "drift"} <= set(services)
    env = services["ingest"]["environment"]
    assert env["CARSEARCH_MILVUS_URI"] == "http://milvus:19530"
    assert env["CARSEARCH_DATABASE_URL"].startswith("postgresql+psycopg://")
    # Every carsearch command in the file is a real verb.
    from typer.main import get_command

    from carsearch.cli import app

    verbs = get_command(app).commands  # type: ignore[attr-defined]
    for name, svc in services.items():
        cmd = svc.get("command")
        if svc.get("image", "").startswith("carsearch") and isinstance(cmd, list):
            assert cmd[0].startswith("--") or cmd[0] in verbs, (name, cmd)
    assert services["migrate"]["command"] == ["db", "upgrade"]


def test_every_long_running_process_has_a_healthcheck_on_its_health_port(
    compose: dict,
) -> None:
    services = compose["services"]
    for name in ("ingest", "search", "ann-audit", "drift"):
        cmd = services[name]["command"]
        port = cmd[cmd.index("--health-port") + 1]
        check = services[name]["healthcheck"]["test"]
        assert check == ["CMD", "carsearch", "health", "--port", port], name
