"""The platform's parts, built from Settings on first use and shared by one process."""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from typing import cast

from carsearch.platform.db import Database, migrate
from carsearch.platform.errors import ConfigError
from carsearch.platform.models.registry import Registry
from carsearch.platform.search.service import SearchService
from carsearch.platform.settings import Settings
from carsearch.platform.vectors.milvus import IndexSpec, MilvusStore
from carsearch.platform.vectors.mirror import MirroredStore
from carsearch.platform.vectors.protocol import ManagedStore, VectorAdmin, VectorStore


class Platform:
    """Database, vector store, registry and search service for one process.

    ``store`` gives the vector store to use instead of the one the settings name (the
    tests run the platform on the in-memory `ExactStore` this way). `store` is its data
    path (the VectorStore Protocol: what search, ingest and the jobs use); `admin` is the
    same store's administration (VectorAdmin: aliases, flushes after bulk loads, index
    description), for lifecycle and operations code only.
    """

    def __init__(self, settings: Settings, *, store: ManagedStore | None = None) -> None:
        self.settings = settings
        if store is not None:
            self.__dict__["store"] = store

    @cached_property
    def db(self) -> Database:
        """The database, after checking its schema is the one this code was written for."""
        url = self.settings.database_url
        current, head = migrate.current_revision(url), migrate.head_revision()
        if current != head:
            raise ConfigError(
                f"the database schema is at revision {current or 'none'}, this code needs "
                f"{head}: run `carsearch db upgrade`"
            )
        return Database(url)

    @cached_property
    def store(self) -> VectorStore:
        """Milvus; searches served from an exact in-memory mirror where that is safe."""
        s = self.settings
        kind = MirroredStore if s.mirror_enabled else MilvusStore
        lite = not s.milvus_uri.startswith(("http://", "https://", "tcp://", "unix://"))
        index = IndexSpec.default_for(lite)
        if index.type == "HNSW":
            index = replace(index, search_params={**index.search_params,
                                                  "ef": s.milvus_search_ef})
        store: ManagedStore = kind(s.milvus_uri, token=s.milvus_token, index=index,
                                   consistency=s.milvus_consistency)
        return store

    @property
    def admin(self) -> VectorAdmin:
        """The same store's administration (every store here is a `ManagedStore`)."""
        return self.managed

    @property
    def managed(self) -> ManagedStore:
        """The store as both (the status page shows counts beside the alias)."""
        return cast(ManagedStore, self.store)

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.db, self.settings.model_dir)

    @cached_property
    def search(self) -> SearchService:
        return SearchService(self.settings, self.db, self.store)

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.close()
        if "db" in self.__dict__:
            self.db.dispose()
