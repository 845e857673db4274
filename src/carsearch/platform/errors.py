"""Errors a person can act on. The CLI prints their message as one line, never a trace."""

from __future__ import annotations


class CarsearchError(Exception):
    """Base class: something the user or operator can fix, with a message saying what."""


class ConfigError(CarsearchError):
    """Settings or command-line values that cannot be used."""


class ModelNotFoundError(CarsearchError):
    """No model at the given path or hub id, or no serving version."""


class ArtifactTamperedError(CarsearchError):
    """A model artifact whose sha256 no longer matches the registry."""


class QueryError(CarsearchError):
    """An empty, over-long or otherwise unusable search query or filter."""


class ImageRejectedError(CarsearchError):
    """An image that cannot be used (corrupt, truncated, not an image, too large)."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)
