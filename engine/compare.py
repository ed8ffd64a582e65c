"""Comparing fine-tuned models on the same held-out texts: paired bootstrap intervals.

Two models A and B scored on the same n texts give each text i its summed NLL a_i, b_i and scored
tokens t_i. Perplexity is exp(sum_i a_i / sum_i t_i). The paired difference

    D = ppl_A - ppl_B

is resampled over texts (the same resampled texts for both models: what varies between texts
cancels), giving a percentile interval for D. An interval that excludes 0 says the difference is
beyond what the choice of held-out texts explains; it says nothing about fine-tuning noise between
seeds (the seed spread, next to it, does). Free: no extra fine-tune, only the per-text NLLs.

References:
    Efron, Tibshirani. An Introduction to the Bootstrap. 1993 (percentile intervals).
    Koehn. Statistical Significance Tests for Machine Translation Evaluation. EMNLP 2004 (paired
    bootstrap resampling over test items).
"""

from __future__ import annotations

import numpy as np


def perplexity(nll: np.ndarray, tokens: np.ndarray) -> float:
    return float(np.exp(np.sum(nll) / np.sum(tokens)))


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    tokens: np.ndarray,
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(D, low, high): ppl_A - ppl_B on every text, and the `level` percentile interval of it
    over `resamples` resamplings of the texts. a, b: (n,) summed NLL per text; tokens: (n,)."""
    a, b, tokens = (np.asarray(x, np.float64) for x in (a, b, tokens))
    if not (len(a) == len(b) == len(tokens)) or len(a) == 0:
        raise ValueError(f"per-text arrays must have one length > 0: {len(a)}, {len(b)}, "
                         f"{len(tokens)}")  # fmt: skip
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    t = tokens[idx].sum(axis=1)
    diffs = np.exp(a[idx].sum(axis=1) / t) - np.exp(b[idx].sum(axis=1) / t)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return perplexity(a, tokens) - perplexity(b, tokens), float(low), float(high)


def paired_mean_bootstrap(
    a: np.ndarray, b: np.ndarray, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(D, low, high) for per-item scores (a task metric's 0/1 per held-out item): D = mean(a) -
    mean(b) on the same items, and its percentile interval over resamplings of the items."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"per-item arrays must have one length > 0: {len(a)}, {len(b)}")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    diffs = (a[idx] - b[idx]).mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return float(a.mean() - b.mean()), float(low), float(high)


def winner(means: dict[str, float], intervals: dict[tuple[str, str], tuple[float, float]]) -> str:
    """One line naming the method to trust: the lowest perplexity if its interval against every
    other method lies below 0, else "no clear winner" with the methods it cannot be told from."""
    if not means:
        return "no methods to compare"
    best = min(means, key=lambda m: means[m])
    ties = [m for m in means if m != best and intervals[(best, m)][1] >= 0]
    if not ties:
        return (f"trust {best}: the lowest perplexity ({means[best]:.2f}), below every other "
                "method beyond the 95% paired intervals")  # fmt: skip
    return (f"no clear winner: {best} is lowest ({means[best]:.2f}) but within the 95% paired "
            f"interval of {', '.join(sorted(ties))}")  # fmt: skip
