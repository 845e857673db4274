"""Cursors for paging through one query's results.

A cursor is opaque to callers: base64url of a zlib-compressed record holding a format
byte, a fingerprint of the query it belongs to, how many hits were shown, and the ids
already shown (with the near-duplicates folded into them). The next page runs the same
query again and leaves those ids out, so a hit never appears twice across pages, also
when images were ingested or removed between the calls: a newly ingested image that
ranks above what was shown appears on a later page instead of shifting an earlier one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from carsearch.platform.errors import QueryError

_FORMAT = 1
_HEAD = struct.Struct("<B16sI")
# A cursor holds at most this many ids (the search_max_results ceiling and its folded
# duplicates); anything longer is not one of ours.
MAX_CURSOR_IDS = 200_000
MAX_CURSOR_CHARS = 4 * MAX_CURSOR_IDS


@dataclass(frozen=True)
class Cursor:
    fingerprint: bytes
    shown: int
    seen: frozenset[int]


def fingerprint(parts: dict[str, Any]) -> bytes:
    """16 bytes that identify a query's results (everything but k and the cursor)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.blake2b(blob.encode(), digest_size=16).digest()


def encode_cursor(fp: bytes, shown: int, seen: Sequence[int]) -> str:
    ids = np.asarray(sorted(set(int(i) for i in seen)), dtype="<i8")
    raw = _HEAD.pack(_FORMAT, fp, shown) + ids.tobytes()
    return base64.urlsafe_b64encode(zlib.compress(raw, 6)).decode().rstrip("=")


def decode_cursor(cursor: Any, fp: bytes) -> Cursor:
    """The cursor's state, or a QueryError saying why it cannot be used."""
    bad = QueryError("not a cursor of this search: start again from the first page")
    if not isinstance(cursor, str) or not cursor or len(cursor) > MAX_CURSOR_CHARS:
        raise bad
    try:
        packed = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        inflate = zlib.decompressobj()
        raw = inflate.decompress(packed, _HEAD.size + 8 * MAX_CURSOR_IDS + 1)
    except (binascii.Error, ValueError, zlib.error):
        raise bad from None
    if (len(raw) < _HEAD.size or inflate.unconsumed_tail
            or (len(raw) - _HEAD.size) % 8):
        raise bad
    fmt, got_fp, shown = _HEAD.unpack_from(raw)
    if fmt != _FORMAT:
        raise bad
    if got_fp != fp:
        raise QueryError("this cursor belongs to another query (the text, filters or "
                         "options changed): start again from the first page")
    ids = np.frombuffer(raw, dtype="<i8", offset=_HEAD.size)
    if ids.size > MAX_CURSOR_IDS or (ids < 0).any():
        raise bad
    return Cursor(got_fp, int(shown), frozenset(int(i) for i in ids.tolist()))
