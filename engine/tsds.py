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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MODES = ("compat", "exact")


class NeighboursExhausted(ValueError):
    """No breakpoint within the neighbour lists reaches the optimality condition: fetch more."""


@dataclass
class TSDSSolution:
    """p is nonzero only on the union of the neighbour lists, so it is kept sparse: `rows` (the
    support, ascending) and `p` (their probabilities, float64, summing to 1); `dense()` spreads
    it over the whole pool (for checks on small pools only: it is O(N))."""

    rows: np.ndarray  # (support,) int64 candidate rows with p > 0, ascending
    p: np.ndarray  # (support,) float64 their selection probabilities
    n_candidates: int
    s: float  # the level s*
    last: np.ndarray  # (M,) int64: each query's last full neighbour, -1 for none
    events: int  # events processed before the stop (the reference's heap pops, the stop included)
    exhausted: bool  # True when no event met the condition (compat only; exact raises)
    raw_last: np.ndarray | None = None  # last full neighbour before compat's clip at 0

    def dense(self) -> np.ndarray:
        out = np.zeros(self.n_candidates)
        out[self.rows] = self.p
        return out


def _sparse(idx: np.ndarray, values: np.ndarray, n_candidates: int) -> tuple:
    """sum_k values[k] per row idx[k], added in the given order (so a row's float sum is the one a
    dense `np.add.at` over the pool gives, bit for bit); rows with a zero sum left out."""
    rows, where = np.unique(np.asarray(idx, np.int64), return_inverse=True)
    p = np.zeros(len(rows))
    np.add.at(p, where.reshape(-1), values.reshape(-1))
    keep = p != 0
    return rows[keep], p[keep]


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
    """Selection probabilities from each query's neighbours (ascending distance) and densities.

    In exact mode, lists that run out before the optimal level raise `NeighboursExhausted`, unless
    they already hold the whole pool (L = n_candidates): then every query spreads its 1/M over all
    candidates in proportion to 1/rho, which is the optimum once nothing else is left.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    knn_dist, knn_idx, rho = np.asarray(knn_dist), np.asarray(knn_idx), np.asarray(rho)
    _check(knn_dist, knn_idx, rho, alpha, C, n_candidates)
    sol = _solve(knn_dist, knn_idx, rho, alpha, C, n_candidates, mode, None)
    if sol.exhausted and mode == "exact":
        if knn_dist.shape[1] < n_candidates:
            raise _exhausted(knn_dist.shape[1])
        return _fill_all(knn_idx, rho, n_candidates)
    return sol


class RowCache:
    """Values by candidate row (sorted for lookup), filled as they are computed."""

    def __init__(self) -> None:
        self.rows, self.values = np.empty(0, np.int64), np.empty(0)

    def __len__(self) -> int:
        return len(self.rows)

    def missing(self, rows: np.ndarray) -> np.ndarray:
        """The rows without a value yet (unique, ascending)."""
        return np.setdiff1d(rows, self.rows)

    def add(self, rows: np.ndarray, values: np.ndarray) -> None:
        rows = np.concatenate([self.rows, rows])
        values = np.concatenate([self.values.astype(values.dtype), values])  # keep their dtype
        order = np.argsort(rows)
        self.rows, self.values = rows[order], values[order]

    def get(self, rows: np.ndarray) -> np.ndarray:
        return self.values[np.searchsorted(self.rows, rows)]


def solve_lazy(
    knn_dist: np.ndarray,
    knn_idx: np.ndarray,
    density: Callable[[np.ndarray], np.ndarray],
    *,
    alpha: float,
    C: float,
    n_candidates: int,
    mode: str = "compat",
    first: int = 64,
) -> tuple[TSDSSolution, int]:
    """`solve` with rho computed only where the solution can depend on it.

    The answer depends on rho only at positions <= last_j + 1 of each query. Each query starts with
    its `first` neighbours; a solve over the truncated lists equals the full solve when no query
    has processed all its events (every unprocessed event of a longer list has a larger count, so
    it comes after the stop), and the rows that did are doubled until that holds.
    `density(rows)` returns rho for candidate rows (unique, ascending); returns (solution, number
    of candidates whose density was computed). Same output as `solve`, bit for bit.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    knn_dist, knn_idx = np.asarray(knn_dist), np.asarray(knn_idx)
    M, L = knn_dist.shape
    _check(knn_dist, knn_idx, np.ones(knn_dist.shape, np.float32), alpha, C, n_candidates)
    rho: np.ndarray | None = None
    known = RowCache()
    lengths = np.full(M, min(L, max(2, first)))
    while True:
        reach = np.arange(L)[None, :] < lengths[:, None]
        new = known.missing(knn_idx[reach])
        if len(new):
            values = np.asarray(density(new))
            if values.shape != new.shape or not np.all(np.isfinite(values)) or values.min() <= 0:
                raise ValueError("density must return one finite value > 0 per requested row")
            if rho is None:
                rho = np.ones(knn_dist.shape, dtype=values.dtype)
            known.add(new, values)
            rho[reach] = known.get(knn_idx[reach])
        sol = _solve(knn_dist, knn_idx, rho, alpha, C, n_candidates, mode, lengths)
        raw_last = sol.raw_last
        grow = (raw_last > lengths - 3) & (lengths < L)
        if sol.exhausted:
            grow = lengths < L
        if not grow.any():
            break
        lengths = np.where(grow, np.minimum(L, 2 * lengths), lengths)
    if sol.exhausted and mode == "exact":
        if L < n_candidates:
            raise _exhausted(L)
        assert rho is not None  # a first density was computed: every list has a row
        sol = _fill_all(knn_idx, rho, n_candidates)
    return sol, len(known)


