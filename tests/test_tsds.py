"""TSDS solver: parity with the reference's golden outputs, the closed form, optimality vs an LP."""

import numpy as np
import pytest
from scipy.optimize import linprog

from raysift.engine.tsds import NeighboursExhausted, knn_uniform, objective, solve

from .conftest import REPO, SHARED

TOY = REPO / "tests" / "fixtures" / "tsds_toy.npz"
SYNTH = SHARED / "fixtures" / "tsds" / "synth100k.npz"


def load_fixture(path):
    if not path.is_file():
        pytest.skip(f"{path} not found (shared fixtures absent)")
    return np.load(path, allow_pickle=False)


def run(z, mode):
    return solve(
        z["knn_dist"],
        z["knn_idx"],
        z["rho"],
        alpha=float(z["alpha"]),
        C=float(z["C"]),
        n_candidates=int(z["n_candidates"]),
        mode=mode,
    )


@pytest.mark.parametrize("mode", ["compat", "exact"])
@pytest.mark.parametrize("fixture", [TOY, SYNTH], ids=["toy", "synth100k"])
def test_parity_with_the_reference(fixture, mode):
    z = load_fixture(fixture)
    sol = run(z, mode)
    tol = 1e-12 if mode == "compat" else 1e-8
    assert np.abs(sol.dense() - z["p_official"]).max() <= tol
    assert sol.events == int(z["official_heap_pops"])
    assert abs(sol.dense().sum() - 1) < 1e-12


D = np.array(
    [[0.10, 0.20, 0.25, 0.40, 0.80, 1.00], [0.05, 0.30, 0.35, 0.36, 0.90, 1.20]], np.float32
)
IDX = np.array([[0, 1, 2, 3, 4, 5], [2, 6, 7, 3, 8, 9]])
RHO = np.array([[1, 1.5, 1.5, 1, 2, 1], [1.5, 1, 3, 1, 1, 1]], np.float32)


@pytest.mark.parametrize("mode", ["compat", "exact"])
@pytest.mark.parametrize(
    ("alpha", "C", "s", "last", "p"),
    [
        (
            0.5,
            1,
            3,
            [2, 2],
            [
                0.1666666667,
                0.1111111111,
                0.2222222222,
                0.2777777778,
                0,
                0,
                0.1666666667,
                0.0555555556,
                0,
                0,
            ],
        ),
        (
            0.8,
            1,
            2.333333333,
            [1, 2],
            [
                0.2142857143,
                0.1428571429,
                0.2857142857,
                0.0714285714,
                0,
                0,
                0.2142857143,
                0.0714285714,
                0,
                0,
            ],
        ),
    ],
)
def test_hand_made_vectors(mode, alpha, C, s, last, p):
    sol = solve(D, IDX, RHO, alpha=alpha, C=C, n_candidates=10, mode=mode)
    assert sol.s == pytest.approx(s, abs=1e-9)
    assert list(sol.last) == last
    assert np.allclose(sol.dense(), p, atol=1e-10)


def test_exhausted_lists_compat_dumps_exact_asks_for_more():
    sol = solve(D, IDX, RHO, alpha=0.5, C=5, n_candidates=10, mode="compat")
    assert sol.exhausted and sol.s == pytest.approx(4) and list(sol.last) == [4, 4]
    assert np.allclose(
        sol.dense(),
        [
            0.125,
            0.0833333333,
            0.1666666667,
            0.25,
            0.0625,
            0.0208333333,
            0.125,
            0.0416666667,
            0.125,
            0,
        ],
        atol=1e-10,
    )
    with pytest.raises(NeighboursExhausted):
        solve(D, IDX, RHO, alpha=0.5, C=5, n_candidates=10, mode="exact")


@pytest.mark.parametrize(
    ("alpha", "K", "p"),
    [
        (0.5, 4, [0.125, 0.125, 0.25, 0.25, 0, 0, 0.125, 0.125, 0, 0]),
        (0.8, 2, [0.25, 0.25, 0.25, 0, 0, 0, 0.25, 0, 0, 0]),
    ],
)
def test_knn_uniform_closed_form(alpha, K, p):
    sol = knn_uniform(D, IDX, alpha=alpha, C=1, n_candidates=10)
    assert sol.s == K and np.allclose(sol.dense(), p)
    # equals the general solver with rho = 1, as floats (exact) and as the reference's int ones
    ones = np.ones_like(IDX)
    for mode, rho in (("exact", ones.astype(np.float32)), ("compat", ones)):
        general = solve(D, IDX, rho, alpha=alpha, C=1, n_candidates=10, mode=mode)
        assert np.allclose(general.dense(), sol.dense(), atol=1e-12)


