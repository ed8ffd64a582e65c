"""Sharded Sinkhorn on the local Ray cluster: any shard count gives the global solve; a shard
killed mid-solve is restarted, warm-started from f, and the selection survives."""

import numpy as np
import pytest
import ray

from actors.ot_shard import ResilientFanout, start_ot_shards, stop_ot_shards
from engine.gotd import merge_smallest
from engine.sinkhorn import coordinate, solve

from .test_gotd import X, Y

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("ray_cluster")]
TOP = 40  # 1% of the 4000 candidates


def sharded(shards, kill_at=None):
    actors, keep = start_ot_shards(X, Y, shards, epsilon=0.1, cpus_per_shard=0.1)
    fanout = ResilientFanout(actors)

    def kill(iteration, f):
        if iteration == kill_at:
            ray.kill(actors[1], no_restart=False)  # Ray restarts it; its g is gone

    try:
        f, n_iter, errors, _ = coordinate(
            fanout, len(Y), epsilon=0.1, threshold=1e-4, on_iteration=kill
        )
        g = np.concatenate(fanout("potentials"))
        _, top = merge_smallest(fanout("smallest", TOP), TOP)
    finally:
        stop_ot_shards(actors)
        del keep
    return g, top, n_iter, fanout.recoveries


def test_any_shard_count_reproduces_the_global_solve():
    ref = solve(Y, X, threshold=1e-4)
    ref_top = np.lexsort((np.arange(len(ref.g)), ref.g))[:TOP]
    for shards in (1, 3, 8):  # one, uneven (4000 = 1334 + 1333 + 1333), many
        g, top, n_iter, recoveries = sharded(shards)
        assert n_iter == ref.n_iter and not recoveries
        assert np.abs(g - ref.g).max() <= 1e-6, shards
        np.testing.assert_array_equal(top, ref_top)


def test_a_killed_shard_is_restarted_and_the_solve_finishes():
    _, clean_top, _, _ = sharded(4)
    _, top, _, recoveries = sharded(4, kill_at=10)
    assert len(recoveries) == 1 and recoveries[0]["shard"] == 1
    assert len(set(top) & set(clean_top)) / TOP >= 0.99
