"""engine.compare: the paired bootstrap interval and the one-line verdict."""

from __future__ import annotations

import numpy as np

from raysift.engine.compare import paired_bootstrap, perplexity, winner


def test_paired_bootstrap_sees_a_small_consistent_gain_that_unpaired_noise_would_hide():
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 60, size=100).astype(float)
    hard = rng.normal(3.0, 0.8, size=100)  # texts differ a lot in difficulty
    a = (hard - 0.05) * tokens  # A is a little better on every text
    b = hard * tokens
    d, low, high = paired_bootstrap(a, b, tokens, seed=1)
    assert d == perplexity(a, tokens) - perplexity(b, tokens) < 0
    assert low < d < high < 0  # paired: beyond the intervals
    same = paired_bootstrap(b, b, tokens)
    assert same == (0.0, 0.0, 0.0)
    noisy = paired_bootstrap(b + rng.normal(0, 5, 100), b, tokens)
    assert noisy[1] < 0 < noisy[2]  # no consistent difference: the interval holds 0


def test_the_verdict_names_a_winner_only_beyond_the_intervals():
    means = {"knn": 10.0, "random": 12.0, "gotd": 10.2}
    clear = {("knn", "random"): (-2.5, -1.5), ("knn", "gotd"): (-0.4, -0.1)}
    assert winner(means, clear).startswith("trust knn: the lowest perplexity (10.00)")
    unclear = {("knn", "random"): (-2.5, -1.5), ("knn", "gotd"): (-0.4, 0.1)}
    assert winner(means, unclear) == (
        "no clear winner: knn is lowest (10.00) but within the 95% paired interval of gotd")
