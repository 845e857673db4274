"""Milvus with authentication on, as docker-compose runs it: the platform connects with the
token from its secret file and is refused without it (the real milvus-server binary)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from carsearch.platform.errors import CarsearchError
from carsearch.platform.runtime import Platform
from carsearch.platform.settings import load_settings
from carsearch.platform.vectors.milvus import MilvusStore
from carsearch.platform.vectors.protocol import VectorRow
from carsearch.platform.vectors.server import LocalMilvusServer, MilvusServerError

pytestmark = pytest.mark.milvus_server

NEW_PASSWORD = "Zq8rT2vLw9xK4mPa"  # what `make secrets` would have written


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMilvusServer]:
    server = LocalMilvusServer(tmp_path_factory.mktemp("milvus-auth"), authorization=True)
    try:
        server.start()
    except MilvusServerError as exc:
        pytest.skip(str(exc))
    try:
        from pymilvus import MilvusClient

        # The 2.3 binary has no defaultRootPassword (docker-compose's 2.5 image sets it
        # from a secret): change root's password as an operator would, once.
        admin = MilvusClient(uri=server.uri, token=server.token)
        admin.update_password("root", "Milvus", NEW_PASSWORD)
        admin.close()
        server.token = f"root:{NEW_PASSWORD}"
        yield server
    finally:
        server.stop()


def test_the_platform_connects_with_the_token_from_its_secret_file(
    auth_server: LocalMilvusServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "milvus_token"
    secret.write_text(f"root:{NEW_PASSWORD}\n")
    settings = load_settings(data_dir=tmp_path / "data", milvus_uri=auth_server.uri,
                             milvus_token_file=secret)
    platform = Platform(settings)
    caplog.set_level(logging.DEBUG)
    try:
        store = platform.store
        store.ensure_collection("auth_check", 4)
        store.upsert("auth_check", [1, 2, 3, 4], np.eye(4, dtype=np.float32),
                     [VectorRow(make="Volvo")] * 4)
        assert store.count("auth_check") == 4
        store.drop("auth_check")
    finally:
        platform.close()
    assert NEW_PASSWORD not in caplog.text  # the token is never logged


@pytest.mark.parametrize("token", ["", "root:Milvus", "root:wrong-password"])
def test_a_client_without_the_token_is_refused(
    auth_server: LocalMilvusServer, token: str
) -> None:
    with pytest.raises(CarsearchError) as err:
        store = MilvusStore(auth_server.uri, token=token)
        try:
            store.list_collections()
        finally:
            store.close()
    message = str(err.value)
    assert NEW_PASSWORD not in message and "\n" not in message
    logging.getLogger(__name__).info("refused %r: %s", token, message)
    assert "CARSEARCH_MILVUS_TOKEN" in message  # one line that says what to check
