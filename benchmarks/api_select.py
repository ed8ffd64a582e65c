"""`raysift.select` in-process vs on Ray, on the same real texts and settings: wall seconds per
call and whether the selections agree.

    python benchmarks/api_select.py [--rows 1000 3000] [--out runs/bench/api]

The in-process path runs the engine on arrays in this process (the encoder loads once and the
last vectors per side are kept: a second method on the same pool embeds nothing); the Ray path
writes the inputs to a run folder and runs ingest -> embed -> select on a local cluster (the
first call starts it; later calls on the same rows reuse the ingest and the embeddings).
What it holds: in-process, the pool's texts and N x 384 float32 vectors in this process (the
reason for the 100,000-row ceiling: ~150 MB of vectors); on Ray from a path or a Ray Dataset,
the driver holds the B selected rows (and TSDS's support when `.p` is read).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
from harness import ROOT

import raysift

METHODS = (("knn", {}), ("tsds", {}), ("gotd", {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 3000])
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "api")
    args = ap.parse_args()
    demo = ROOT / "demo"
    lines = (demo / "targets.jsonl").read_text().splitlines()
    targets = [json.loads(line)["text"] for line in lines]
    results = []
    for n in args.rows:
        pool = pq.read_table(demo / "pool.parquet").slice(0, n).to_pandas()
        common = dict(budget=args.budget, seed=0, keep_columns=["source"],
                      config={"embed": {"precision": "fp32"}})  # fmt: skip
        for method, options in METHODS:
            t0 = time.perf_counter()
            local = raysift.select(pool, targets, method=method, **common, **options)
            t_local = time.perf_counter() - t0
            t0 = time.perf_counter()
            remote = raysift.select(pool, targets, method=method, ray=True,
                                    output_dir=args.out / f"n{n}", **common, **options)  # fmt: skip
            t_ray = time.perf_counter() - t0
            row = {"rows": n, "targets": len(targets), "method": method,
                   "in_process_s": round(t_local, 2), "ray_s": round(t_ray, 2),
                   "ratio": round(t_ray / t_local, 2),
                   "same_ids": remote.ids == local.ids}  # fmt: skip
            results.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
