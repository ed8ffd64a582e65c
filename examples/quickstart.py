"""raysift in five minutes: select from a DataFrame, read a run folder, compare two methods.

    python examples/quickstart.py [WORKDIR]

Uses the demo shipped inside the package (real texts from six sources; the target is 200 Debian
"science" package descriptions). Everything runs on this machine: the first two selections in
this process (no Ray), the third through the pipeline on a local Ray cluster into a run folder.
"""

from __future__ import annotations

import json
import sys
from importlib.resources import files
from pathlib import Path

import pandas as pd

import raysift

work = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
demo = files("raysift.demo")

# 1. Select from a DataFrame: the pool and the target texts as a notebook holds them.
pool = pd.read_parquet(str(demo.joinpath("pool.parquet"))).head(500)
lines = demo.joinpath("targets.jsonl").read_text().splitlines()
targets = [json.loads(line)["text"] for line in lines[:100]]
print(f"pool: {len(pool)} rows from {pool['source'].nunique()} sources; targets: {len(targets)}")

BUDGET = 50
knn = raysift.select(pool, targets, method="knn", budget=BUDGET, keep_columns=["source"])
print("\nknn, top 5:")
print(knn.to_pandas()[["id", "rank", "score", "source"]].head(5).to_string(index=False))

# 2. Compare two methods: TSDS balances closeness to the targets with diversity.
tsds = raysift.select(pool, targets, method="tsds", budget=BUDGET, keep_columns=["source"],
                      alpha=0.5)
overlap = len(set(knn.ids) & set(tsds.ids))
print(f"\nknn and tsds share {overlap} of {BUDGET} rows; TSDS's p covers {tsds.p.num_rows} rows")
shares = pd.DataFrame({
    "knn": knn.to_pandas()["source"].value_counts(normalize=True),
    "tsds": tsds.to_pandas()["source"].value_counts(normalize=True),
}).fillna(0.0).round(2)
print("share of each source in the selection:")
print(shares.to_string())

# 3. The same selection as a run on Ray, then read its run folder back.
run_dir = work / "knn"
raysift.select(pool, targets, method="knn", budget=BUDGET, keep_columns=["source"], ray=True,
               output_dir=run_dir)
run = raysift.open_run(run_dir)
stages = run.manifest["stages"]
print(f"\nrun folder {run_dir}: stages {', '.join(stages)}; selection of {run.selection.num_rows}")
same = run.selection.column("id").to_pylist() == knn.ids
print(f"same rows, in the same order, as in-process: {same}")
print(f"first selected text: {run.selected()[0]['text'][:100]!r}")
