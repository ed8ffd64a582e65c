"""Stable row ids derived from content.

`content_id(text) = sha1(utf-8 text)[:16]` in hex: the convention of the shared pool.parquet, so a
row keeps its id across files, runs, shard counts and machines. 64 bits: a collision among 10^8
rows has probability ~3e-4; ingest rejects duplicate ids, so a collision is reported, never merged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

ID_HEX_CHARS = 16


def content_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def content_ids(texts: Iterable[str]) -> list[str]:
    return [content_id(t) for t in texts]


def hash_uniform(ids: Iterable[str], seed: int) -> list[float]:
    """A uniform number in [0, 1) per id, from sha1(f"{seed}:{id}"): independent of row order."""
    scale = float(2**64)
    return [
        int.from_bytes(hashlib.sha1(f"{seed}:{i}".encode()).digest()[:8], "big") / scale
        for i in ids
    ]
