"""engine.round_robin and the knn aggregations: round robin over partitioned, merged, refetched
lists equals a plain-Python round robin over the full score matrix (ties and lists that run out
included); subtask_mean_max is LESS's score."""

from __future__ import annotations

import numpy as np
import pytest

from raysift.engine import round_robin as rr
from raysift.engine.baselines import knn_scores


def plain_round_robin(S: np.ndarray, budget: int) -> tuple[list[int], list[float]]:
    """The definition, on the full (M, N) matrix: each target in turn takes its best candidate
    (by similarity, ties by row) not taken yet."""
    M, N = S.shape
    ranked = [sorted(range(N), key=lambda r: (-S[j, r], r)) for j in range(M)]
    taken, chosen, scores = set(), [], []
    while len(chosen) < budget:
        for j in range(M):
            left = [r for r in ranked[j] if r not in taken]
            if not left:
                continue
            taken.add(left[0])
            chosen.append(left[0])
            scores.append(S[j, left[0]])
            if len(chosen) == budget:
                break
    return chosen, scores


def distributed(S: np.ndarray, budget: int, parts: int, rng) -> rr.Selection:
    """What the select stage does: per-part lists, merged, refetched longer until enough."""
    M, N = S.shape
    cuts = np.sort(rng.choice(np.arange(1, N), parts - 1, replace=False)) if parts > 1 else []
    bounds = list(zip([0, *cuts], [*cuts, N], strict=True))
    L = rr.first_length(budget, M, N)
    while True:
        lists = [rr._pad(*rr._top(np.broadcast_to(np.arange(a, b), (M, b - a)).copy(),
                                  S[:, a:b].astype(np.float64), L), L)
                 for a, b in bounds]  # fmt: skip
        sel = rr.select(*rr.merge_lists(lists, L), budget, N)
        if sel is not None:
            return sel
        L = min(N, 2 * L)


@pytest.mark.parametrize("seed", range(12))
def test_round_robin_equals_the_plain_definition(seed):
    rng = np.random.default_rng(seed)
    M, N = int(rng.integers(1, 9)), int(rng.integers(5, 120))
    S = rng.random((M, N))
    if seed % 2:  # many exact ties
        S = np.round(S, 1)
    if seed % 3 == 0:  # every target wants the same few rows: lists run out, refetched
        S[:, :5] += 10
    budget = int(rng.integers(1, N + 1))
    want, want_scores = plain_round_robin(S, budget)
    got = distributed(S, budget, int(rng.integers(1, 5)), rng)
    assert got.indices.tolist() == want
    np.testing.assert_allclose(got.score, want_scores)


def test_target_lists_are_each_targets_best_rows_ties_by_row():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    X[200] = X[10]  # an exact tie: the smaller row first
    Q = X[[10, 50, 70]] + 0.01
    rows, sims = rr.target_lists(X, Q, np.arange(300) + 1000, L=12, block=64)
    S = (Q @ X.T).astype(np.float64)
    for j in range(3):
        order = sorted(range(300), key=lambda r: (-S[j, r], r))[:12]
        assert rows[j].tolist() == [r + 1000 for r in order]
    assert rows[0, :2].tolist() == [1010, 1200]
    short, _ = rr.target_lists(X[:5], Q, np.arange(5), L=8)  # fewer rows than L: padded
    assert (short[:, 5:] == rr.NONE).all()


def test_a_budget_larger_than_the_candidates_is_an_error():
    with pytest.raises(ValueError, match="only 3 candidates for a budget of 4"):
        rr.select(np.array([[0, 1, 2]]), np.ones((1, 3)), 4, 3)


def test_subtask_mean_max_is_less_scores():
    """knn's subtask_mean_max on LESS's representation vectors (sqrt(w_i) x each checkpoint's
    features, concatenated) is engine.less.scores."""
    from raysift.engine import less

    rng = np.random.default_rng(1)
    F = less.normalise(rng.standard_normal((40, 3, 16)))
    G = less.normalise(rng.standard_normal((6, 3, 16)))
    w = np.array([0.2, 0.5, 0.3])
    groups = np.array([0, 0, 1, 1, 1, 2])
    want = less.scores(F, G, w, groups)
    scale = np.sqrt(w)[None, :, None]
    got = knn_scores((F * scale).reshape(40, -1), (G * scale).reshape(6, -1), "subtask_mean_max",
                     groups)  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    one = knn_scores((F * scale).reshape(40, -1), (G * scale).reshape(6, -1), "subtask_mean_max")
    np.testing.assert_allclose(one, less.scores(F, G, w, None), rtol=1e-5, atol=1e-6)
