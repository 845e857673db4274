"""Identifiers derived from content, so that replays and retries are no-ops."""

from __future__ import annotations

import re

MAX_ID = (1 << 63) - 1  # ids are positive int64: the first 63 bits of a sha256


def image_id(sha256_hex: str) -> int:
    """A positive int64 primary key from an image's sha256 (the first 63 bits).

    The same bytes always map to the same id, so Milvus upserts and database inserts of a
    re-delivered image land on the same row.
    """
    if not re.fullmatch(r"[0-9a-f]{64}", sha256_hex):
        raise ValueError(f"not a sha256 hex digest: {sha256_hex!r}")
    return int(sha256_hex[:16], 16) & MAX_ID


def collection_name(version_name: str) -> str:
    """The Milvus collection of a model version: letters, digits and underscores only."""
    safe = re.sub(r"[^0-9A-Za-z_]", "_", version_name)
    return f"carsearch_{safe}"[:255]
