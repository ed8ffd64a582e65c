"""Nearest neighbours and kernel density over FAISS index shards (Ray-free).

A pool of N vectors is split into shards of consecutive global rows; each shard is an
`IndexShard` (held by a Ray actor in `actors/index_shard.py`, or in-process). The coordinator asks
every shard for its local top-k, then merges (`merge_topk`); the union of the shards' local top-k
lists contains the global top-k, so the merge is exact for exact (Flat) shards.

Exact distances: FAISS computes squared L2 in float32 through BLAS, and the rounding of one pair
depends on the blocking, i.e. on which other rows share the shard. `IndexShard.search(...,
exact=True)` fetches a few extra neighbours and recomputes every returned distance in float64 pair
by pair, then orders by (distance, global id). The result is then the same whatever the number of
shards, which the float32 FAISS output alone is not.

Density (TSDS's KNN-KDE): rho(x) = sum_y max(0, 1 - ||x - y||^2 / sigma^2) over the pool, x
itself included (so rho >= 1). Only points within sigma contribute, so each shard finds them with
a range search and sums their kernel itself (`IndexShard.density`); the coordinator adds the
shards' partial sums (`combine_density`). The sums are exact: every term is rounded once to a
multiple of 2^-60 and added as integers (two int64 halves), so rho is the same bits whatever the
number of shards and the order of the terms (a float sum would depend on both, at the last bit).
With `kde_K` only the kde_K nearest count: each shard sends its kde_K - 1 nearest other rows per
point, and the coordinator keeps the global ones by (distance, id).

FAISS on a GPU caps k at 2048. A shard on a GPU splits its rows into blocks small enough that each
block's share of the top-k fits under the cap; a (query, block) pair whose capped list could still
hide a neighbour of the global top-k (its last distance is below the merged k-th) is searched again
on the CPU copy of that block, so the chunked search is exact, not "usually right". The same code
runs on CPU with `max_k` set, which is how the tests exercise it.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

from raysift.engine.allocator import large_allocations_via_mmap
from raysift.engine.params import IndexParams

GPU_MAX_K = 2048


class ShortResults(ValueError):
    """An approximate index returned fewer neighbours than asked (FAISS label -1)."""


def reference_nlist(n: int) -> int:
    """The TSDS reference's IVF list count (`faiss_helper.py`): int(sqrt(n)) // 2, at least 1."""
    return max(1, int(np.sqrt(n)) // 2)


def build_index(x: np.ndarray, params: IndexParams) -> faiss.Index:
    """A CPU FAISS index over the rows of x (float32, C-contiguous), squared-L2 metric."""
    n, d = x.shape
    if params.kind == "flat":
        index = faiss.IndexFlatL2(d)
    elif params.kind == "ivf":
        nlist = min(params.nlist or reference_nlist(n), n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
        index.cp.max_points_per_centroid = params.train_points_per_list
        index.cp.niter = params.niter
        index.train(x)
        index.nprobe = min(params.nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(d, params.hnsw_m)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
    index.add(x)
    return index


def gpu_available() -> bool:
    """FAISS has GPU support and sees a GPU: the one place the index device is chosen."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Consecutive, near-equal row ranges covering [0, n)."""
    edges = np.linspace(0, n, min(shards, n) + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def pair_sqdist(queries: np.ndarray, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """||queries[i] - x[rows[i, j]]||^2 in float64, computed pair by pair (layout-independent)."""
    out = np.empty(rows.shape, dtype=np.float64)
    step = max(1, 2_000_000 // max(1, rows.shape[1] * x.shape[1]))  # ~16 MB of differences
    for start in range(0, len(rows), step):
        r = rows[start : start + step]
        diff = x[r].astype(np.float64) - queries[start : start + step, None, :].astype(np.float64)
        out[start : start + step] = np.einsum("ijk,ijk->ij", diff, diff)
    return out


def order_rows(dist: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k smallest by (distance, id): ties never depend on where a row was stored."""
    order = np.lexsort((ids, dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact global top-k from every shard's local top-k lists (same queries, global ids)."""
    dist = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    if dist.shape[1] < k:
        raise ShortResults(f"the shards hold {dist.shape[1]} rows, fewer than k = {k}")
    return order_rows(dist, ids, k)


class BruteForce:
    """k-NN over raw rows without an index: FAISS's blocked-GEMM scan (`faiss.knn`, or
    `faiss.knn_gpu` with GPU resources). Exact, no second copy of the rows."""

    def __init__(self, x: np.ndarray, gpu_resources=None) -> None:
        self.x, self.ntotal, self.res = x, len(x), gpu_resources

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.res is not None:
            return faiss.knn_gpu(self.res, queries, self.x, k)
        return faiss.knn(queries, self.x, k)


class IndexShard:
    """One shard of the pool: rows [offset, offset + n) and a FAISS index over them.

    `max_k` caps one FAISS search (2048 on a GPU, None on CPU); above it the rows are searched in
    blocks as the module docstring explains.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        offset: int,
        params: IndexParams,
        *,
        use_gpu: bool = False,
        max_k: int | None = None,
        threads: int | None = None,
    ) -> None:
        if threads:
            faiss.omp_set_num_threads(threads)
        large_allocations_via_mmap()
        self.x = np.ascontiguousarray(vectors, dtype=np.float32)
        self.offset = int(offset)
        self.params = params
        self.use_gpu = use_gpu and gpu_available()
        self.max_k = GPU_MAX_K if self.use_gpu else max_k
        self._cpu = build_index(self.x, params)  # range search and the chunking fallback
        self._blocks: dict[int, list[tuple[int, object, object]]] = {}

    def __len__(self) -> int:
        return len(self.x)

    def _to_device(self, index: faiss.Index) -> faiss.Index:
        if self.use_gpu and self.params.kind != "hnsw":  # FAISS has no GPU HNSW
            return faiss.index_cpu_to_gpu(self._gpu_resources(), 0, index)
        return index

    def _block_list(self, k: int) -> list[tuple[int, Any, Any]]:
        """(start, device searcher, CPU searcher) per block; k / blocks <= cap / 4."""
        n = len(self.x)
        count = 1 if self.max_k is None or k <= self.max_k else math.ceil(4 * k / self.max_k)
        count = min(count, n)
        if count not in self._blocks:
            # keep one layout alive, not every k seen
            self._blocks = {count: [self._block(a, b) for a, b in shard_bounds(n, count)]}
        return self._blocks[count]

    def _block(self, a: int, b: int) -> tuple[int, Any, Any]:
        if self.params.brute_force_knn:
            cpu = BruteForce(self.x[a:b])
            return a, BruteForce(self.x[a:b], self._gpu_resources()) if self.use_gpu else cpu, cpu
        cpu = self._cpu if (a, b) == (0, len(self.x)) else build_index(self.x[a:b], self.params)
        return a, self._to_device(cpu), cpu

    def _gpu_resources(self):
        if not hasattr(self, "_res"):
            self._res = faiss.StandardGpuResources()
        return self._res

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Local top-k (float32 squared L2, local rows, -1 where missing), honouring the cap."""
        blocks = self._block_list(k)
        if len(blocks) == 1 and (self.max_k is None or k <= self.max_k):
            return blocks[0][1].search(queries, k)
        parts = []
        for start, index, cpu in blocks:
            width = min(k, cpu.ntotal)
            D = np.full((len(queries), width), np.inf, dtype=np.float32)
            lab = np.full((len(queries), width), -1, dtype=np.int64)
            kb = min(width, self.max_k)
            D[:, :kb], lab[:, :kb] = index.search(queries, kb)
            parts.append((start, cpu, kb < width, D, lab))
        D = np.concatenate([np.where(p[4] >= 0, p[3], np.inf) for p in parts], axis=1)
        kth = np.partition(D, k - 1, axis=1)[:, k - 1] if D.shape[1] >= k else np.inf
        for _, cpu, capped, Db, Ib in parts:
            # A capped block can hide global top-k rows only from queries whose last hit in it
            # is not beyond the merged k-th distance; search those again, uncapped, on the CPU.
            cap = self.max_k or Db.shape[1]  # capped blocks exist only under a cap
            hidden = np.flatnonzero(Db[:, cap - 1] <= kth) if capped else np.empty(0, np.int64)
            if len(hidden):
                Db[hidden], Ib[hidden] = cpu.search(queries[hidden], Db.shape[1])
        D = np.concatenate([p[3] for p in parts], axis=1)
        lab = np.concatenate([np.where(p[4] >= 0, p[4] + p[0], -1) for p in parts], axis=1)
        D = np.where(lab >= 0, D, np.inf)
        order = np.lexsort((lab, D), axis=1)[:, :k]
        D, lab = np.take_along_axis(D, order, 1), np.take_along_axis(lab, order, 1)
        return np.where(lab >= 0, D, np.finfo(np.float32).max).astype(np.float32), lab

    def search(
        self, queries: np.ndarray, k: int, exact: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """This shard's top-k of each query: (squared distances, global ids), ascending.

        exact=True: float64 distances recomputed pair by pair, ordered by (distance, id), from a
        slightly deeper FAISS list so float32 near-ties at the cut cannot drop a true neighbour.
        exact=False: FAISS's float32 output as is (the TSDS reference's compat path).
        A -1 label (an IVF/HNSW search that found fewer than k rows) raises `ShortResults`.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.x))
        deep = min(len(self.x), k + max(8, k // 64)) if exact else k
        D, lab = self._search(queries, deep)
        if np.any(lab < 0):
            short = int(np.count_nonzero((lab < 0).any(axis=1)))
            raise ShortResults(
                f"{self.params.kind} index returned fewer than {deep} neighbours for {short} of "
                f"{len(lab)} queries (shard at row {self.offset}); raise nprobe / ef_search, use a "
                "flat index, or ask for fewer neighbours"
            )
        if not exact:
            return D[:, :k], lab[:, :k] + self.offset
        dist, local = order_rows(pair_sqdist(queries, self.x, lab), lab, k)
        return dist, local + self.offset

    def within(
        self, points: np.ndarray, radius_sq: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (point, global id, float64 squared distance) with distance^2 < radius_sq here.

        FAISS's float32 range search runs with a slightly larger radius; the float64 distance
        decides, so membership does not depend on the shard layout either.
        """
        points = np.ascontiguousarray(points, dtype=np.float32)
        search = None  # the index's own nprobe, unless density has its own
        if self.params.kind == "ivf" and self.params.density_nprobe:
            nprobe = min(self.params.density_nprobe, self._cpu.nlist)
            search = faiss.SearchParametersIVF(nprobe=nprobe)
        radius = float(radius_sq) * (1 + 1e-4) + 1e-12
        lims, _, lab = self._cpu.range_search(points, radius, params=search)
        which = np.repeat(np.arange(len(points)), np.diff(lims).astype(np.int64))
        sq = np.empty(len(lab))
        step = max(1, 4_000_000 // points.shape[1])  # ~32 MB of float64 differences at a time
        for a in range(0, len(lab), step):
            diff = self.x[lab[a : a + step]].astype(np.float64) - points[which[a : a + step]]
            sq[a : a + step] = np.einsum("ij,ij->i", diff, diff)
        keep = sq < radius_sq
        return which[keep], lab[keep].astype(np.int64) + self.offset, sq[keep]

    def density(
        self, points: np.ndarray, self_ids: np.ndarray, sigma: float, kde_K: int | None = None
    ):
        """This shard's part of the density of each point (its own row excluded: it is the 1):
        exact fixed-point kernel sums (n_points, 2) int64, or with `kde_K` each point's kde_K - 1
        nearest other rows here as (point, global id, float64 squared distance)."""
        return density_partial(len(points), self_ids, self.within(points, sigma**2), sigma, kde_K)

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `ids` of the rows held here, their vectors)."""
        local = np.asarray(ids, dtype=np.int64) - self.offset
        where = np.flatnonzero((local >= 0) & (local < len(self.x)))
        return where, self.x[local[where]]


FIXED_BITS = 60  # kernel terms are rounded to multiples of 2^-60 and summed as integers
_LOW = 30


def fixed_sums(which: np.ndarray, terms: np.ndarray, n_points: int) -> np.ndarray:
    """Exact per-point sums of terms in [0, 1]: (n_points, 2) int64 (high and low 30 bits of
    each term's 60-bit fixed-point value, summed separately: no overflow below 2^33 terms)."""
    v = np.rint(np.asarray(terms, np.float64) * 2.0**FIXED_BITS).astype(np.int64)
    out = np.zeros((n_points, 2), np.int64)
    np.add.at(out[:, 0], which, v >> _LOW)
    np.add.at(out[:, 1], which, v & ((1 << _LOW) - 1))
    return out


def from_fixed(sums: np.ndarray) -> np.ndarray:
    """The float64 value of exact fixed-point sums (one rounding, the same for any term order)."""
    return sums[:, 0] * 2.0**-_LOW + sums[:, 1] * 2.0 ** -(2 * _LOW)


def density_partial(
    n_points: int,
    self_ids: np.ndarray,
    hits: tuple[np.ndarray, np.ndarray, np.ndarray],
    sigma: float,
    kde_K: int | None = None,
):
    """One shard's share of the density from its `within` hits (see `IndexShard.density`)."""
    which, ids, sq = hits
    other = ids != np.asarray(self_ids)[which]
    which, ids, sq = which[other], ids[other], sq[other]
    if kde_K is None:
        return fixed_sums(which, 1.0 - sq / (sigma * sigma), n_points)
    order = np.lexsort((ids, sq, which))
    which, ids, sq = which[order], ids[order], sq[order]
    starts = np.searchsorted(which, which, side="left")
    keep = np.arange(len(which)) - starts < kde_K - 1
    return which[keep], ids[keep], sq[keep]


def combine_density(n_points: int, partials: list, sigma: float, kde_K: int | None = None):
    """rho_i = 1 + sum of the kernel over other rows within sigma, from every shard's partial
    (`density_partial`), float64; independent of the sharding, bit for bit."""
    if kde_K is None:
        total = np.sum(np.stack(partials), axis=0) if partials else np.zeros((n_points, 2), int)
        return 1.0 + from_fixed(total)
    capped = density_partial(
        n_points,
        np.full(n_points, -1),
        (np.concatenate([p[0] for p in partials]), np.concatenate([p[1] for p in partials]),
         np.concatenate([p[2] for p in partials])),  # fmt: skip
        sigma,
        kde_K,
    )
    which, _, sq = capped
    return 1.0 + from_fixed(fixed_sums(which, 1.0 - sq / (sigma * sigma), n_points))


def kernel_density(
    n_points: int,
    self_ids: np.ndarray,
    hits: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    sigma: float,
    kde_K: int | None = None,
) -> np.ndarray:
    """rho_i = 1 + sum over other rows y within sigma of 1 - ||x_i - y||^2 / sigma^2, float64,
    from the shards' `within` answers for the same points. The point's own row counts once as the
    1 (it is always in the pool), even when an approximate index missed it. With `kde_K` only the
    kde_K nearest rows count (the point itself included), by (distance, id)."""
    partials = [density_partial(n_points, self_ids, h, sigma, kde_K) for h in hits]
    return combine_density(n_points, partials, sigma, kde_K)
