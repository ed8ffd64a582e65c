"""Sinkhorn and GOT-D scoring (no Ray): parity with ott-jax 0.4.4, POT cross-check, blocks."""

import json

import numpy as np
import ot
import pytest
import torch

from raysift.engine.gotd import calibrated, merge_smallest, select
from raysift.engine.sinkhorn import SinkhornShard, c_transform, check_inputs, solve

from .conftest import REPO

FIXTURES = REPO / "tests" / "fixtures"
OFFICIAL = np.load(FIXTURES / "ott044_official.npz")
TIGHT = np.load(FIXTURES / "ott044_thr1e-4.npz")
X, Y = OFFICIAL["X"], OFFICIAL["Y"]


@pytest.mark.parametrize("z", [OFFICIAL, TIGHT], ids=["threshold 0.1", "threshold 1e-4"])
def test_parity_with_ott_044(z):
    params = json.loads(str(z["params"]))
    r = solve(
        z["X"],
        z["Y"],
        epsilon=params["eps"],
        threshold=params["threshold"],
        momentum=params["momentum"],
        max_iterations=params["max_iterations"],
    )
    n = int(z["n_iter"])
    assert r.n_iter == n and r.converged == bool(z["converged"])
    assert np.abs(r.g - z["g"]).max() <= 1e-5
    assert np.abs(r.f - z["f"]).max() <= 1e-5
    assert np.abs(r.errors - z["errors"][:n]).max() <= 1e-6
    np.testing.assert_allclose(calibrated(r.g), z["cal"], atol=1e-5)
    ranked = np.lexsort((np.arange(len(r.g)), r.g))
    for share in (0.01, 0.05, 0.1):
        k = int(share * len(r.g))
        assert set(ranked[:k]) == set(z["ranked"][:k]), share


def test_converged_potentials_agree_with_pot_after_centring():
    r = solve(X, Y, threshold=1e-9, max_iterations=500)  # to float32's floor (~5e-7 error)
    y, x = Y.astype(np.float64), X.astype(np.float64)
    cost = (y**2).sum(1)[:, None] + (x**2).sum(1)[None] - 2 * y @ x.T
    a, b = np.full(len(Y), 1 / len(Y)), np.full(len(X), 1 / len(X))
    _, log = ot.bregman.sinkhorn_log(a, b, cost, 0.1, numItermax=100000, stopThr=1e-13, log=True)
    g_pot = 0.1 * log["log_v"]
    f_pot = 0.1 * log["log_u"]
    assert np.abs((r.g - r.g.mean()) - (g_pot - g_pot.mean())).max() <= 1e-6
    shift = r.g.mean() - g_pot.mean()  # potentials are defined up to (f + c, g - c)
    assert np.abs(r.f - (f_pot - shift)).max() <= 1e-6


def test_blocked_cost_gives_the_same_iterates():
    cached = solve(X, Y, threshold=1e-4)
    blocked = solve(X, Y, threshold=1e-4, cache_bytes=0, block=333)
    assert blocked.n_iter == cached.n_iter
    assert np.abs(blocked.g - cached.g).max() <= 1e-6


def test_c_transform_scores_new_candidates_from_a_converged_f():
    r = solve(X, Y, threshold=1e-6)
    shard = SinkhornShard(X, Y, n_total=len(X), epsilon=0.1, cache_bytes=0, block=1000)
    assert np.abs(c_transform(shard, r.f) - r.g).max() <= 1e-5


def test_selection_is_nested_prefixes_of_one_ranking():
    g = TIGHT["g"]
    rows = np.arange(len(g))
    order = np.lexsort((rows, g))
    parts = [(g[a:b][np.lexsort((rows[a:b], g[a:b]))], rows[a:b][np.lexsort((rows[a:b], g[a:b]))])
             for a, b in [(0, 1000), (1000, 2500), (2500, 4000)]]  # fmt: skip
    merged_g, merged_rows = merge_smallest(parts, 400)
    np.testing.assert_array_equal(merged_rows, order[:400])
    small, large = select(merged_g, merged_rows, 40, 4000), select(merged_g, merged_rows, 400, 4000)
    np.testing.assert_array_equal(large.indices[:40], small.indices)
    assert np.all(np.diff(large.score) <= 0)


@pytest.mark.parametrize(
    ("targets", "candidates", "eps", "message"),
    [
        (Y, X, 0.0, "epsilon must be > 0"),
        (Y[:0], X, 0.1, "empty target set"),
        (Y[:, :8], X, 0.1, "dimension"),
        (np.where(Y > 0.3, np.inf, Y), X, 0.1, "NaN or inf"),
    ],
)
def test_bad_input(targets, candidates, eps, message):
    with pytest.raises(ValueError, match=message):
        check_inputs(candidates, targets, eps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_solve_matches_cpu():
    cpu = solve(X, Y, threshold=1e-4)
    gpu = solve(X, Y, threshold=1e-4, device="cuda")
    assert gpu.n_iter == cpu.n_iter and np.abs(gpu.g - cpu.g).max() <= 1e-5
