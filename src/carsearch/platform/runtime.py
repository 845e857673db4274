"""The platform's parts, built from Settings on first use and shared by one process."""

from __future__ import annotations

from functools import cached_property

from carsearch.platform import migrate
from carsearch.platform.db import Database
from carsearch.platform.errors import ConfigError
from carsearch.platform.mirror import MirroredStore
from carsearch.platform.registry import Registry
from carsearch.platform.search import SearchService
from carsearch.platform.settings import Settings
from carsearch.platform.vectorstore import MilvusStore


class Platform:
    """Database, vector store, registry and search service for one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

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
    def store(self) -> MilvusStore:
        """Milvus; searches served from an exact in-memory mirror where that is safe."""
        s = self.settings
        kind = MirroredStore if s.mirror_enabled else MilvusStore
        return kind(s.milvus_uri, token=s.milvus_token, consistency=s.milvus_consistency)

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
