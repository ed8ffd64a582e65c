"""TSDS from vectors to p: neighbours and density from index shards, then the solver.

The shards are reached through `fanout(method, *args)`, which calls `IndexShard.method(*args)` on
every shard and returns the answers in shard order: a list comprehension in-process, `ray.get`
over actor calls in `actors/index_shard.py`. Nothing here imports Ray.

exact mode (`select_exact`): float64 distances from exact per-pair recomputation, merged across
shards by (distance, id); L = min(max_K, N) neighbours, doubled and fetched again whenever the
lists run out before the optimal level (reference defect 5); density over the whole pool within
sigma, every neighbour counted unless `kde_K` caps it (defect 3), summed on the shards (exactly:
the same bits for any shard count) and computed only for candidates the solver can reach.
KNN-Uniform (sigma = 0) uses the closed form. The solution's p is sparse -- nonzero only on the
union of the neighbour lists -- so nothing here grows with the pool, only with M x L.

compat mode (`select_compat`): the reference pipeline step by step - one IVF index with its
parameters, L = min(max_K, N // 10), its float32 distances re-sorted with numpy's default sort,
density from a second IVF index over U (the union of all lists, in the reference's own set order)
with kde_K = min(kde_K, N // 10) neighbours and its float32 kernel sum. Same p as the reference
for the same kNN lists; lazy density does not change a bit of it.
"""

from __future__ import annotations

import numpy as np

from raysift.engine.fanout import Fanout
from raysift.engine.knn import IndexParams, build_index, combine_density, merge_topk
from raysift.engine.params import TSDSParams
from raysift.engine.tsds import (
    NeighboursExhausted,
    RowCache,
    TSDSSolution,
    knn_uniform,
    solve,
    solve_lazy,
)

REFERENCE_KDE_K = 1000


def reference_index_params() -> IndexParams:
    """The reference's `FaissIndexIVFFlat`: nlist = int(sqrt(n)) // 2, nprobe = 10."""
    return IndexParams(kind="ivf", nlist=None, nprobe=10, train_points_per_list=256, niter=10)


def gather_vectors(fanout: Fanout, rows: np.ndarray, dim: int) -> np.ndarray:
    """The vectors of candidate rows, from whichever shard holds each."""
    out = np.empty((len(rows), dim), dtype=np.float32)
    for where, vectors in fanout("take", rows):
        out[where] = vectors
    return out


def select_exact(
    fanout: Fanout, queries: np.ndarray, n_candidates: int, params: TSDSParams
) -> tuple[TSDSSolution, dict]:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    L = min(params.max_K, n_candidates)
    cache = RowCache()  # densities outlive a refetch with longer lists

    def density(rows: np.ndarray) -> np.ndarray:
        missing = cache.missing(rows)
        if len(missing):
            rho = np.empty(len(missing))
            for a in range(0, len(missing), params.density_batch):  # bounds the hit lists
                part = missing[a : a + params.density_batch]
                points = gather_vectors(fanout, part, queries.shape[1])
                partials = fanout("density", points, part, params.sigma, params.kde_K)
                rho[a : a + len(part)] = combine_density(
                    len(part), partials, params.sigma, params.kde_K
                )
            cache.add(missing, rho)
        return cache.get(rows)

    fetches = 0
    while True:
        fetches += 1
        sqdist, idx = merge_topk(fanout("search", queries, L, True), L)
        dist = np.sqrt(sqdist)
        try:
            if params.sigma == 0:
                sol = _uniform(dist, idx, params, n_candidates)
            else:
                sol, _ = solve_lazy(
                    dist, idx, density, alpha=params.alpha, C=params.C,
                    n_candidates=n_candidates, mode="exact", first=params.first,
                )  # fmt: skip
            break
        except NeighboursExhausted:
            if L >= n_candidates:
                raise
            L = min(n_candidates, 2 * L)
    info = {"neighbours": L, "fetches": fetches, "density_points": len(cache)}
    return sol, info


