"""docker-compose.yml against the Compose Specification schema (no Docker engine runs
on these machines, so the file is validated, not started)."""

from __future__ import annotations

import copy
import json
import re
import stat
import subprocess
import sys
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
            "drift", "retrain"} <= set(services)
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
    for name in ("ingest", "search", "ann-audit", "drift", "retrain"):
        cmd = services[name]["command"]
        port = cmd[cmd.index("--health-port") + 1]
        check = services[name]["healthcheck"]["test"]
        assert check == ["CMD", "carsearch", "health", "--port", port], name


# ---- secure by default (issue 17) ------------------------------------------------------------

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|ACCESS_KEY|ROOT_USER", re.I)
# Well-known default credentials of the images and of this project's earlier file.
DEFAULT_CREDENTIALS = ("minioadmin", "root:Milvus", "carsearch:carsearch@",
                       "postgres:postgres", "POSTGRES_PASSWORD: ", "Milvus\"")
PLATFORM = ("migrate", "ingest", "search", "ann-audit", "drift", "retrain", "cli")


def _environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def _secret_names(svc: dict) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in svc.get("secrets") or []}


def _bind_host(port: object) -> str | None:
    """The host address a published port binds to, with ${VAR:-default} resolved to its
    default; None where none is given (all interfaces)."""
    if isinstance(port, dict):
        return port.get("host_ip")
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(port))
    parts = text.rsplit(":", 2)
    return parts[0] if len(parts) == 3 else None


def open_doors(compose: dict) -> list[str]:
    """What would let someone into a fresh `docker compose up`: one line per door."""
    doors = []
    services, secrets = compose["services"], compose.get("secrets") or {}
    for name, secret in secrets.items():
        if set(secret) != {"file"} or not str(secret["file"]).startswith("./secrets/"):
            doors.append(f"secret {name} is not a file under ./secrets/")
    for name, svc in services.items():
        for port in svc.get("ports") or []:
            if name != "search":
                doors.append(f"{name} publishes {port}")
            elif _bind_host(port) != "127.0.0.1":
                doors.append(f"the page's port {port} does not default to 127.0.0.1")
        env = _environment(svc)
        for var, value in env.items():
            if var.endswith("_FILE"):
                secret = value.removeprefix("/run/secrets/")
                if secret == value or secret not in _secret_names(svc) | set(secrets):
                    doors.append(f"{name}: {var} is not a Compose secret")
                elif secret not in _secret_names(svc):
                    doors.append(f"{name}: {var} names secret {secret}, not given to it")
            elif SECRET_NAME.search(var) and var != "COMMON_SECURITY_AUTHORIZATIONENABLED":
                doors.append(f"{name}: {var} is a literal in the file")
            elif "://" in value:
                from sqlalchemy.engine import make_url

                if value.startswith("postgresql") and make_url(value).password is not None:
                    doors.append(f"{name}: {var} carries a password")
        for secret in _secret_names(svc):
            if secret not in secrets:
                doors.append(f"{name}: secret {secret} is not defined")
    milvus = services["milvus"]
    if _environment(milvus).get("COMMON_SECURITY_AUTHORIZATIONENABLED") != "true":
        doors.append("Milvus runs without authentication")
    command = " ".join(milvus.get("command") or [])
    for var, secret in (("COMMON_SECURITY_DEFAULTROOTPASSWORD", "milvus_root_password"),
                        ("MINIO_ACCESS_KEY_ID", "minio_root_user"),
                        ("MINIO_SECRET_ACCESS_KEY", "minio_root_password")):
        if f'{var}="$$(cat /run/secrets/{secret})"' not in command:
            doors.append(f"Milvus does not take {var} from the secret {secret}")
    minio = _environment(services["minio"])
    for var in ("MINIO_ROOT_USER_FILE", "MINIO_ROOT_PASSWORD_FILE"):
        if var not in minio:
            doors.append(f"MinIO has no {var}: it would start with minioadmin")
    if "POSTGRES_PASSWORD_FILE" not in _environment(services["postgres"]):
        doors.append("PostgreSQL has no POSTGRES_PASSWORD_FILE")
    for name in PLATFORM:
        env = _environment(services[name])
        if name != "migrate" and env.get("CARSEARCH_MILVUS_TOKEN_FILE") is None:
            doors.append(f"{name} connects to Milvus without a token")
        if env.get("CARSEARCH_DATABASE_PASSWORD_FILE") is None:
            doors.append(f"{name} has no database password")
    if _environment(services["search"]).get("CARSEARCH_UI_AUTH_FILE") is None:
        doors.append("the search page has no login")
    return doors


def test_a_fresh_compose_up_has_no_open_door(compose: dict) -> None:
    assert open_doors(compose) == []
    text = (REPO / "docker-compose.yml").read_text()
    assert [c for c in DEFAULT_CREDENTIALS if c in text] == []
    published = {n for n, s in compose["services"].items() if s.get("ports")}
    assert published == {"search"}
    assert "expose" not in json.dumps(compose)


