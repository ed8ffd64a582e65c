"""FAISS index shards as Ray actors: one shard per actor, global row ids, fan-out calls.

`start_shards` splits the pool into consecutive row ranges, puts each range in the object store
and starts one `IndexShard` actor per range (on a GPU when the cluster has one, else with a share
of the CPUs and as many FAISS threads). `ray_fanout` gives `engine.tsds_search` its
`fanout(method, *args)`: the same call on every shard, answers in shard order. Large arguments
(the query matrix) are put in the object store once per call, not once per shard.
"""

from __future__ import annotations

import math

import numpy as np
import ray

from engine.fanout import Fanout
from engine.knn import IndexParams, IndexShard, shard_bounds


def start_shards(
    vectors: np.ndarray,
    shards: int,
    params: IndexParams,
    *,
    use_gpu: bool,
    cpus_per_shard: float,
) -> list:
    """Start the shard actors; returns when every index is built (errors surface here)."""
    remote = ray.remote(IndexShard).options(
        num_cpus=0 if use_gpu else cpus_per_shard,
        num_gpus=1 if use_gpu else 0,
        max_restarts=0,
    )
    threads = max(1, math.floor(cpus_per_shard))
    actors = [
        remote.remote(ray.put(vectors[a:b]), a, params, use_gpu=use_gpu, threads=threads)
        for a, b in shard_bounds(len(vectors), shards)
    ]
    ray.get([actor.__len__.remote() for actor in actors])
    return actors


def ray_fanout(actors: list) -> Fanout:
    def call(method: str, *args):
        refs = [ray.put(a) if isinstance(a, np.ndarray) and a.nbytes > 1 << 20 else a for a in args]
        return ray.get([getattr(actor, method).remote(*refs) for actor in actors])

    return call


def stop_shards(actors: list) -> None:
    for actor in actors:
        ray.kill(actor)