def _exhausted(L: int) -> NeighboursExhausted:
    return NeighboursExhausted(
        f"the {L} neighbours per query do not reach the optimal level; fetch more neighbours"
    )


def _fill_all(knn_idx: np.ndarray, rho: np.ndarray, n_candidates: int) -> TSDSSolution:
    """Every query's list is the whole pool: gamma_ji = 1 / (M s_j rho_ji), s_j = sum_i 1/rho_ji."""
    M, L = knn_idx.shape
    inv = 1.0 / rho.astype(np.float64)
    s = inv.sum(axis=1)
    rows, p = _sparse(knn_idx.ravel(), (inv / (M * s[:, None])).ravel(), n_candidates)
    last = np.full(M, L - 1, dtype=np.int64)
    return TSDSSolution(rows, p, n_candidates, float(s.max()), last, -1, True, last)


def _solve(knn_dist, knn_idx, rho, alpha, C, n_candidates, mode, lengths) -> TSDSSolution:
    """The event sweep; `lengths[j]` (default L) is how many of query j's neighbours are known."""
    M, L = knn_dist.shape
    if mode == "compat":
        d = knn_dist  # float32 in the reference
        # d/rho: float32 / float32 stays float32; float32 / int64 (the sigma = 0 ones) is float64
        w_dtype = np.result_type(d.dtype, rho.dtype)
    else:
        d = knn_dist.astype(np.float64)
        w_dtype = np.dtype(np.float64)
    w = d.astype(w_dtype) / rho.astype(w_dtype)
    # counts: python 1.0 / float32 scalar is float64 under numpy 1, in both modes
    c = np.cumsum(1.0 / rho.astype(np.float64), axis=1)  # sequential like `count += ...`
    g = np.cumsum(w, axis=1, dtype=w_dtype)  # sequential in its own dtype
    # Event (j, k), k = 0..L-2: query j's cost becomes d_{j,k+1} c_j(k) - g_j(k).
    cost = d[:, 1:].astype(np.float64) * c[:, :-1] - g[:, :-1].astype(np.float64)
    flat_c = c[:, :-1].ravel()  # event (j, k) sits at j * (L - 1) + k
    if lengths is None:
        valid = np.arange(flat_c.size)
    else:  # events past a query's known neighbours never come before the stop (count = inf)
        known = np.arange(L - 1)[None, :] <= (lengths - 2)[:, None]
        valid = np.flatnonzero(known.ravel())
        flat_c = np.where(known.ravel(), flat_c, np.inf)
    n_events = len(valid)
    take = min(n_events, max(4096, n_events // 32))
    while True:
        # Events with c below a bound are a prefix of the heap's pop order: sort only those, and
        # widen the bound until the stop falls inside (solvers usually stop after a few percent).
        if take >= n_events:
            chosen = valid
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
    stop = len(ev_j) - 1 if exhausted else int(hit[0])
    s = float(c[ev_j[stop], ev_k[stop]])
    processed = stop + 1 if exhausted else stop  # the stopping event does not advance its query
    raw_last = np.full(M, -1, dtype=np.int64)
    np.maximum.at(raw_last, ev_j[:processed], ev_k[:processed])
    last = np.maximum(raw_last, 0) if mode == "compat" else raw_last  # reference: defect 4
    rows, p = _probabilities(rho, knn_idx, last, s, M, n_candidates, mode)
    return TSDSSolution(rows, p, n_candidates, s, last, stop + 1, exhausted, raw_last)


def _probabilities(rho, knn_idx, last, s, M, n_candidates, mode) -> tuple:
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
    return _sparse(idx[order], val[order], n_candidates)


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
    top = knn_idx[:, :k_star].ravel()
    rows, p = _sparse(top, np.full(len(top), 1.0 / (M * k_star)), n_candidates)
    last = np.full(M, k_star - 1, dtype=np.int64)
    return TSDSSolution(rows, p, n_candidates, float(k_star), last, -1, False)


def objective(
    sol: TSDSSolution, knn_dist: np.ndarray, rho: np.ndarray, *, alpha: float, C: float
) -> float:
    """The TSDS objective of a solution's coupling (for checks against an LP)."""
    d = np.asarray(knn_dist, dtype=np.float64)
    rho = np.asarray(rho, dtype=np.float64)
    M, L = d.shape
    gamma = np.where(np.arange(L)[None, :] <= sol.last[:, None], 1.0 / (M * sol.s * rho), 0.0)
    rows = np.flatnonzero(sol.last + 1 < L)  # a query filling its whole list has no remainder
    gamma[rows, sol.last[rows] + 1] = 1.0 / M - gamma[rows].sum(axis=1)
    return float(alpha / C * (gamma * d).sum() + (1 - alpha) * M * (rho * gamma).max())