def test_knn_uniform_matches_general_solver_on_random_lists():
    rng = np.random.default_rng(5)
    for _ in range(20):
        M, L, N = rng.integers(1, 6), rng.integers(3, 30), 40
        d = np.sort(rng.random((M, L)), axis=1).astype(np.float32)
        idx = np.stack([rng.permutation(N)[:L] for _ in range(M)])
        alpha, C = rng.uniform(0.05, 0.95), rng.uniform(0.1, 5)
        try:
            closed = knn_uniform(d, idx, alpha=alpha, C=C, n_candidates=N)
        except NeighboursExhausted:
            with pytest.raises(NeighboursExhausted):
                solve(d, idx, np.ones((M, L)), alpha=alpha, C=C, n_candidates=N, mode="exact")
            continue
        general = solve(d, idx, np.ones((M, L)), alpha=alpha, C=C, n_candidates=N, mode="exact")
        assert np.allclose(general.dense(), closed.dense(), atol=1e-12)


def test_level_below_a_first_breakpoint_compat_raises_exact_fixes():
    # alpha near 1: the optimal level sits below query 1's first breakpoint (1/rho = 1/1.5 ... ).
    d = np.array([[0.1, 0.2, 0.3], [0.5, 0.6, 0.7]], np.float32)
    idx = np.array([[0, 1, 2], [3, 4, 5]])
    rho = np.array([[2, 1, 1], [1, 1, 1]], np.float32)
    with pytest.raises(ValueError, match="reference assertion"):
        solve(d, idx, rho, alpha=0.99, C=1, n_candidates=6, mode="compat")
    sol = solve(d, idx, rho, alpha=0.99, C=1, n_candidates=6, mode="exact")
    assert sol.last[1] == -1 and sol.dense()[3] == pytest.approx(0.5)
    assert sol.dense().sum() == pytest.approx(1)
    assert objective(sol, d, rho, alpha=0.99, C=1) == pytest.approx(
        lp_optimum(d, rho, 0.99, 1), rel=1e-9
    )


def lp_optimum(d, rho, alpha, C):
    """min (alpha/C) <gamma, d> + (1-alpha) M t  s.t.  rows of gamma sum to 1/M, rho*gamma <= t."""
    M, L = d.shape
    n = M * L + 1
    cost = np.concatenate([alpha / C * d.astype(np.float64).ravel(), [(1 - alpha) * M]])
    a_eq = np.zeros((M, n))
    for j in range(M):
        a_eq[j, j * L : (j + 1) * L] = 1
    a_ub = np.zeros((M * L, n))
    a_ub[np.arange(M * L), np.arange(M * L)] = rho.astype(np.float64).ravel()
    a_ub[:, -1] = -1
    res = linprog(
        cost,
        A_ub=a_ub,
        b_ub=np.zeros(M * L),
        A_eq=a_eq,
        b_eq=np.full(M, 1 / M),
        bounds=(0, None),
        method="highs",
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    assert res.success
    return res.fun


def test_exact_mode_is_optimal_against_an_lp():
    """Random small instances where every candidate is in every list (the LP sees all pairs)."""
    rng = np.random.default_rng(0)
    checked = 0
    while checked < 40:
        M, N = int(rng.integers(1, 6)), int(rng.integers(4, 16))
        dist = rng.random((M, N)) * rng.uniform(0.5, 3)
        order = np.argsort(dist, axis=1, kind="stable")
        d = np.take_along_axis(dist, order, axis=1)
        rho_c = rng.uniform(1, 4, N) * (rng.random(N) < 0.7) + 1.0  # candidate densities >= 1
        rho = rho_c[order]
        alpha, C = float(rng.uniform(0.05, 0.95)), float(rng.uniform(0.2, 5))
        try:
            sol = solve(d, order, rho, alpha=alpha, C=C, n_candidates=N, mode="exact")
        except NeighboursExhausted:
            continue
        assert sol.dense().sum() == pytest.approx(1, abs=1e-12)
        got = objective(sol, d, rho, alpha=alpha, C=C)
        assert got == pytest.approx(lp_optimum(d, rho, alpha, C), rel=1e-9)
        checked += 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"alpha": 1.0}, "alpha must be in"),
        ({"alpha": 0.0}, "alpha must be in"),
        ({"C": 0.0}, "C must be > 0"),
        ({"knn_idx": np.where(IDX == 9, -1, IDX)}, "-1 label"),
        ({"knn_dist": np.where(D > 1, np.nan, D)}, "finite"),
        ({"knn_dist": D[:0], "knn_idx": IDX[:0], "rho": RHO[:0]}, "empty target set"),
        ({"knn_dist": D[:, ::-1].copy()}, "ascending"),
        ({"rho": RHO[:, :3]}, "same"),
    ],
)
def test_bad_input(change, message):
    args = {"knn_dist": D, "knn_idx": IDX, "rho": RHO, "alpha": 0.5, "C": 1.0}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        solve(
            args["knn_dist"],
            args["knn_idx"],
            args["rho"],
            alpha=args["alpha"],
            C=args["C"],
            n_candidates=10,
        )
