"""Identifiers derived from content, so that replays and retries are no-ops."""

from __future__ import annotations

import hashlib
import re

MAX_ID = (1 << 63) - 1  # ids are positive int64: the first 63 bits of a sha256


def image_id(sha256_hex: str, collection: str = "vehicles") -> int:
    """A positive int64 primary key from an image's sha256 (the first 63 bits), and its
    collection: in ``vehicles`` the digest's own first bits (the ids before collections
    existed), elsewhere those of sha256("<collection>:<digest>").

    The same bytes in the same collection always map to the same id, so Milvus upserts
    and database inserts of a re-delivered image land on the same row; the same photo in
    two collections is two rows.
    """
    if not re.fullmatch(r"[0-9a-f]{64}", sha256_hex):
        raise ValueError(f"not a sha256 hex digest: {sha256_hex!r}")
    if collection != "vehicles":
        sha256_hex = hashlib.sha256(f"{collection}:{sha256_hex}".encode()).hexdigest()
    return int(sha256_hex[:16], 16) & MAX_ID


def collection_name(version_name: str) -> str:
    """The Milvus collection of a model version: letters, digits and underscores only."""
    safe = re.sub(r"[^0-9A-Za-z_]", "_", version_name)
    return f"carsearch_{safe}"[:255]