def _uniform(dist, idx, params: TSDSParams, n_candidates: int) -> TSDSSolution:
    try:
        return knn_uniform(dist, idx, alpha=params.alpha, C=params.C, n_candidates=n_candidates)
    except NeighboursExhausted:
        if dist.shape[1] < n_candidates:
            raise
        rho = np.ones(dist.shape)  # the whole pool listed: the general solver's full fill
        return solve(
            dist, idx, rho, alpha=params.alpha, C=params.C, n_candidates=n_candidates, mode="exact"
        )


def select_compat(
    fanout: Fanout, queries: np.ndarray, n_candidates: int, params: TSDSParams
) -> tuple[TSDSSolution, dict]:
    """The reference's pipeline; `fanout` must reach one shard built with
    `reference_index_params()` over the whole pool."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    L = min(params.max_K, n_candidates // 10)  # reference defect 1, kept
    kde_K = min(params.kde_K or REFERENCE_KDE_K, n_candidates // 10)
    if L < 2:
        raise ValueError(
            f"compat mode lists N // 10 = {n_candidates // 10} neighbours (the reference's cap); "
            "it needs at least 2: use mode exact for pools under 20 rows"
        )
    (found,) = fanout("search", queries, L, False)
    sqdist, idx = found
    order = np.argsort(sqdist, axis=-1)  # the reference re-sorts with numpy's default sort
    dist = np.sqrt(np.take_along_axis(sqdist, order, 1))
    idx = np.take_along_axis(idx, order, 1)
    info = {"neighbours": L, "kde_K": kde_K, "density_points": 0}
    if params.sigma == 0:
        rho = np.ones_like(idx)  # int64 ones, as the reference (d / rho is then float64)
        sol = solve(
            dist, idx, rho, alpha=params.alpha, C=params.C, n_candidates=n_candidates, mode="compat"
        )
        return sol, info
    union = np.asarray(list(set(idx.reshape(-1).tolist())), dtype=np.int64)  # reference order
    vectors = gather_vectors(fanout, union, queries.shape[1])
    index = build_index(vectors, reference_index_params())
    by_row = np.argsort(union)
    sigma = float(params.sigma)  # a Python float keeps the kernel float32, as numpy 1 did

    def density(rows: np.ndarray) -> np.ndarray:
        where = by_row[np.searchsorted(union[by_row], rows)]
        return reference_kde(index, vectors[where], sigma, kde_K)

    sol, info["density_points"] = solve_lazy(
        dist, idx, density, alpha=params.alpha, C=params.C, n_candidates=n_candidates,
        mode="compat", first=params.first,
    )  # fmt: skip
    info["union"] = len(union)
    return sol, info


def reference_kde(index, points: np.ndarray, sigma: float, kde_K: int) -> np.ndarray:
    """The reference's float32 density: sum over the kde_K nearest (IVF) of max(0, 1 - D2/sigma^2).

    The reference searches kde_K neighbours and zeroes those beyond sigma; a range search over the
    same probed lists finds exactly the non-zero terms at half the cost. They are laid out as the
    reference's rows were (ascending distance, zero-padded to kde_K) so numpy's float32 pairwise
    sum rounds identically (checked bit for bit on synth100k).
    """
    lims, sq, _ = index.range_search(np.ascontiguousarray(points), sigma**2)
    counts = np.diff(lims).astype(np.int64)
    which = np.repeat(np.arange(len(points)), counts)
    # by point, then by D2 (D2 / (2 sigma^2) < 1/2 never crosses into the next point)
    order = np.argsort(which + sq / (np.float64(sigma) ** 2 * 2), kind="stable")
    sq = sq[order]
    rank = np.arange(len(sq)) - np.repeat(lims[:-1].astype(np.int64), counts)
    keep = rank < kde_K
    rows = np.zeros((len(points), kde_K), dtype=np.float32)
    rows[which[keep], rank[keep]] = 1 - sq[keep] / (sigma**2)
    return rows.sum(axis=-1)
