import numpy as np
import pytest

from raysift.engine.ids import content_id
from raysift.engine.sampling import sample


def setup(n=500, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.random(n) ** 3 * (rng.random(n) < 0.6)
    ids = np.array([content_id(str(i)) for i in range(n)])
    return p / p.sum(), ids


@pytest.mark.parametrize("how", ["multinomial", "without_replacement", "top"])
def test_seeded_and_independent_of_row_order(how):
    p, ids = setup()
    a = sample(p, ids, 50, how, seed=1)
    perm = np.random.default_rng(2).permutation(len(p))
    b = sample(p[perm], ids[perm], 50, how, seed=1)
    assert list(ids[a.indices]) == list(ids[perm][b.indices])
    assert np.allclose(a.probability, p[a.indices])


def test_multinomial_counts_sum_to_the_budget_and_follow_p():
    p, ids = setup()
    sel = sample(p, ids, 200, "multinomial", seed=3)
    assert sel.count.sum() == 200 and np.all(sel.count >= 1)
    assert np.all(p[sel.indices] > 0)
    assert np.all(np.diff(sel.count) <= 0)  # ranked by count
    hits = np.zeros(len(p))
    for seed in range(300):
        s = sample(p, ids, 200, "multinomial", seed)
        hits[s.indices] += s.count
    expected = 300 * 200 * p
    assert np.abs(hits - expected).max() < 5 * np.sqrt(expected.max()) + 5


def test_without_replacement_matches_inclusion_order_of_p():
    p, ids = setup()
    first = np.zeros(len(p))
    for seed in range(3000):
        first[sample(p, ids, 1, "without_replacement", seed).indices[0]] += 1
    # a single draw without replacement is a draw from p: total variation to p is sampling noise
    # (~0.1 here), where a uniform draw over the support would be ~0.5 away
    assert 0.5 * np.abs(first / 3000 - p).sum() < 0.15
    uniform = (p > 0) / (p > 0).sum()
    assert 0.5 * np.abs(uniform - p).sum() > 0.4
    assert first[p == 0].sum() == 0
    sel = sample(p, ids, 100, "without_replacement", 0)
    assert len(set(sel.indices)) == 100 and np.all(p[sel.indices] > 0)


def test_top_is_deterministic_ranking():
    p, ids = setup()
    sel = sample(p, ids, 10, "top", seed=0)
    assert list(sel.indices) == list(np.argsort(-p, kind="stable")[:10])


def test_errors():
    p, ids = setup(20)
    with pytest.raises(ValueError, match="larger than the .* candidates with p > 0"):
        sample(p, ids, 19, "without_replacement", 0)
    with pytest.raises(ValueError, match="budget"):
        sample(p, ids, 21, "top", 0)
    with pytest.raises(ValueError, match="finite"):
        sample(np.full(20, np.nan), ids, 2, "top", 0)
    with pytest.raises(ValueError, match="sampling must be"):
        sample(p, ids, 2, "magic", 0)


def test_p_on_its_support_draws_like_p_over_the_pool():
    """TSDS keeps p on its support only: the same draws, and a budget checked against the pool
    (multinomial) or the support (without replacement, top)."""
    rng = np.random.default_rng(3)
    n = 400
    p = np.zeros(n)
    support = np.sort(rng.choice(n, 30, replace=False))
    p[support] = rng.random(30)
    ids = np.array([f"id{i:04d}" for i in range(n)])
    for how in ("multinomial", "without_replacement", "top"):
        whole = sample(p, ids, 12, how, seed=5)
        sparse = sample(p[support], ids[support], 12, how, seed=5, n_candidates=n)
        np.testing.assert_array_equal(support[sparse.indices], whole.indices)
        np.testing.assert_allclose(sparse.probability, whole.probability, rtol=1e-12)
    many = sample(p[support], ids[support], 100, "multinomial", seed=5, n_candidates=n)
    assert many.count.sum() == 100  # with replacement: more draws than the support is fine
    with pytest.raises(ValueError, match="larger than the 30 candidates with p > 0"):
        sample(p[support], ids[support], 31, "top", seed=5, n_candidates=n)
