"""Sharded Sinkhorn on the local Ray cluster: shards load their rows from the run folder; any
shard count gives the global solve; a shard killed mid-solve reloads its rows, replays the
passes so far, and the solve ends exactly where an uninterrupted one does."""

import numpy as np
import pytest
import ray

from raysift.actors.fanout import stop
from raysift.actors.ot_shard import ot_fanout, start_ot_shards
from raysift.engine.gotd import merge_smallest
from raysift.engine.sinkhorn import coordinate, solve

from .conftest import vector_pool
from .test_gotd import X, Y

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("ray_cluster")]
TOP = 40  # 1% of the 4000 candidates


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    return vector_pool(tmp_path_factory.mktemp("ot"), X, Y, parts=2)


def sharded(pools, shards, kill_at=None):
    pool, targets = pools
    actors = start_ot_shards(pool, targets, shards, epsilon=0.1, cpus_per_shard=0.1)
    fanout = ot_fanout(actors)

    def kill(iteration, f, err):
        if iteration == kill_at:
            ray.kill(actors[1], no_restart=False)  # Ray restarts it; its g is gone

    try:
        f, n_iter, errors, _ = coordinate(
            fanout, len(Y), epsilon=0.1, threshold=1e-4, on_iteration=kill
        )
        g = np.concatenate(fanout("potentials"))
        _, top = merge_smallest(fanout("smallest", TOP), TOP)
    finally:
        stop(actors)
    return g, top, n_iter, fanout.recoveries


def test_any_shard_count_reproduces_the_global_solve(pools):
    ref = solve(X, Y, threshold=1e-4)
    ref_top = np.lexsort((np.arange(len(ref.g)), ref.g))[:TOP]
    for shards in (1, 3, 8):  # one, uneven (4000 = 1334 + 1333 + 1333), many
        g, top, n_iter, recoveries = sharded(pools, shards)
        assert n_iter == ref.n_iter and not recoveries
        assert np.abs(g - ref.g).max() <= 1e-6, shards
        np.testing.assert_array_equal(top, ref_top)


def test_a_killed_shard_replays_and_the_solve_is_unchanged(pools):
    clean_g, clean_top, clean_iter, _ = sharded(pools, 4)
    g, top, n_iter, recoveries = sharded(pools, 4, kill_at=10)
    assert len(recoveries) == 1 and recoveries[0]["shard"] == 1
    # the first column pass and 10 iterations' two passes; ray.kill is asynchronous, so the next
    # iteration's row pass may still reach the old actor and be replayed too
    assert recoveries[0]["replayed"] in (1 + 2 * 10, 1 + 2 * 10 + 1)
    assert n_iter == clean_iter
    np.testing.assert_array_equal(g, clean_g)  # bit for bit: the same passes, replayed
    np.testing.assert_array_equal(top, clean_top)
