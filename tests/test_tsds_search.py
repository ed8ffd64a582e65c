"""TSDS from vectors: lazy density, end-to-end compat parity, exact-mode sharding and refetch."""

import numpy as np
import pytest

from raysift.engine.fanout import local_fanout
from raysift.engine.knn import IndexParams, IndexShard, shard_bounds
from raysift.engine.tsds import solve, solve_lazy
from raysift.engine.tsds_search import (
    TSDSParams,
    reference_index_params,
    select_compat,
    select_exact,
)

from .test_tsds import SYNTH, TOY, load_fixture

Z = np.load(TOY, allow_pickle=False)
X, Q = Z["candidates"], Z["queries"]


def fixture_density(z):
    """rho by candidate row, from the fixture's per-position densities (one value per row)."""
    table = {}
    for i, r in zip(z["knn_idx"].ravel(), z["rho"].ravel(), strict=True):
        assert table.setdefault(int(i), r) == r
    asked = []

    def density(rows):
        asked.append(len(rows))
        return np.array([table[int(i)] for i in rows], dtype=z["rho"].dtype)

    return density, asked


@pytest.mark.parametrize("mode", ["compat", "exact"])
@pytest.mark.parametrize("fixture", [TOY, SYNTH], ids=["toy", "synth100k"])
def test_lazy_density_gives_the_same_p_and_asks_for_less(fixture, mode):
    z = load_fixture(fixture)
    kw = dict(alpha=float(z["alpha"]), C=float(z["C"]), n_candidates=int(z["n_candidates"]))
    full = solve(z["knn_dist"], z["knn_idx"], z["rho"], mode=mode, **kw)
    density, asked = fixture_density(z)
    lazy, computed = solve_lazy(z["knn_dist"], z["knn_idx"], density, mode=mode, first=16, **kw)
    np.testing.assert_array_equal(lazy.dense(), full.dense())
    assert lazy.s == full.s and lazy.events == full.events
    np.testing.assert_array_equal(lazy.last, full.last)
    assert computed == sum(asked) < len(np.unique(z["knn_idx"]))


def test_end_to_end_compat_on_the_toy_data_matches_the_reference():
    """Own IVF index with the reference's parameters (faiss 1.15, not the 1.7.4 that made the
    fixture), the reference's caps and density over U: within 1e-6 total variation."""
    shard = IndexShard(X, 0, reference_index_params())
    params = TSDSParams(mode="compat", max_K=int(Z["max_K"]), kde_K=int(Z["kde_K"]))
    sol, info = select_compat(local_fanout([shard]), Q, len(X), params)
    assert info["neighbours"] == 100 and info["kde_K"] == 100
    tv = 0.5 * np.abs(sol.dense() - Z["p_official"]).sum()
    assert tv <= 1e-6, tv


def exact(shards, **kw):
    parts = [IndexShard(X[a:b], a, IndexParams()) for a, b in shard_bounds(len(X), shards)]
    return select_exact(local_fanout(parts), Q, len(X), TSDSParams(**kw))


@pytest.mark.parametrize("sigma", [0.75, 0.0])
def test_exact_mode_is_the_same_for_any_number_of_shards(sigma):
    base, info = exact(1, sigma=sigma, max_K=100)
    for shards in (2, 4, 7):
        sol, _ = exact(shards, sigma=sigma, max_K=100)
        np.testing.assert_array_equal(sol.dense(), base.dense())
    batched, _ = exact(3, sigma=sigma, max_K=100, density_batch=7)  # density in many fan-outs
    np.testing.assert_array_equal(batched.dense(), base.dense())
    assert abs(base.dense().sum() - 1) < 1e-12
    if sigma:
        assert info["density_points"] < len(np.unique(Z["knn_idx"]))


def test_exact_mode_fetches_more_neighbours_instead_of_dumping_mass():
    """With C large the optimal level needs long lists: starting from 4 neighbours the search is
    repeated with 8, 16, ... and ends where a single long fetch ends."""
    short, info = exact(1, max_K=4, C=40.0)
    long, long_info = exact(1, max_K=1000, C=40.0)
    assert info["fetches"] > 1 and long_info["fetches"] == 1
    assert info["neighbours"] > 4
    np.testing.assert_allclose(short.dense(), long.dense(), rtol=0, atol=1e-15)


def test_exact_mode_spreads_over_the_whole_pool_when_the_lists_hold_it():
    """A pool so small that every list is the whole pool and the condition never holds: every
    query spreads 1/M in proportion to 1/rho."""
    small = X[:6]
    shard = IndexShard(small, 0, IndexParams())
    sol, _ = select_exact(local_fanout([shard]), Q[:3], 6, TSDSParams(C=1000.0, alpha=0.05))
    assert np.all(sol.last == 5)  # every neighbour of every query full
    assert np.all(sol.dense() > 0) and abs(sol.dense().sum() - 1) < 1e-12
