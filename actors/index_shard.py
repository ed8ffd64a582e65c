"""FAISS index shards as Ray actors: one row range of the pool per actor, global row ids.

`start_shards` splits the pool's rows into consecutive ranges and starts one `StoredIndexShard`
per range (on a GPU when the cluster has one, else with a share of the CPUs and as many FAISS
threads); each reads its own vectors and ids from the run folder, so a restarted actor rebuilds
the same index (`actors.fanout.ResilientFanout` repeats the calls it missed).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import ray

from raysift.actors.fanout import RESTARTS
from raysift.engine.knn import IndexParams, IndexShard, shard_bounds
from raysift.jobs.core.pool import Pool, read_rows, read_vector_range
from raysift.jobs.core.storage import Store


class StoredIndexShard(IndexShard):
    """An `IndexShard` over rows [a, b) of the pool, read from the run folder."""

    def __init__(self, pool: Pool, a: int, b: int, params: IndexParams, **options) -> None:
        super().__init__(read_vector_range(pool, a, b), a, params, **options)
        self.ids = read_rows(pool, a, b, ["id"]).column("id").combine_chunks()

    def ids_of(self, rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(positions in `rows` of the rows held here, their ids)."""
        local = np.asarray(rows, np.int64) - self.offset
        where = np.flatnonzero((local >= 0) & (local < len(self.x)))
        return where, self.ids.take(pa.array(local[where])).to_pylist()

    def write_probabilities(
        self, store: Store, folder: str, rows: np.ndarray, p: np.ndarray
    ) -> int:
        """Commit (row, id, probability) of the support rows held here as one file of `folder`;
        returns how many."""
        where, ids = self.ids_of(rows)
        if len(where):
            table = pa.table({"row": rows[where], "id": pa.array(ids, pa.string()),
                              "probability": p[where]})  # fmt: skip
            store.write_parquet(f"{folder}/part-{self.offset:012d}.parquet", table)
        return len(where)


def start_shards(
    pool: Pool, shards: int, params: IndexParams, *, use_gpu: bool, cpus_per_shard: float
) -> list:
    """Start the shard actors; returns when every index is built (errors surface here)."""
    remote = ray.remote(StoredIndexShard).options(
        num_cpus=0 if use_gpu else cpus_per_shard,
        num_gpus=1 if use_gpu else 0,
        max_restarts=RESTARTS,
    )
    threads = max(1, math.floor(cpus_per_shard))
    actors = [
        remote.remote(pool.restrict(a, b), a, b, params, use_gpu=use_gpu, threads=threads)
        for a, b in shard_bounds(pool.n, shards)
    ]
    ray.get([actor.__len__.remote() for actor in actors])
    return actors
