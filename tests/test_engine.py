"""Ray-free math: ids, baselines, pooling and length buckets."""

import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raysift.engine.baselines import knn_select, random_select
from raysift.engine.embed import length_buckets, mean_pool
from raysift.engine.ids import content_id, content_ids
from raysift.engine.selection import Selection, top_k

from .conftest import DEMO_POOL


def test_content_id_matches_the_pool_convention():
    table = pq.read_table(DEMO_POOL).slice(0, 50)
    assert content_ids(table["text"].to_pylist()) == table["id"].to_pylist()
    assert content_id("héllo") == hashlib.sha1("héllo".encode()).hexdigest()[:16]


def ids_of(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.array([content_id(str(x)) for x in rng.random(n)])


def test_random_is_seeded_and_independent_of_row_order():
    ids = ids_of(1000)
    a = random_select(ids, 50, seed=3)
    perm = np.random.default_rng(1).permutation(len(ids))
    b = random_select(ids[perm], 50, seed=3)
    assert list(ids[a.indices]) == list(ids[perm][b.indices])
    c = random_select(ids, 50, seed=4)
    assert len(set(ids[a.indices]) & set(ids[c.indices])) < 20
    assert np.allclose(a.probability, 50 / 1000)
    assert np.all(np.diff(a.score) <= 0)


def test_random_is_roughly_uniform():
    ids = ids_of(2000)
    hits = np.zeros(2000)
    for seed in range(200):
        hits[random_select(ids, 200, seed).indices] += 1
    # each row is chosen 20 times in expectation; Binomial(200, 0.1) has sd 4.24
    assert 3.5 < hits.std() < 5.0


def unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_max_equals_brute_force():
    rng = np.random.default_rng(0)
    cand, targ = unit(rng, 500, 16), unit(rng, 7, 16)
    ids = ids_of(500)
    sel = knn_select(cand, targ, ids, 25, "max")
    brute = (cand @ targ.T).max(axis=1)
    assert list(sel.indices) == list(np.argsort(-brute, kind="stable")[:25])
    assert np.allclose(sel.score, brute[sel.indices], atol=1e-6)


def test_knn_centroid_equals_brute_force():
    rng = np.random.default_rng(1)
    cand, targ = unit(rng, 400, 8), unit(rng, 5, 8)
    sel = knn_select(cand, targ, ids_of(400), 10, "centroid")
    c = targ.mean(0)
    brute = cand @ (c / np.linalg.norm(c))
    assert list(sel.indices) == list(np.argsort(-brute, kind="stable")[:10])


def test_ties_are_broken_by_id_not_row_order():
    score = np.array([1.0, 2.0, 2.0, 2.0, 0.5])
    ids = np.array(["e", "d", "b", "c", "a"])
    assert list(top_k(score, 3, ids)) == [2, 3, 1]


@pytest.mark.parametrize("budget", [0, 11])
def test_budget_outside_the_pool_is_refused(budget):
    with pytest.raises(ValueError, match="budget"):
        random_select(ids_of(10), budget, 0)


def test_knn_refuses_mismatched_dimensions():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="dimension"):
        knn_select(unit(rng, 10, 8), unit(rng, 2, 4), ids_of(10), 3)


def test_selection_rejects_repeats():
    with pytest.raises(ValueError, match="repeated"):
        Selection(np.array([1, 1]), np.array([0.0, 0.0]))


def test_length_buckets_cover_every_row_once_longest_first():
    lengths = np.array([5, 1, 9, 3, 9, 2, 7])
    batches = length_buckets(lengths, 3)
    flat = np.concatenate(batches)
    assert sorted(flat) == list(range(7))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert list(lengths[flat]) == sorted(lengths, reverse=True)


def test_mean_pool_ignores_padding_and_normalises():
    hidden = torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    garbage = hidden.clone()
    garbage[0, 2:] = 1e6
    out = mean_pool(garbage, mask)
    expected = hidden[0, :2].mean(0)
    assert torch.allclose(out[0], expected / expected.norm(), atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-6)
