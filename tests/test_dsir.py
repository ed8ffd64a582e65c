"""DSIR against its reference, PyPI `data-selection==1.0.3` (a dev dependency, with nltk 3.8.1:
the tokenizer on Python's `re`, as in the paper's time), on 3,000 real pool texts that include
the pool's German and Spanish speeches; then the method's plumbing on the shared local cluster
(any partitioning gives the same selection, features reused, the reference's top-k set)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from raysift.engine.dsir import Featurizer, gumbel, log_diff, split_budget

from .conftest import SHARED

POOL = SHARED / "data" / "pool.parquet"
N_BUCKETS = 10000


@pytest.fixture(scope="module")
def texts() -> pa.Table:
    """3,000 real texts: every source, long ones (news, speeches, code) over-represented so that
    hundreds pass the 100-word filter, 200 German and Spanish speeches among them; and 150
    bbc_news texts as the target."""
    table = pq.read_table(POOL, columns=["id", "source", "text"])
    rng = np.random.default_rng(0)
    source = table.column("source").to_numpy(zero_copy_only=False)
    share = {"parl_de": 100, "parl_es": 100, "news_articles": 400, "python_code": 400}
    rows = []
    for name in np.unique(source):
        mine = np.flatnonzero(source == name)
        rows += list(rng.choice(mine, share.get(name, 200), replace=False))
    pool = table.take(sorted(rows)[:3150])
    return pool


def _split(texts: pa.Table) -> tuple[pa.Table, pa.Table]:
    source = texts.column("source").to_numpy(zero_copy_only=False)
    is_target = np.zeros(texts.num_rows, bool)
    is_target[np.flatnonzero(source == "bbc_news")[:150]] = True
    return texts.filter(pa.array(~is_target)), texts.filter(pa.array(is_target))


@pytest.fixture(scope="module")
def reference(texts, tmp_path_factory):
    """The reference package run as its README shows (one process: weights in input order)."""
    from data_selection import HashedNgramDSIR

    folder = tmp_path_factory.mktemp("dsir_ref")
    raw, target = _split(texts)
    for name, table in (("raw", raw), ("target", target)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for text in table.column("text").to_pylist():
                f.write(json.dumps({"text": text}) + "\n")
    dsir = HashedNgramDSIR([str(folder / "raw.jsonl")], [str(folder / "target.jsonl")],
                           cache_dir=str(folder / "cache"), num_proc=1)  # fmt: skip
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    dsir.compute_importance_weights()
    weights = np.load(folder / "cache" / "log_importance_weights" / "0.npy")
    lengths = np.load(folder / "cache" / "perexample_metadata" / "0.npy")
    dsir.resample(out_dir=str(folder / "topk"), num_to_sample=300, top_k=True)
    chosen = [json.loads(line)["text"] for line in open(folder / "topk" / "0.jsonl")]
    return {"dsir": dsir, "weights": weights, "lengths": lengths, "top_k": chosen,
            "raw": raw, "target": target, "folder": folder}  # fmt: skip


def test_counts_equal_the_reference_per_text(texts):
    """Every text's count vector equals `get_ngram_counts` (n = 1, 2, 3), with the memo warm,
    cold, and dropped between batches; the non-ASCII speeches included."""
    from data_selection.hashed_ngram_dsir import get_ngram_counts

    strings = texts.column("text").to_pylist()
    speeches = texts.column("source").to_numpy(zero_copy_only=False)
    assert {"parl_de", "parl_es"} <= set(speeches)
    every5th = strings[::5]  # 600 texts of every source, speeches included
    assert {"parl_de", "parl_es"} <= set(speeches[::5])
    for n, buckets, memo_limit, some in ((2, N_BUCKETS, 4_000_000, strings),
                                         (2, N_BUCKETS, 500, every5th), (1, 997, 10**6, every5th),
                                         (3, 997, 10**6, every5th)):  # fmt: skip
        featurize = Featurizer(n, buckets, memo_limit=memo_limit)
        for a in range(0, len(some), 250):
            batch = some[a : a + 250]
            ours = featurize(batch).dense(buckets)
            ref = np.stack([get_ngram_counts(s, n=n, num_buckets=buckets) for s in batch])
            assert np.array_equal(ours, ref), (n, buckets, a)
        if memo_limit == 500:
            assert featurize.memo_size() < 500 + 250 * 1000  # dropped between batches


def test_fit_and_weights_equal_the_reference(reference):
    """log_diff to 1e-12 and every log importance weight to 1e-9 (compat: the fit on every raw
    row); the length the filter uses equals the reference's per-example metadata."""
    raw, target = reference["raw"], reference["target"]
    featurize = Featurizer(2, N_BUCKETS)
    pool = featurize(raw.column("text").to_pylist())
    ours = log_diff(pool.counts(N_BUCKETS),
                    featurize(target.column("text").to_pylist()).counts(N_BUCKETS))  # fmt: skip
    np.testing.assert_allclose(ours, reference["dsir"].log_diff, rtol=0, atol=1e-12)
    w = pool.log_weights(ours)
    np.testing.assert_allclose(w, reference["weights"], rtol=1e-12, atol=1e-9)
    assert np.array_equal(pool.lengths(), reference["lengths"].astype(np.int64))
    assert 300 < (pool.lengths() >= 100).sum() < len(w)  # the filter bites, and leaves > budget