@pytest.mark.parametrize("door", [
    "milvus-port", "page-on-all-interfaces", "minio-default", "milvus-no-auth",
    "password-in-url", "token-literal", "no-page-login", "secret-not-a-file",
    "secret-not-given",
])
def test_each_door_is_caught(compose: dict, door: str) -> None:
    """The check above finds each door of the file as it was before issue 17."""
    c = copy.deepcopy(compose)
    services = c["services"]
    if door == "milvus-port":
        services["milvus"]["ports"] = ["19530:19530"]
    elif door == "page-on-all-interfaces":
        services["search"]["ports"] = ["7860:7860"]
    elif door == "minio-default":
        services["minio"]["environment"] = {"MINIO_ROOT_USER": "minioadmin",
                                            "MINIO_ROOT_PASSWORD": "minioadmin"}
    elif door == "milvus-no-auth":
        del services["milvus"]["environment"]["COMMON_SECURITY_AUTHORIZATIONENABLED"]
    elif door == "password-in-url":
        services["ingest"]["environment"] = {
            **services["ingest"]["environment"],
            "CARSEARCH_DATABASE_URL": "postgresql+psycopg://carsearch:carsearch@postgres/c"}
    elif door == "token-literal":
        services["drift"]["environment"] = {**services["drift"]["environment"],
                                            "CARSEARCH_MILVUS_TOKEN": "root:Milvus"}
    elif door == "no-page-login":
        env = dict(services["search"]["environment"])
        del env["CARSEARCH_UI_AUTH_FILE"]
        services["search"]["environment"] = env
    elif door == "secret-not-a-file":
        c["secrets"]["ui_auth"] = {"environment": "UI_AUTH"}
    elif door == "secret-not-given":
        services["search"]["secrets"] = ["postgres_password", "milvus_token"]
    assert open_doors(c), door


def test_the_secrets_folder_is_never_committed() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", "secrets/ui_auth"], cwd=REPO,
                             check=False)
    assert ignored.returncode == 0, "secrets/ is not in .gitignore"
    tracked = subprocess.run(["git", "ls-files", "secrets"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
    assert tracked == ""


def test_make_secrets_writes_what_compose_and_the_platform_read(
    compose: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make secrets` writes every secret the file names, private and random; the
    platform's settings, given the page's environment with /run/secrets/ pointing at
    them, read the login, the Milvus token and the database password from them."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_secrets
    finally:
        sys.path.pop(0)
    out = tmp_path / "secrets"
    assert make_secrets.main(["--dir", str(out), "--ui-user", "ada"]) == 0
    assert {f.name for f in out.iterdir()} == set(compose["secrets"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    values = {f.name: f.read_text().strip() for f in out.iterdir()}
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert values["milvus_token"] == "root:" + values["milvus_root_password"]
    assert values["ui_auth"].startswith("ada:") and len(values["ui_auth"]) > 20
    assert len(set(values.values())) == len(values)  # all different
    # A second run keeps them (the volumes hold the first passwords); --force renews.
    assert make_secrets.write_secrets(out, "ada") == []
    assert {f.name: f.read_text().strip() for f in out.iterdir()} == values
    (out / "milvus_token").unlink()
    assert make_secrets.write_secrets(out, "ada") == ["milvus_token"]
    assert (out / "milvus_token").read_text().strip() == values["milvus_token"]
    assert set(make_secrets.write_secrets(out, "ada", force=True)) == set(values)
    assert (out / "postgres_password").read_text().strip() != values["postgres_password"]

    from carsearch.platform.settings import load_settings

    values = {f.name: f.read_text().strip() for f in out.iterdir()}
    for var, value in _environment(compose["services"]["search"]).items():
        monkeypatch.setenv(var, value.replace("/run/secrets/", f"{out}/"))
    monkeypatch.setenv("CARSEARCH_DATA_DIR", str(tmp_path / "data"))
    settings = load_settings()
    assert settings.ui_auth == values["ui_auth"]
    assert settings.milvus_token == values["milvus_token"]
    from sqlalchemy.engine import make_url

    assert make_url(settings.database_url).password == values["postgres_password"]


def test_milvus_searches_unsealed_rows_at_the_codes_interim_nprobe(
    compose: dict, tmp_path: Path
) -> None:
    """docker-compose's Milvus, the Helm values of the cluster (deploy/milvus/values.yaml)
    and every server the code starts (LocalMilvusServer) search growing segments through
    the interim index at one nprobe, the code's INTERIM_INDEX_NPROBE. Compose sets it as
    Milvus reads any key from the environment: the dotted key upper-cased, dots as
    underscores, as COMMON_SECURITY_AUTHORIZATIONENABLED is set."""
    from carsearch.platform.vectors.server import INTERIM_INDEX_NPROBE, LocalMilvusServer

    key = "queryNode.segcore.interimIndex.nprobe"
    env = _environment(compose["services"]["milvus"])
    assert env[key.upper().replace(".", "_")] == str(INTERIM_INDEX_NPROBE)
    values = yaml.safe_load((REPO / "deploy" / "milvus" / "values.yaml").read_text())
    assert values["cluster"]["enabled"] is True
    user = yaml.safe_load(values["extraConfigFiles"]["user.yaml"])
    assert user["queryNode"]["segcore"]["interimIndex"]["nprobe"] == INTERIM_INDEX_NPROBE
    assert user["common"]["security"]["authorizationEnabled"] is True
    assert LocalMilvusServer(tmp_path).extra_config[key] == INTERIM_INDEX_NPROBE
    off = {"queryNode.segcore.interimIndex.enableIndex": False}
    assert LocalMilvusServer(tmp_path, extra_config=off).extra_config == {
        key: INTERIM_INDEX_NPROBE, **off}
    assert LocalMilvusServer(tmp_path, extra_config={key: 128}).extra_config[key] == 128
