"""How a coordinator reaches its shards: `fanout(method, *args)` calls `method(*args)` on every
shard and returns the answers in shard order. In-process here; over Ray actors in `actors/`."""

from __future__ import annotations

from collections.abc import Callable

Fanout = Callable[..., list]


def local_fanout(shards: list) -> Fanout:
    """Fan out to in-process shard objects (tests, benchmarks, single-process use)."""

    def call(method: str, *args):
        return [getattr(shard, method)(*args) for shard in shards]

    return call
