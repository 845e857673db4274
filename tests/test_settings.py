"""Settings: defaults under the data directory, environment parsing, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from carsearch.platform.settings import Settings, SettingsError, load_settings


def test_defaults_live_under_the_data_dir(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert s.database_url == f"sqlite:///{(tmp_path / 'carsearch.db').resolve()}"
    assert s.milvus_uri == str((tmp_path / "milvus.db").resolve())
    assert s.milvus_is_lite
    assert s.model_dir == tmp_path / "models"
    assert s.threads.torch >= 1


def test_environment_with_prefix_and_nested_delimiter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARSEARCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CARSEARCH_MILVUS_URI", "http://milvus:19530")
    monkeypatch.setenv("CARSEARCH_THREADS__TORCH", "1")
    monkeypatch.setenv("CARSEARCH_OLLAMA_MODEL", "llama3.2:3b")
    s = load_settings()
    assert s.data_dir == tmp_path
    assert s.milvus_uri == "http://milvus:19530"
    assert not s.milvus_is_lite
    assert s.threads.torch == 1
    assert s.ollama_model == "llama3.2:3b"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CARSEARCH_THREADS__TORCH", "many"),
        ("CARSEARCH_THREADS__FAISS", "0"),
        ("CARSEARCH_DATABASE_URL", "mysql://x"),
        ("CARSEARCH_MILVUS_URI", "ftp://milvus"),
        ("CARSEARCH_ENCODE_BATCH_SIZE", "-3"),
        ("CARSEARCH_LOG_LEVEL", "LOUD"),
    ],
)
def test_invalid_values_name_the_variable(
    var: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert var in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("var", "value"),
    [("RETRAIN_COMMAND", "touch pwned"), ("K", "3"), ("TORCH", "abc"), ("FAISS", "7"),
     ("MIN_CLUSTER_SIZE", "2"), ("DRIFT__K", "4"), ("THREADS__TORCH", "9")],
)
def test_only_prefixed_variables_configure_the_platform(
    var: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(var, value)
    s = load_settings()
    for group in (s.drift, s.threads):
        defaults = {name: f.default for name, f in type(group).model_fields.items()}
        assert group.model_dump() == defaults


def test_nested_errors_name_the_prefixed_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARSEARCH_DRIFT__K", "abc")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "CARSEARCH_DRIFT__K" in str(err.value) and "CARSEARCH_K" not in str(err.value)
    monkeypatch.delenv("CARSEARCH_DRIFT__K")
    monkeypatch.setenv("CARSEARCH_DRIFT__RETRAIN_COMMAND", "carsearch train --promote")
    assert load_settings().drift.retrain_command == "carsearch train --promote"


# ---- secrets from files (Compose secrets) ---------------------------------------------------


def test_secrets_are_read_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("ui_auth", "ada:s3cret pw"), ("milvus_token", "root:tok3n"),
                        ("database_password", "p@ss/w:rd")):
        (tmp_path / name).write_text(value + "\n")
        monkeypatch.setenv(f"CARSEARCH_{name.upper()}_FILE", str(tmp_path / name))
    monkeypatch.setenv("CARSEARCH_DATABASE_URL", "postgresql+psycopg://carsearch@db:5432/cs")
    s = load_settings()
    assert s.ui_auth == "ada:s3cret pw" and s.milvus_token == "root:tok3n"
    from sqlalchemy.engine import make_url

    url = make_url(s.database_url)
    assert url.password == "p@ss/w:rd" and url.username == "carsearch" and url.host == "db"
    # Never shown: not in the settings' repr.
    for secret in ("s3cret", "tok3n", "p@ss"):
        assert secret not in repr(s)


@pytest.mark.parametrize("problem", ["missing", "empty", "both", "url-has-password"])
def test_unusable_secret_files_are_one_line_errors_without_the_secret(
    problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "ui_auth"
    secret.write_text("" if problem == "empty" else "ada:hunter22\n")
    if problem == "missing":
        secret = tmp_path / "nowhere"
    var = "CARSEARCH_UI_AUTH_FILE"
    if problem == "url-has-password":
        var = "CARSEARCH_DATABASE_PASSWORD_FILE"
        monkeypatch.setenv("CARSEARCH_DATABASE_URL", "postgresql+psycopg://u:old@db/cs")
    monkeypatch.setenv(var, str(secret))
    if problem == "both":
        monkeypatch.setenv("CARSEARCH_UI_AUTH", "bob:other")
    with pytest.raises(SettingsError) as err:
        load_settings()
    message = str(err.value)
    assert "\n" not in message and "hunter22" not in message
    assert ("CARSEARCH_DATABASE_PASSWORD" if problem == "url-has-password" else var) in message


def test_the_hnsw_ef_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CARSEARCH_MILVUS_SEARCH_EF reaches the store's search parameters (256 by default,
    the index's own default; still raised to k where k is larger)."""
    from carsearch.platform.runtime import Platform
    from carsearch.platform.vectors.milvus import DEFAULT_SEARCH_EF, IndexSpec, search_params_for

    assert Settings(data_dir=tmp_path).milvus_search_ef == DEFAULT_SEARCH_EF == 256
    assert IndexSpec.default_for(False).search_params == {"ef": DEFAULT_SEARCH_EF}
    p = Platform(Settings(data_dir=tmp_path))
    assert p.store.index.search_params == {"ef": 256}  # type: ignore[attr-defined]
    p.close()
    monkeypatch.setenv("CARSEARCH_MILVUS_SEARCH_EF", "96")
    p = Platform(load_settings(data_dir=tmp_path))
    index = p.store.index  # type: ignore[attr-defined]
    assert (index.type, index.params) == ("HNSW", {"M": 16, "efConstruction": 100})  # Lite
    assert IndexSpec.default_for(False).params == {"M": 16, "efConstruction": 200}
    assert search_params_for(index, 10) == {"ef": 96}
    assert search_params_for(index, 1000) == {"ef": 1000}
    p.close()
    with pytest.raises(SettingsError, match="MILVUS_SEARCH_EF"):
        monkeypatch.setenv("CARSEARCH_MILVUS_SEARCH_EF", "0")
        load_settings(data_dir=tmp_path)
