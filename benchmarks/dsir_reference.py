"""raysift's DSIR vs the reference package (PyPI data-selection 1.0.3) on the same real texts.

N texts from ../shared/data/pool.parquet (a seeded sample of every source), target: 200
python_code texts not in the sample. Both run with the reference's defaults (2-grams, 10,000
buckets, min_example_length 100, Gumbel resampling of 500 rows) on this machine's cores:

* reference: `HashedNgramDSIR(num_proc=cores)`, `fit_importance_estimator()` ('auto' = 10^9 hits:
  all of them here), `compute_importance_weights()`, `resample(500)`, in a child process;
* raysift: `raysift ingest`, then `raysift select` with `select.method: dsir`, `mode: compat` (a
  local Ray cluster of the same cores), each a child process; then `select` again with another
  seed, the features cached (what every further target or seed costs).

At two pool sizes (default 100k and 500k) the slope gives the CPU per text beyond the fixed
start-up costs (Ray's processes and workers, the reference's joblib pool).

CPU is the user + system time of the whole process tree (the reference's joblib workers; Ray's
workers, raylet and GCS), sampled every 0.2 s per process and summed; memory is the peak of the
tree's summed RSS. Weights: the reference's are compared with raysift's engine on every text
(the code the actors run) and with the scores of the rows raysift selected.

    python benchmarks/dsir_reference.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from harness import ROOT, SHARED, Poller

OUT = ROOT / "runs" / "bench" / "dsir"
REFERENCE = """
import sys, numpy as np
from data_selection import HashedNgramDSIR
folder, cores = sys.argv[1], int(sys.argv[2])
dsir = HashedNgramDSIR([folder + "/raw.jsonl"], [folder + "/target.jsonl"],
                       cache_dir=folder + "/ref_cache", num_proc=cores)
