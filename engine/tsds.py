"""TSDS (Liu, Karbasi, Rekatsinas, NeurIPS 2024): optimal transport to the targets, density-capped.

Each query q_j ships mass 1/M to candidates; the coupling gamma minimises

    (alpha / C) sum_ji gamma_ji ||q_j - x_i||  +  (1 - alpha) M max_ji rho(x_i) gamma_ji

and the selection distribution is p_i = sum_j gamma_ji. Over each query's neighbours (ascending
distance d_jk, density rho_jk) let c_j(k) = sum_{k'<=k} 1/rho_jk' and
g_j(k) = sum_{k'<=k} d_jk'/rho_jk'. At a level s a query fills the neighbours with c_j(k) <= s at
1/(M s rho_jk) and puts the rest of its 1/M on the next one. The total cost
TC(s) = sum_j [d_{j,K_j+1} c_j(K_j) - g_j(K_j)] never decreases in s, and the optimal s* is the
smallest breakpoint b in {c_j(k)} with (alpha/C) TC(b) >= (1-alpha) M.

The reference code walks the breakpoints with a heap; here the events (c_j(k), k, j) below a bound
on c are sorted at once (a prefix of the heap's pop order) and TC is a cumulative sum, so the
solve is a few array passes whose cost follows the events before the stop.

Modes:
* `compat` reproduces the reference bit for bit (its numpy-1 dtype rules: float64 counts and s,
  float32 running sum of d/rho, the total cost updated as `t -= old; t += new` in pop order,
  probabilities accumulated query by query), including its defects: a level below a query's first
  breakpoint (alpha near 1) makes the reference's assertion fire, which compat raises; exhausted
  neighbour lists dump the remainder on the last neighbour above its cap.
* `exact` is float64 throughout and fixes both: a query whose first breakpoint is above s* puts its
  whole 1/M on its nearest neighbour (optimal, and within the cap); exhausted lists raise
  `NeighboursExhausted` so the caller fetches more neighbours instead of returning a non-optimal p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("compat", "exact")


class NeighboursExhausted(ValueError):
    """No breakpoint within the neighbour lists reaches the optimality condition: fetch more."""


@dataclass
class TSDSSolution:
    p: np.ndarray  # (n_candidates,) float64 selection probabilities, summing to 1
    s: float  # the level s*
    last: np.ndarray  # (M,) int64: each query's last full neighbour, -1 for none
    events: int  # events processed before the stop (the reference's heap pops, the stop included)
    exhausted: bool  # True when no event met the condition (compat only; exact raises)


def _check(knn_dist, knn_idx, rho, alpha, C, n_candidates) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    if knn_dist.ndim != 2 or knn_dist.shape != knn_idx.shape or knn_dist.shape != rho.shape:
        raise ValueError(
            f"knn_dist {knn_dist.shape}, knn_idx {knn_idx.shape} and rho {rho.shape} must be the "
            "same (M, L) shape"
        )
    M, L = knn_dist.shape
    if M == 0:
        raise ValueError("no queries (empty target set)")
    if L < 2:
        raise ValueError(f"need at least 2 neighbours per query, got {L}")
    if not np.all(np.isfinite(knn_dist)) or not np.all(np.isfinite(rho)):
        raise ValueError("knn_dist and rho must be finite")
    if np.any(rho <= 0):
        raise ValueError("rho must be > 0 (the density counts the point itself)")
    if knn_idx.min() < 0 or knn_idx.max() >= n_candidates:
        raise ValueError(
            f"knn_idx must lie in [0, {n_candidates}); a -1 label (missing neighbour) is not "
            "allowed"
        )
    if np.any(np.diff(knn_dist, axis=1) < 0):
        raise ValueError("each row of knn_dist must be in ascending order")


def solve(
    knn_dist: np.ndarray,
    knn_idx: np.ndarray,
    rho: np.ndarray,
    *,
    alpha: float,
    C: float,
    n_candidates: int,
    mode: str = "compat",
) -> TSDSSolution:
    """Selection probabilities from each query's neighbours (ascending distance) and densities."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    knn_dist, knn_idx, rho = np.asarray(knn_dist), np.asarray(knn_idx), np.asarray(rho)
    _check(knn_dist, knn_idx, rho, alpha, C, n_candidates)
    M, L = knn_dist.shape
    if mode == "compat":
        d = knn_dist  # float32 in the reference
        # d/rho: float32 / float32 stays float32; float32 / int64 (the sigma = 0 ones) is float64
        w_dtype = np.result_type(d.dtype, rho.dtype)
    else:
        d = knn_dist.astype(np.float64)
        w_dtype = np.float64
    w = d.astype(w_dtype) / rho.astype(w_dtype)
    # counts: python 1.0 / float32 scalar is float64 under numpy 1, in both modes
    c = np.cumsum(1.0 / rho.astype(np.float64), axis=1)  # sequential like `count += ...`
    g = np.cumsum(w, axis=1, dtype=w_dtype)  # sequential in its own dtype
    # Event (j, k), k = 0..L-2: query j's cost becomes d_{j,k+1} c_j(k) - g_j(k).
    cost = d[:, 1:].astype(np.float64) * c[:, :-1] - g[:, :-1].astype(np.float64)
    flat_c = c[:, :-1].ravel()  # event (j, k) sits at j * (L - 1) + k
    n_events = flat_c.size
    take = min(n_events, max(4096, n_events // 32))
    while True:
        # Events with c below a bound are a prefix of the heap's pop order: sort only those, and
        # widen the bound until the stop falls inside (solvers usually stop after a few percent).
        if take >= n_events:
            chosen = np.arange(n_events)
        else:
            bound = np.partition(flat_c, take - 1)[take - 1]
            chosen = np.flatnonzero(flat_c <= bound)  # every tie at the bound included
        ev_j, ev_k = np.divmod(chosen, L - 1)
        order = np.lexsort((ev_j, ev_k, flat_c[chosen]))  # the heap's pop order
        ev_j, ev_k = ev_j[order], ev_k[order]
        new = cost[ev_j, ev_k]
        old = np.where(ev_k > 0, cost[ev_j, np.maximum(ev_k - 1, 0)], 0.0)
        if mode == "compat":
            steps = np.empty(2 * len(new))
            steps[0::2], steps[1::2] = -old, new
            total = np.cumsum(steps)[1::2]  # `t -= old; t += new`, in order, float64
        else:
            total = np.cumsum(new - old)
        hit = np.flatnonzero(alpha / C * total >= (1 - alpha) * M)
        if len(hit) or len(chosen) == n_events:
            break
        take *= 8
    exhausted = len(hit) == 0
    if exhausted and mode == "exact":
        raise NeighboursExhausted(
            f"the {L} neighbours per query do not reach the optimal level; fetch more neighbours"
        )
    stop = len(ev_j) - 1 if exhausted else int(hit[0])
    s = float(c[ev_j[stop], ev_k[stop]])
    processed = stop + 1 if exhausted else stop  # the stopping event does not advance its query
    last = np.full(M, -1, dtype=np.int64)
    np.maximum.at(last, ev_j[:processed], ev_k[:processed])
    if mode == "compat":
        last = np.maximum(last, 0)  # the reference starts every query at 0 (defect 4)
    return TSDSSolution(
        _probabilities(rho, knn_idx, last, s, M, n_candidates, mode), s, last, stop + 1, exhausted
    )


def _probabilities(rho, knn_idx, last, s, M, n_candidates, mode) -> np.ndarray:
    """p: full neighbours k <= last_j at 1/(M s rho_jk), the rest of 1/M on neighbour last_j + 1."""
    L = rho.shape[1]
    full = np.arange(L)[None, :] <= last[:, None]
    share = 1 / M / s / rho.astype(np.float64)  # ((1/M)/s)/rho, the reference's order
    share = np.where(full, share, 0.0)
    prob_sum = np.cumsum(share, axis=1)[np.arange(M), np.maximum(last, 0)]
    prob_sum = np.where(last >= 0, prob_sum, 0.0)
    remainder = 1.0 / M - prob_sum
    if mode == "compat" and np.any(remainder < -1e-9):
        j = int(np.argmin(remainder))
        raise ValueError(
            f"reference assertion: query {j} gets {-remainder[j]:.3g} more than 1/M (s below its "
            "first breakpoint, alpha too close to 1); use mode='exact'"
        )
    remainder = np.maximum(remainder, 0.0)
    # Accumulate query by query, k ascending, then the remainder, exactly in the reference's order.
    rows, cols = np.nonzero(full)
    idx = np.concatenate([knn_idx[rows, cols], knn_idx[np.arange(M), last + 1]])
    val = np.concatenate([share[rows, cols], remainder])
    seq = np.concatenate([rows * (L + 1) + cols, np.arange(M) * (L + 1) + L])
    order = np.argsort(seq, kind="stable")
    p = np.zeros(n_candidates)
    np.add.at(p, idx[order], val[order])
    return p


def knn_uniform(
    knn_dist: np.ndarray, knn_idx: np.ndarray, *, alpha: float, C: float, n_candidates: int
) -> TSDSSolution:
    """KNN-Uniform (sigma = 0, rho = 1), closed form: the smallest K >= 1 with

        (alpha/C) sum_j sum_{k<K} (d_{j,K} - d_{j,k}) >= (1 - alpha) M   (0-based k),

    then each query puts 1/(M K) on each of its K nearest neighbours.
    """
    knn_dist, knn_idx = np.asarray(knn_dist, dtype=np.float64), np.asarray(knn_idx)
    _check(knn_dist, knn_idx, np.ones_like(knn_dist), alpha, C, n_candidates)
    M, L = knn_dist.shape
    K = np.arange(1, L)
    prefix = np.cumsum(knn_dist, axis=1)[:, :-1]  # sum_{k<K} d_jk for K = 1..L-1
    total = (K * knn_dist[:, 1:] - prefix).sum(axis=0)
    hit = np.flatnonzero(alpha / C * total >= (1 - alpha) * M)
    if len(hit) == 0:
        raise NeighboursExhausted(f"no K < {L} meets the condition; fetch more neighbours")
    k_star = int(K[hit[0]])
    p = np.zeros(n_candidates)
    np.add.at(p, knn_idx[:, :k_star].ravel(), 1.0 / (M * k_star))
    return TSDSSolution(p, float(k_star), np.full(M, k_star - 1, dtype=np.int64), -1, False)


def objective(
    sol: TSDSSolution, knn_dist: np.ndarray, rho: np.ndarray, *, alpha: float, C: float
) -> float:
    """The TSDS objective of a solution's coupling (for checks against an LP)."""
    d = np.asarray(knn_dist, dtype=np.float64)
    rho = np.asarray(rho, dtype=np.float64)
    M, L = d.shape
    gamma = np.where(np.arange(L)[None, :] <= sol.last[:, None], 1.0 / (M * sol.s * rho), 0.0)
    rows = np.arange(M)
    gamma[rows, sol.last + 1] = 1.0 / M - gamma.sum(axis=1)
    return float(alpha / C * (gamma * d).sum() + (1 - alpha) * M * (rho * gamma).max())
