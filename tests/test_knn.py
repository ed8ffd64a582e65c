"""engine.knn: exact shard search and merge, GPU-style capped search, range density (no Ray)."""

import numpy as np
import pytest

from raysift.engine.knn import (
    IndexParams,
    IndexShard,
    ShortResults,
    gpu_available,
    kernel_density,
    merge_topk,
    shard_bounds,
)

RNG = np.random.default_rng(7)
# Clustered rows stored cluster by cluster: a query's neighbours crowd into one part of the rows,
# which is what makes a capped block hide neighbours.
CENTRES = RNG.standard_normal((12, 24)).astype(np.float32)
X = np.repeat(CENTRES, 100, axis=0) + 0.3 * RNG.standard_normal((1200, 24)).astype(np.float32)
Q = X[RNG.choice(1200, 30, replace=False)] + 0.05 * RNG.standard_normal((30, 24)).astype(np.float32)


def brute(queries, x, k):
    d = ((queries[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), d.shape), d), axis=1)[:, :k]
    return np.take_along_axis(d, order, 1), order


def shards_of(x, n, params=None, **kw):
    params = params or IndexParams()
    return [IndexShard(x[a:b], a, params, **kw) for a, b in shard_bounds(len(x), n)]


def search_all(shards, queries, k, exact=True):
    return merge_topk([s.search(queries, k, exact) for s in shards], k)


def test_exact_search_matches_brute_force_and_ignores_sharding():
    want_d, want_i = brute(Q, X, 150)
    one = search_all(shards_of(X, 1), Q, 150)
    np.testing.assert_array_equal(one[1], want_i)
    np.testing.assert_allclose(one[0], want_d, rtol=1e-12)
    for n in (2, 3, 7):
        d, i = search_all(shards_of(X, n), Q, 150)
        np.testing.assert_array_equal(i, one[1])
        np.testing.assert_array_equal(d, one[0])  # bit for bit, whatever the layout


@pytest.mark.parametrize("brute_force", [False, True])
def test_capped_search_in_blocks_is_exact(brute_force):
    """FAISS GPU caps k at 2048; the blocked search with a CPU re-search where a block is full
    must give the uncapped answer. Here the cap is 16 and k = 150."""
    full = search_all(shards_of(X, 1), Q, 150)
    capped = shards_of(X, 1, IndexParams(brute_force_knn=brute_force), max_k=16)
    d, i = search_all(capped, Q, 150)
    np.testing.assert_array_equal(i, full[1])
    np.testing.assert_array_equal(d, full[0])
    fd, fi = shards_of(X, 1)[0].search(Q, 150, exact=False)
    cd, ci = capped[0].search(Q, 150, exact=False)
    np.testing.assert_array_equal(ci, fi)
    np.testing.assert_allclose(cd, fd, rtol=1e-5)


def test_density_matches_brute_force_and_ignores_sharding():
    sigma = 2.0
    points = np.arange(0, 1200, 13)
    d, _ = brute(X[points], X, 1200)
    kernel = np.maximum(0.0, 1 - d / sigma**2)
    want = kernel.sum(axis=1)  # includes the point itself (distance 0, kernel 1)
    rhos = []
    for n in (1, 4):
        shards = shards_of(X, n)
        hits = [s.within(X[points], sigma**2) for s in shards]
        rhos.append(kernel_density(len(points), points, hits, sigma))
    np.testing.assert_allclose(rhos[0], want, rtol=1e-12)
    np.testing.assert_array_equal(rhos[0], rhos[1])
    assert rhos[0].min() >= 1
    # kde_K: only the kde_K nearest (the point itself included) count
    capped = kernel_density(
        len(points), points, [shards_of(X, 1)[0].within(X[points], sigma**2)], sigma, kde_K=5
    )
    np.testing.assert_allclose(capped, kernel[:, :5].sum(axis=1), rtol=1e-12)


def test_ivf_and_hnsw_find_most_neighbours():
    want = brute(Q, X, 20)[1]
    _, exact = search_all(shards_of(X, 2, IndexParams(kind="ivf", brute_force_knn=True)), Q, 20)
    np.testing.assert_array_equal(exact, want)  # the IVF index then serves only the density
    for params in (
        IndexParams(kind="ivf", nlist=16, nprobe=8),
        IndexParams(kind="hnsw", hnsw_m=16, ef_search=64),
    ):
        _, got = search_all(shards_of(X, 2, params), Q, 20)
        recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got, want, strict=True)])
        assert recall >= 0.9, (params.kind, recall)


def test_short_ivf_lists_raise_instead_of_returning_minus_one():
    shard = IndexShard(X, 0, IndexParams(kind="ivf", nlist=64, nprobe=1))
    with pytest.raises(ShortResults, match="fewer than .* neighbours"):
        shard.search(Q, 500)


def test_take_returns_rows_by_global_id():
    shards = shards_of(X, 3)
    rows = np.array([5, 1199, 400, 401, 0])
    out = np.empty((len(rows), X.shape[1]), np.float32)
    for shard in shards:
        where, vectors = shard.take(rows)
        out[where] = vectors
    np.testing.assert_array_equal(out, X[rows])


def test_ivf_density_uses_its_own_nprobe():
    """density_nprobe = nlist scans every list: the IVF density equals the flat one, while the
    kNN search keeps its own (small) nprobe."""
    points = np.arange(0, 1200, 50)
    flat = IndexShard(X, 0, IndexParams())
    ivf = IndexShard(X, 0, IndexParams(kind="ivf", nlist=32, nprobe=1, density_nprobe=32))
    want = kernel_density(len(points), points, [flat.within(X[points], 4.0)], 2.0)
    got = kernel_density(len(points), points, [ivf.within(X[points], 4.0)], 2.0)
    np.testing.assert_array_equal(got, want)
    assert ivf._cpu.nprobe == 1


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs FAISS with GPU support and a GPU")
def test_gpu_shard_matches_cpu_past_the_k_cap():
    """On a GPU the shard searches in blocks (k = 3000 > 2048) and must equal the CPU answer."""
    x = np.tile(X, (5, 1)) + 0.01 * RNG.standard_normal((6000, 24)).astype(np.float32)
    cpu = merge_topk([IndexShard(x, 0, IndexParams()).search(Q, 3000)], 3000)
    gpu = merge_topk([IndexShard(x, 0, IndexParams(), use_gpu=True).search(Q, 3000)], 3000)
    np.testing.assert_array_equal(gpu[1], cpu[1])
    np.testing.assert_array_equal(gpu[0], cpu[0])
