"""Index shard actors on the local Ray cluster: sharded == unsharded, and == in-process."""

import numpy as np
import pytest

from actors.index_shard import ray_fanout, start_shards, stop_shards
from engine.fanout import local_fanout
from engine.knn import IndexParams, IndexShard, shard_bounds
from engine.tsds_search import TSDSParams, select_exact

from .test_tsds_search import Q, X

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("ray_cluster")]


def test_shard_bounds_cover_the_pool():
    assert shard_bounds(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2)]


def test_one_and_four_shard_actors_give_identical_p():
    params = TSDSParams(max_K=100)
    results = []
    for shards in (1, 4):
        actors = start_shards(X, shards, IndexParams(), use_gpu=False, cpus_per_shard=0.25)
        try:
            results.append(select_exact(ray_fanout(actors), Q, len(X), params))
        finally:
            stop_shards(actors)
    (one, info1), (four, info4) = results
    np.testing.assert_array_equal(one.p, four.p)
    assert info1 == info4
    in_process, _ = select_exact(local_fanout([IndexShard(X, 0, IndexParams())]), Q, len(X), params)
    np.testing.assert_array_equal(one.p, in_process.p)
