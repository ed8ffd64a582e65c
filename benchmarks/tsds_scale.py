"""TSDS exact mode at scale on Ray index-shard actors: 1M x 384 synthetic candidates, 1000 queries.

For 1, 2 and 4 shards (IVF, `nlist` and `nprobe` split across shards so the scanned share of the
pool stays the same): wall time of index build and of select (kNN fan-out + merge + lazy density
+ solve), peak RSS of the driver and of each shard actor, and recall against exact search:
kNN recall@L for a sample of queries, and density recall (share of the within-sigma pairs found)
for a sample of the candidates whose density was needed. The exact answers come from a Flat index
over the same 1M rows.

    python benchmarks/tsds_scale.py --data DIR [--n 1000000] [--queries 1000] [--shards 1 2 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import ray
from harness import actor_peak_rss_gb, ensure_synth, peak_rss_gb, stored_pool

from raysift.actors.fanout import ResilientFanout, stop
from raysift.actors.index_shard import start_shards
from raysift.engine.knn import IndexParams, IndexShard, merge_topk
from raysift.engine.tsds_search import TSDSParams, gather_vectors, select_exact


def exact_truth(data: Path, args) -> None:
    """Exact answers for the recall samples, in a child process (its memory is not the driver's):
    Flat kNN@max_K for `recall_queries` queries, and the within-sigma pair count for
    `recall_points` candidates drawn from those queries' first 200 neighbours."""
    X = np.load(data / "candidates.npy")
    Q = np.load(data / "query_examples.npy")
    rng = np.random.default_rng(0)
    qi = rng.choice(len(Q), args.recall_queries, replace=False)
    flat = IndexShard(X, 0, IndexParams(kind="flat"))
    _, knn = flat.search(Q[qi], TSDSParams().max_K, True)
    points = rng.choice(np.unique(knn[:, :200]), args.recall_points, replace=False)
    counts = np.bincount(flat.within(X[points], TSDSParams().sigma ** 2)[0], minlength=len(points))
    np.savez(data / "exact_truth.npz", queries=qi, knn=knn, points=points, counts=counts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--nlist", type=int, default=1024, help="lists over the whole pool")
    ap.add_argument("--nprobe", type=int, default=32, help="lists probed over the whole pool")
    ap.add_argument("--density-nprobe", type=int, default=None, help="the same for density")
    ap.add_argument("--brute-force-knn", action="store_true", help="exact kNN scan, IVF density")
    ap.add_argument("--recall-queries", type=int, default=50)
    ap.add_argument("--recall-points", type=int, default=300)
    ap.add_argument("--truth-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = args.data.resolve()
    ensure_synth(data, args.n, args.queries)
    if args.truth_only:
        return exact_truth(data, args)
    if not (data / "exact_truth.npz").is_file():
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--truth-only"], check=True)
    truth = np.load(data / "exact_truth.npz")
    Q = np.load(data / "query_examples.npy")
    params = TSDSParams()  # exact mode, alpha .5, C 5, sigma .75, max_K 5000, no kde_K cap
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"{len(Q)} queries, exact mode, {params}", flush=True)
    pool, _ = stored_pool(data / "pool", np.load(data / "candidates.npy"), Q)  # the shards' rows
    for shards in args.shards:
        index = IndexParams(
            kind="ivf",
            nlist=max(1, args.nlist // shards),
            nprobe=max(1, args.nprobe // shards),
            density_nprobe=max(1, args.density_nprobe // shards) if args.density_nprobe else None,
            brute_force_knn=args.brute_force_knn,
            train_points_per_list=64,
            niter=10,
        )
        n = pool.n
        t0 = time.time()
        actors = start_shards(pool, shards, index, use_gpu=False, cpus_per_shard=2 / shards)
        build = time.time() - t0
        fan = ResilientFanout(actors)
        t0 = time.time()
        sol, info = select_exact(fan, Q, n, params)
        select = time.time() - t0
        L = params.max_K
        _, got = merge_topk(fan("search", Q[truth["queries"]], L, True), L)
        hits = [len(np.intersect1d(a, b)) for a, b in zip(got, truth["knn"], strict=True)]
        points = truth["points"]
        vectors = gather_vectors(fan, points, Q.shape[1])
        found = sum(len(h[0]) for h in fan("within", vectors, params.sigma**2))
        actor_rss = [actor_peak_rss_gb(a) for a in actors]
        stop(actors)
        driver = peak_rss_gb()
        print(
            f"shards {shards} (ivf nlist {index.nlist}, nprobe {index.nprobe}, density nprobe "
            f"{index.density_nprobe or index.nprobe} per shard, brute-force kNN "
            f"{index.brute_force_knn}): "
            f"build {build:.1f} s, select {select:.1f} s, driver peak RSS {driver:.2f} GB, "
            f"shard peak RSS {', '.join(f'{r:.2f}' for r in actor_rss)} GB, "
            f"kNN recall@{L} {np.mean(hits) / L:.4f}, density recall "
            f"{found / truth['counts'].sum():.4f}, {info}",
            flush=True,
        )


if __name__ == "__main__":
    main()
