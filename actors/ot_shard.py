"""Sinkhorn candidate shards as Ray actors, restartable from storage.

`start_ot_shards` starts one `StoredSinkhornShard` per row range of the pool (`b = 1/N_total` on
every shard); each reads its candidates and the targets from the run folder. `ot_fanout` is the
coordinator's `fanout(method, f, ...)`: when a shard dies, Ray restarts it (its constructor
reloads its rows) and the fan-out replays on it every column and row pass of the solve so far --
their only argument is the coordinator's f of that iteration, M floats each -- so the shard's g
is rebuilt bit for bit and the solve goes on as if nothing happened.
"""

from __future__ import annotations

import ray

from raysift.actors.fanout import RESTARTS, ResilientFanout
from raysift.engine.knn import shard_bounds
from raysift.engine.sinkhorn import DEFAULTS, SinkhornShard
from raysift.jobs.core.pool import Pool, read_vector_range


class StoredSinkhornShard(SinkhornShard):
    """A `SinkhornShard` over rows [a, b) of the pool and every target, read from storage."""

    def __init__(self, pool: Pool, a: int, b: int, targets: Pool, **options) -> None:
        super().__init__(
            read_vector_range(pool, a, b), read_vector_range(targets, 0, targets.n), offset=a,
            **options,
        )  # fmt: skip


def start_ot_shards(
    pool: Pool,
    targets: Pool,
    shards: int,
    *,
    epsilon: float,
    cpus_per_shard: float,
    use_gpu: bool = False,
    cache_bytes: int = DEFAULTS.cache_mb << 20,
    block: int = DEFAULTS.block,
) -> list:
    """Start the shard actors; returns when every shard has loaded its rows."""
    remote = ray.remote(StoredSinkhornShard).options(
        num_cpus=0 if use_gpu else cpus_per_shard,
        num_gpus=1 if use_gpu else 0,
        max_restarts=RESTARTS,
    )
    actors = [
        remote.remote(
            pool.restrict(a, b),
            a,
            b,
            targets,
            n_total=pool.n,
            epsilon=epsilon,
            cache_bytes=cache_bytes,
            block=block,
            device="cuda" if use_gpu else "cpu",
        )  # fmt: skip
        for a, b in shard_bounds(pool.n, shards)
    ]
    ray.get([actor.__len__.remote() for actor in actors])
    return actors


def ot_fanout(actors: list) -> ResilientFanout:
    """The coordinator's fan-out: a restarted shard replays the column and row passes so far
    (their argument is f), which rebuilds its g exactly as it was."""
    return ResilientFanout(actors, replay=frozenset({"columns", "rows"}))