def test_gumbel_inclusion_follows_the_weights():
    """Gumbel top-k with noise from (seed, id) samples without replacement proportionally to the
    weights: over the fixed seeds 0..3999, the first pick's frequencies match w / sum(w) and the
    inclusion frequencies of k = 2 match the exact successive-sampling probabilities (chi-square,
    p > 0.001; the seeds are fixed, so the test cannot flake)."""
    logw = np.log(np.array([8.0, 4.0, 2.0, 1.0, 1.0, 0.5]))
    ids = np.array([f"row{i}" for i in range(len(logw))])
    seeds = range(4000)
    first, pair = np.zeros(len(ids)), np.zeros(len(ids))
    for seed in seeds:
        order = np.argsort(-(logw + gumbel(ids, seed)), kind="stable")
        first[order[0]] += 1
        pair[order[:2]] += 1
    w = np.exp(logw) / np.exp(logw).sum()
    assert stats.chisquare(first, w * len(seeds)).pvalue > 1e-3
    # P(i in the first 2) = w_i + sum_{j != i} w_j w_i / (1 - w_j)
    incl = np.array([w[i] + sum(w[j] * w[i] / (1 - w[j]) for j in range(len(w)) if j != i)
                     for i in range(len(w))])  # fmt: skip
    observed = np.stack([pair, len(seeds) - pair])
    expected = np.stack([incl, 1 - incl]) * len(seeds)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, len(w) - 1) > 1e-3
    assert np.array_equal(gumbel(ids, 7), gumbel(ids[::-1], 7)[::-1])  # per id, not per position
    assert not np.array_equal(gumbel(ids, 7), gumbel(ids, 7, target=1))


def test_split_budget_is_the_references():
    assert split_budget(10, np.array([0.5, 0.25, 0.25])) == [5, 2, 3]
    assert split_budget(7, np.array([1 / 3] * 3)) == [2, 2, 3]


# -- the method on the shared local cluster --------------------------------------------------------


def _run(folder, pool_files, targets, budget=300, seed=0, **dsir):
    from raysift.jobs.config import validate
    from raysift.jobs.pipeline import run

    cfg = validate({
        "output_dir": str(folder),
        "seed": seed,
        "candidates": {"path": str(pool_files), "id_column": "id", "keep_columns": ["source"]},
        "targets": {"path": str(targets)},
        "select": {"method": "dsir", "budget": budget, "dsir": dsir},
        "ray": {"num_cpus": 2},
    })  # fmt: skip
    run(cfg, log=lambda _: None)
    manifest = json.loads((folder / "manifest.json").read_text())
    return pq.read_table(folder / "selection.parquet"), manifest


def _inputs(folder, raw: pa.Table, target: pa.Table, parts: int):
    pool = folder / f"pool{parts}"
    pool.mkdir(parents=True, exist_ok=True)
    edges = np.linspace(0, raw.num_rows, parts + 1).astype(int)
    for k in range(parts):  # files in sorted order = input order
        pq.write_table(raw.slice(edges[k], edges[k + 1] - edges[k]), pool / f"p{k}.parquet")
    pq.write_table(target.select(["text"]), folder / "targets.parquet")
    return pool, folder / "targets.parquet"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("ray_cluster")
