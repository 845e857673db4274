"""A typed Python client for the JSON API under /api/v1 (`Client`), and the wire models
the server and the client share (`models`: pydantic only). It may import no other
carsearch package and nothing heavy: the standard library, pydantic, and httpx (only
where a URL needs it: https, a proxy, or when asked)."""

from __future__ import annotations

from carsearch.client.http import ApiError, Client
from carsearch.client.models import (
    Feedback,
    FeedbackResult,
    Filters,
    Health,
    Hit,
    ImageInfo,
    ImageSearchOptions,
    SearchOptions,
    SearchQuery,
    SearchResponse,
)

__all__ = ["ApiError", "Client", "Feedback", "FeedbackResult", "Filters", "Health", "Hit",
           "ImageInfo", "ImageSearchOptions", "SearchOptions", "SearchQuery", "SearchResponse"]
