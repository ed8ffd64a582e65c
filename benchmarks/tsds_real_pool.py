"""TSDS and GOT-D vs knn vs random on the real pool (../shared/data/pool.parquet), equal budgets.

Targets (the pool README's development targets): `label_shift` = debian_pkg sections {science,
math, electronics, hamradio}, and `python_code`. For each, 200 query texts come from target groups
that are removed from the pool (no leak); the pool is a stratified sample of every source (up to
`--per-source` rows each) from the remaining rows. One MiniLM embedding of everything (bf16 on
this CPU), then each method selects `--budget` rows:

* random: seeded hash ranking;  knn: max cosine to any query;
* tsds exact (C 5, sigma .75, max_K 5000; alpha .5 (the reference default), .9, .98, and
  KNN-Uniform = sigma 0; sampling without replacement where the support allows, else multinomial;
  seed 0) - in-process index shard (the same engine code the shard actors run);
* gotd: Sinkhorn (eps 0.1, momentum 1.3) at the reference threshold 0.1 and converged (1e-4),
  the budget most negative candidate potentials.

Reported: share of the selection from the target (same source and, for label_shift, one of the
target's labels), and the total-variation distance between the selection's (source, label)
histogram and the query set's.

    python benchmarks/tsds_real_pool.py [--per-source 1500] [--budget 600] [--cache DIR]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from raysift.engine.baselines import knn_select, random_select
from raysift.engine.embed import encode, load_encoder
from raysift.engine.fanout import local_fanout
from raysift.engine.gotd import select as gotd_select
from raysift.engine.knn import IndexParams, IndexShard
from raysift.engine.sampling import sample
from raysift.engine.sinkhorn import solve as sinkhorn_solve
from raysift.engine.tsds_search import TSDSParams, select_exact

POOL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pool.parquet"
TARGETS = {
    "label_shift": ("debian_pkg", {"science", "math", "electronics", "hamradio"}),
    "python_code": ("python_code", None),
}


def in_target(df, name):
    source, labels = TARGETS[name]
    mask = df["source"] == source
    return mask & df["label"].isin(labels) if labels else mask


def tv(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-source", type=int, default=1500)
    ap.add_argument("--budget", type=int, default=600)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--cache", type=Path, help="folder to keep the embeddings in between runs")
    args = ap.parse_args()
    df = pq.read_table(POOL).to_pandas()
    rng = np.random.default_rng(0)
    queries, removed = {}, np.zeros(len(df), bool)
    for name in TARGETS:
        rows = df[in_target(df, name)]
        groups = rng.permutation(np.asarray(rows["group"].unique(), dtype=object))
        held = rows[rows["group"].isin(groups[: max(1, len(groups) // 4)])]
        queries[name] = held.sample(n=min(args.queries, len(held)), random_state=0)
        removed |= df["group"].isin(held["group"]) & (df["source"] == TARGETS[name][0])
    rest = df[~removed]
    per_source = [
        g.sample(n=min(args.per_source, len(g)), random_state=0) for _, g in rest.groupby("source")
    ]
    pool = pd.concat(per_source).reset_index(drop=True)
    print(f"pool sample {len(pool)} rows from {pool['source'].nunique()} sources", flush=True)
    cache = args.cache / f"real_pool_{args.per_source}_{args.queries}.npz" if args.cache else None
    if cache and cache.is_file():
        saved = np.load(cache)
        X, Qs = saved["pool"], {name: saved[name] for name in queries}
    else:
        t0 = time.time()
        encoder = load_encoder(max_length=128, batch_size=64)
        X = encode(encoder, pool["text"].tolist())
        Qs = {name: encode(encoder, q["text"].tolist()) for name, q in queries.items()}
        print(f"embedded in {time.time() - t0:.0f} s ({encoder.precision})", flush=True)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, pool=X, **Qs)
    ids = pool["id"].to_numpy(str)
    shard = IndexShard(X, 0, IndexParams())
    print("| target | method | share from target | TV (source, label) | unique rows |")
    print("|---|---|---|---|---|")
    for name, q in queries.items():
        Q = Qs[name]
        want = Counter(zip(q["source"], q["label"], strict=True))
        methods = {
            "random": random_select(ids, args.budget, 0).indices,
            "knn (max cosine)": knn_select(X, Q, ids, args.budget).indices,
        }
        variants = {
            "tsds exact, defaults (alpha .5)": TSDSParams(),
            "tsds exact, KNN-Uniform (sigma 0)": TSDSParams(sigma=0.0),
            "tsds exact, alpha .9": TSDSParams(alpha=0.9),
            "tsds exact, alpha .98": TSDSParams(alpha=0.98),
        }
        for label, params in variants.items():
            sol, info = select_exact(local_fanout([shard]), Q, len(X), params)
            support = len(sol.rows)  # p is kept on its support only
            how = "without_replacement" if support >= args.budget else "multinomial"
            methods[f"{label} ({how}, support {support})"] = sol.rows[
                sample(sol.p, ids[sol.rows], args.budget, how, 0).indices
            ]
        for threshold in (0.1, 1e-4):
            ot = sinkhorn_solve(X, Q, threshold=threshold)
            ranked = np.lexsort((np.arange(len(ot.g)), ot.g))
            label = f"gotd (threshold {threshold:g}, {ot.n_iter} iterations)"
            methods[label] = gotd_select(ot.g[ranked], ranked, args.budget, len(X)).indices
        share_pool = in_target(pool, name).mean()
        for method, chosen in methods.items():
            picked = pool.iloc[chosen]
            got = Counter(zip(picked["source"], picked["label"], strict=True))
            share = in_target(picked, name).mean()
            print(
                f"| {name} (pool share {share_pool:.3f}) | {method} | {share:.3f} | "
                f"{tv(got, want):.3f} | {len(chosen)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