def test_compat_top_k_selects_the_references_set(reference, tmp_path):
    """compat + top_k through the select stage: the reference's `resample(top_k=True)` set, the
    reference's weights as scores, the length filter's drops counted in the manifest."""
    pool, targets = _inputs(tmp_path, reference["raw"], reference["target"], 1)
    sel, manifest = _run(tmp_path / "run", pool, targets, mode="compat", sampling="top_k")
    raw = reference["raw"]
    text_of = dict(zip(raw.column("id").to_pylist(), raw.column("text").to_pylist(), strict=True))
    ours = [text_of[i] for i in sel.column("id").to_pylist()]
    info = manifest["stages"]["select"]
    assert not info["tie_at_cut"]  # no tie at the cut on these texts: the sets must be equal
    assert sorted(ours) == sorted(reference["top_k"])
    weights = reference["weights"][sel.column("row").to_numpy()]
    np.testing.assert_allclose(sel.column("score").to_numpy(), weights, rtol=1e-12, atol=1e-9)
    assert np.all(np.diff(sel.column("score").to_numpy()) <= 0)  # best first
    dropped = int((reference["lengths"] < 100).sum())
    assert info["dropped_by_length"] == dropped and info["eligible"] == raw.num_rows - dropped
    assert info["fit_rows"] == raw.num_rows and "embed" not in manifest["stages"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("ray_cluster")
def test_gumbel_selection_is_the_same_for_any_partitioning(reference, tmp_path):
    """Default mode, Gumbel, the pool fit on a seeded sample of about 200k hits: the pool in 1 part
    and in 4 parts cut into 300-row chunks fit on the same hits and select the same rows in the
    same order with the same scores; a rerun reuses every cached chunk; stale parts' features are
    deleted."""
    raw, target = reference["raw"], reference["target"]
    one, targets = _inputs(tmp_path, raw, target, 1)
    four, _ = _inputs(tmp_path, raw, target, 4)
    half = 200_000  # a seeded fit sample of about 200k of the eligible rows' hits
    a, ma = _run(tmp_path / "a", one, targets, fit_tokens=half)
    b, mb = _run(tmp_path / "b", four, targets, chunk_rows=300, fit_tokens=half)
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    np.testing.assert_array_equal(a.column("score").to_numpy(), b.column("score").to_numpy())
    assert mb["stages"]["select"]["chunks_computed"] > 4 and mb["stages"]["ingest"]["candidates"][
        "parts"] == 4  # fmt: skip
    again, m2 = _run(tmp_path / "b", four, targets, chunk_rows=300, fit_tokens=half)
    assert again.equals(b) and m2["stages"]["select"]["chunks_computed"] == 0
    from raysift.jobs.config import DSIRConfig
    from raysift.jobs.core.pool import load_pool
    from raysift.jobs.core.storage import Store
    from raysift.jobs.methods.dsir import drop_stale

    cached = tmp_path / "b" / "features" / "candidates" / "n2-b10000"
    (cached / "0123stale").mkdir()  # a part that is no longer in the pool
    drop_stale(load_pool(Store.local(tmp_path / "b"), "candidates"), DSIRConfig())
    assert sorted(p.name for p in cached.iterdir()) == sorted(
        p.digest for p in load_pool(Store.local(tmp_path / "b"), "candidates").parts
    )
    ia, ib = ma["stages"]["select"], mb["stages"]["select"]
    assert ia["fit_grams"] == ib["fit_grams"] and abs(ia["fit_grams"] / half - 1) < 0.1
    assert ia["fit_rows"] is None and ia["eligible"] < raw.num_rows


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("ray_cluster")
def test_separate_targets_select_the_references_sets(texts, tmp_path):
    """Two target sets (news and code), each fit alone with its share of the budget (by n-gram
    hits, as the reference): compat + top_k selects the reference's set."""
    from data_selection import HashedNgramDSIR

    source = texts.column("source").to_numpy(zero_copy_only=False)
    news = np.flatnonzero(source == "bbc_news")[:80]
    code = np.flatnonzero(source == "python_code")[:80]
    is_target = np.zeros(texts.num_rows, bool)
    is_target[np.concatenate([news, code])] = True
    raw = texts.filter(pa.array(~is_target))
    target = texts.take(np.concatenate([news, code]))
    target = target.append_column("set", pa.array(["news"] * 80 + ["code"] * 80))
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    paths = []
    for name, table in (("raw", raw), ("news", target.slice(0, 80)), ("code", target.slice(80))):
        paths.append(ref_dir / f"{name}.jsonl")
        with open(paths[-1], "w") as f:
            for text in table.column("text").to_pylist():
                f.write(json.dumps({"text": text}) + "\n")
    # the reference's target sets are in its list order; ours sorted by value: code, news
    dsir = HashedNgramDSIR([str(paths[0])], [str(paths[2]), str(paths[1])],
                           cache_dir=str(ref_dir / "cache"), num_proc=1,
                           separate_targets=True)  # fmt: skip
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    dsir.compute_importance_weights()
    dsir.resample(out_dir=str(ref_dir / "topk"), num_to_sample=200, top_k=True)
    expected = [json.loads(line)["text"] for line in open(ref_dir / "topk" / "0.jsonl")]

    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(raw, pool / "p0.parquet")
    pq.write_table(target.select(["text", "set"]), tmp_path / "targets.parquet")
    from raysift.jobs.config import validate
    from raysift.jobs.pipeline import run

    def select(folder, pool_files, **dsir_options):
        cfg = validate({
            "output_dir": str(tmp_path / folder),
            "candidates": {"path": str(pool_files), "id_column": "id"},
            "targets": {"path": str(tmp_path / "targets.parquet"), "keep_columns": ["set"]},
            "select": {"method": "dsir", "budget": 200, "dsir": dsir_options},
            "ray": {"num_cpus": 2},
        })  # fmt: skip
        run(cfg, log=lambda _: None)
        manifest = json.loads((tmp_path / folder / "manifest.json").read_text())
        return pq.read_table(tmp_path / folder / "selection.parquet"), manifest["stages"]["select"]

    sel, info = select("sep", pool, mode="compat", sampling="top_k", target_column="set")
    share = dict(zip(["code", "news"], split_budget(200, dsir.target_proportions), strict=True))
    assert info["budget_per_target"] == share
    text_of = dict(zip(raw.column("id").to_pylist(), raw.column("text").to_pylist(), strict=True))
    assert sorted(text_of[i] for i in sel.column("id").to_pylist()) == sorted(expected)
