"""Index shard actors on the local Ray cluster: each loads its row range from the run folder;
sharded == unsharded == in-process, and a killed shard reloads and changes nothing."""

import os
import time

import numpy as np
import pytest

from raysift.actors.fanout import ResilientFanout, stop
from raysift.actors.index_shard import start_shards
from raysift.engine.fanout import local_fanout
from raysift.engine.knn import IndexParams, IndexShard, shard_bounds
from raysift.engine.tsds_search import TSDSParams, select_exact

from .conftest import vector_pool
from .test_tsds_search import Q, X

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("ray_cluster")]
PARAMS = TSDSParams(max_K=100)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return vector_pool(tmp_path_factory.mktemp("index"), X, Q, parts=3)[0]


def test_shard_bounds_cover_the_pool():
    assert shard_bounds(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2)]


def solve(pool, shards, kill_before=None):
    """TSDS exact over shard actors; `kill_before`: kill shard 1 before that fan-out call."""
    actors = start_shards(pool, shards, IndexParams(), use_gpu=False, cpus_per_shard=0.25)
    fanout = ResilientFanout(actors)
    calls = []

    def call(method, *args):
        calls.append(method)
        if len(calls) == kill_before:
            # The shard's process dies (as on a reclaimed node) with this call queued behind the
            # exit: the call fails and Ray restarts the actor. (ray.kill is asynchronous: the
            # call could still reach the old process, and nothing would be recovered.)
            actors[1].__ray_call__.remote(lambda self: (time.sleep(0.5), os._exit(1)))
        return fanout(method, *args)

    try:
        return (*select_exact(call, Q, pool.n, PARAMS), fanout.recoveries, calls)
    finally:
        stop(actors)


def test_one_and_four_shard_actors_give_identical_p(pool):
    one, info1, _, _ = solve(pool, 1)
    four, info4, _, _ = solve(pool, 4)
    np.testing.assert_array_equal(one.rows, four.rows)
    np.testing.assert_array_equal(one.p, four.p)
    assert info1 == info4
    in_process, _ = select_exact(local_fanout([IndexShard(X, 0, IndexParams())]), Q, len(X), PARAMS)
    np.testing.assert_array_equal(one.p, in_process.p)


def test_a_killed_shard_reloads_from_storage_and_the_result_is_unchanged(pool):
    clean, _, _, calls = solve(pool, 3)
    density = calls.index("density") + 1  # killed between the kNN search and the density
    sol, _, recoveries, _ = solve(pool, 3, kill_before=density)
    assert [r["shard"] for r in recoveries] == [1]
    np.testing.assert_array_equal(sol.rows, clean.rows)
    np.testing.assert_array_equal(sol.p, clean.p)