dsir.fit_importance_estimator()
dsir.compute_importance_weights()
dsir.resample(out_dir=folder + "/ref_out", num_to_sample=500)
np.save(folder + "/ref_log_diff.npy", dsir.log_diff)
"""


class Tree(Poller):
    """CPU seconds and peak summed RSS of a process and all its descendants."""

    def __init__(self, pid: int) -> None:
        import psutil

        super().__init__(0.2)
        self.root = psutil.Process(pid)
        self.cpu: dict[int, float] = {}
        self.peak_rss = 0

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = 0
        for p in procs:
            try:
                t = p.cpu_times()
                self.cpu[p.pid] = max(self.cpu.get(p.pid, 0.0), t.user + t.system)
                rss += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        self.peak_rss = max(self.peak_rss, rss)


def measure(cmd: list[str], cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with Tree(proc.pid) as tree:
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(err.decode()[-3000:])
    return {"wall_s": wall, "cpu_s": sum(tree.cpu.values()), "peak_rss_gb": tree.peak_rss / 1e9}


def build(n: int) -> tuple[pa.Table, pa.Table]:
    table = pq.read_table(SHARED / "data" / "pool.parquet", columns=["id", "source", "text"])
    rng = np.random.default_rng(0)
    source = table.column("source").to_numpy(zero_copy_only=False)
    code = np.flatnonzero(source == "python_code")
    target_rows = rng.choice(code, 200, replace=False)
    rest = np.setdiff1d(np.arange(table.num_rows), target_rows)
    rows = np.sort(rng.choice(rest, min(n, len(rest)), replace=False))
    return table.take(rows), table.take(target_rows)


def one_size(n: int, cores: int) -> tuple[dict, dict]:
    """Every measured run at one pool size; (results, checks)."""
    folder = OUT / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    raw, target = build(n)
    for name, table in (("raw", raw), ("target", target)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for text in table.column("text").to_pylist():
                f.write(json.dumps({"text": text}) + "\n")
    pq.write_table(raw, folder / "raw.parquet")
    pq.write_table(target.select(["text"]), folder / "target.parquet")
    for old in ("ref_cache", "ref_out", "run"):
        subprocess.run(["rm", "-rf", str(folder / old)], check=True)
    results = {"reference": measure([sys.executable, "-c", REFERENCE, str(folder), str(cores)],
                                    folder)}  # fmt: skip

    def config(seed: int) -> Path:
        path = folder / f"dsir_seed{seed}.yaml"
        path.write_text(yaml.safe_dump({
            "output_dir": "run", "seed": seed,
            "candidates": {"path": "raw.parquet", "id_column": "id", "keep_columns": ["source"]},
            "targets": {"path": "target.parquet"},
            "select": {"method": "dsir", "budget": 500, "dsir": {"mode": "compat"}},
            "ray": {"num_cpus": cores},
        }))  # fmt: skip
        return path

    cli = [sys.executable, "-m", "raysift"]
    results["raysift ingest"] = measure([*cli, "ingest", str(config(0))], folder)
    results["raysift select"] = measure([*cli, "select", str(config(0))], folder)
    results["raysift select, features cached (seed 1)"] = measure(
        [*cli, "select", str(config(1))], folder
    )
    checks = {}
    sel = pq.read_table(folder / "run" / "selection.parquet")
    shards = [np.load(folder / "ref_cache" / "log_importance_weights" / f"{k}.npy")
              for k in range(cores)]  # fmt: skip
    ref_w = np.empty(raw.num_rows)
    for k, w in enumerate(shards):  # the reference's virtual shard k holds rows k, k + cores, ...
        ref_w[k::cores] = w
    checks["selected_scores_max_abs_diff"] = float(
        np.abs(sel.column("score").to_numpy() - ref_w[sel.column("row").to_numpy()]).max()
    )
    if n <= 200_000:  # every weight, by the engine the actors run (one process)
        from raysift.engine.dsir import Featurizer, log_diff

        featurize = Featurizer()
        t0 = time.process_time()
        pool = featurize(raw.column("text").to_pylist())
        results["engine alone (one process, no Ray)"] = {
            "wall_s": float("nan"), "cpu_s": time.process_time() - t0, "peak_rss_gb": float("nan")
        }  # fmt: skip
        ld = log_diff(pool.counts(10000),
                      featurize(target.column("text").to_pylist()).counts(10000))  # fmt: skip
        checks["log_diff_max_abs_diff"] = float(
            np.abs(ld - np.load(folder / "ref_log_diff.npy")).max()
        )
        checks["weights_max_abs_diff"] = float(np.abs(pool.log_weights(ld) - ref_w).max())
        checks["max_abs_weight"] = float(np.abs(ref_w).max())
        checks["eligible"] = int((pool.lengths() >= 100).sum())
    (folder / "results.json").write_text(json.dumps({"n": n, **results, **checks}, indent=1))
    return results, checks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 500_000])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    by_size = {n: one_size(n, args.cores) for n in args.n}
    print(f"## DSIR vs data-selection 1.0.3, {args.cores} cores")
    print("| texts | run | wall s | CPU s | CPU us/text | peak RSS (tree) GB | ref. CPU / this |")
    print("|---|---|---|---|---|---|---|")
    for n, (results, checks) in by_size.items():
        ref_cpu = results["reference"]["cpu_s"]
        for name, r in results.items():
            print(f"| {n:,} | {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                  f"{1e6 * r['cpu_s'] / n:.0f} | {r['peak_rss_gb']:.2f} | "
                  f"{ref_cpu / r['cpu_s']:.2f} |")  # fmt: skip
        print(f"| {n:,} | checks | {json.dumps(checks)} |||||")
    if len(by_size) > 1:  # per text beyond the fixed start-up costs: the slope between two sizes
        (n1, (r1, _)), (n2, (r2, _)) = list(by_size.items())[0], list(by_size.items())[-1]
        slope = {k: 1e6 * (r2[k]["cpu_s"] - r1[k]["cpu_s"]) / (n2 - n1) for k in r2 if k in r1}
        ref = slope["reference"]
        for k, v in slope.items():
            print(
                f"marginal CPU per text, {k}: {v:.0f} us ({ref / v:.2f}x less than the reference)"
            )


if __name__ == "__main__":
    main()
