"""GOT-D's sharded Sinkhorn at scale: 1M x 384 candidates vs 1000 targets on Ray shard actors.

For 1, 4 and 8 shards (2 CPUs in all, shared equally): wall time of starting the shards and of the
solve (reference settings: eps 0.1, momentum 1.3, threshold 0.1), iterations, peak RSS of the
driver and of each shard actor, whether each shard cached its cost block (1 GiB budget per shard)
or recomputed it each pass, and the bytes each iteration moves between coordinator and shards:
S (m + 1) float32 up (row partials and error shares), m float32 down to each shard (f), plus f in
the column pass. The selection (top 1%) is compared across shard counts.

    python benchmarks/gotd_scale.py --data DIR [--shards 1 4 8]
    (DIR: candidates.npy and query_examples.npy, e.g. from tsds_synth.py 1000000 1000 384 DIR)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from harness import actor_peak_rss_gb, peak_rss_gb, stored_pool

from raysift.actors.fanout import stop
from raysift.actors.ot_shard import ot_fanout, start_ot_shards
from raysift.engine.gotd import merge_smallest
from raysift.engine.sinkhorn import coordinate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--threshold", type=float, default=0.1)
    ap.add_argument("--cache-mb", type=int, default=1024)
    args = ap.parse_args()
    Q = np.load(args.data / "query_examples.npy")
    m = len(Q)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tops = {}
    with tempfile.TemporaryDirectory() as tmp:  # the pool as ingested parts: shards read them
        pool, targets = stored_pool(Path(tmp), np.load(args.data / "candidates.npy"), Q)
        top = pool.n // 100
        for shards in args.shards:
            t0 = time.time()
            actors = start_ot_shards(pool, targets, shards, epsilon=0.1,
                                     cpus_per_shard=2 / shards,
                                     cache_bytes=args.cache_mb << 20)  # fmt: skip
            start = time.time() - t0
            cached = ray.get(
                [a.__ray_call__.remote(lambda self: self.cost is not None) for a in actors]
            )
            fanout = ot_fanout(actors)
            t0 = time.time()
            f, n_iter, errors, _ = coordinate(fanout, m, epsilon=0.1, threshold=args.threshold)
            _, rows = merge_smallest(fanout("smallest", top), top)
            solve = time.time() - t0
            shard_rss = [actor_peak_rss_gb(a) for a in actors]
            stop(actors)
            tops[shards] = rows
            up = shards * (m + 1) * 4
            down = shards * 2 * m * 4  # f to every shard for the row pass and the column pass
            overlap = len(np.intersect1d(rows, tops[args.shards[0]])) / top
            print(
                f"shards {shards}: start {start:.1f} s, solve {solve:.1f} s ({n_iter} "
                f"iterations, final error {errors[-1]:.3g}), driver peak RSS "
                f"{peak_rss_gb():.2f} GB, shard peak RSS "
                f"{', '.join(f'{r:.2f}' for r in shard_rss)} GB, cost cached {cached}, bytes per "
                f"iteration {up} up + {down} down, top-1% overlap with {args.shards[0]} "
                f"shard(s) {overlap:.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
