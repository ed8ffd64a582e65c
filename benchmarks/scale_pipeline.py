"""What the driver holds as the pool grows: `raysift` stages on a multi-raylet local cluster.

The cluster: a head raylet with 0 CPUs (where the driver runs: nothing else is scheduled there)
and `--workers` worker raylets of 1 CPU, each with its own `object_store_memory`. The pool:
seeded synthetic rows (a short text, a source, a 384-d vector of a clustered distribution, like
../shared/tools/tsds_synth.py) in input files of 250k rows, and 256 targets, vectors given
(`vector_column`), so the embed stage commits them instead of running a model.

Each stage runs as its own `raysift` process (ingest, embed, then select once per method), so
every number is one stage's:

* driver peak RSS: the `raysift` process's max RSS (/usr/bin/time);
* worker peak RSS: every `ray::` process on the worker raylets, sampled every 0.2 s, the
  largest per process title (an actor class, or a task's function);
* bytes the driver received: the bytes of every value the driver's `ray.get` returned (measured
  as what pickle protocol 5 would ship: the frame plus its out-of-band buffers), plus the bytes
  the driver read from files (/proc/<pid>/io read_chars, which includes Python's own imports:
  `--baseline` measures that for `raysift --help`); what it sent is the same for `ray.put`.

`--old` runs the code before the scale-out (a git worktree at e4a3832) on the same pool at the
smaller size: the harness writes its `data/candidates.parquet` and `embeddings/*/part-*.parquet`
from the new run folder (that code cannot take vectors), then times its ingest and select.

    python benchmarks/scale_pipeline.py --sizes 1000000 4000000 --tsds-sizes 500000 2000000 --old
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from harness import Poller

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OLD_COMMIT = "e4a3832"
DIM, TARGETS, FILE_ROWS = 384, 256, 250_000
METHODS = {
    "random": {"method": "random"},
    "knn": {"method": "knn"},
    "gotd": {"method": "gotd", "gotd": {"shards": 2, "cpus_per_shard": 1, "cache_mb": 2600}},
    "tsds": {
        "method": "tsds",
        "tsds": {
            "mode": "exact", "shards": 2, "cpus_per_shard": 1, "sampling": "multinomial",
            # the exact kNN scan; density through an IVF index (recall 1.000 at 1M, BENCHMARKS.md)
            "index": {"kind": "ivf", "brute_force_knn": True, "density_nprobe": 8},
        },
    },
}  # fmt: skip

# The driver process: ray.get / ray.put counted, then the CLI as the `raysift` script runs it.
PROBE = r"""
import json, os, sys
sys.path.insert(0, os.environ["HARNESS"])
from harness import DriverBytes
from raysift.jobs.cli import main
with DriverBytes() as counted:
    code = main(sys.argv[1:])
with open(f"/proc/{os.getpid()}/io") as fh:
    io = dict(line.split(": ") for line in fh.read().splitlines())
with open(os.environ["PROBE_OUT"], "w") as fh:
    json.dump({"get_bytes": counted.bytes, "gets": counted.gets, "put_bytes": counted.sent,
               "puts": counted.puts, "read_chars": int(io["rchar"])}, fh)
sys.exit(code)
"""


def clustered(rng, n: int, centers: np.ndarray, spread: np.ndarray) -> tuple:
    lab = rng.integers(0, len(centers), n)
    x = centers[lab] + spread[lab, None] * rng.standard_normal((n, DIM), np.float32) / DIM**0.5
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), lab


def write_pool(folder: Path, n: int) -> Path:
    """Input files of the pool (text, source, vector) and the targets, written once per size."""
    if (folder / "done").is_file():
        return folder
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    spread = rng.uniform(0.5, 1.2, 200).astype(np.float32)
    (folder / "pool").mkdir(parents=True, exist_ok=True)
    for k, a in enumerate(range(0, n, FILE_ROWS)):
        m = min(FILE_ROWS, n - a)
        x, lab = clustered(rng, m, centers, spread)
        table = pa.table({
            "text": [f"row {a + i}: a text of cluster {c}" for i, c in enumerate(lab)],
            "source": [f"src{c % 14}" for c in lab],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM),
        })  # fmt: skip
        pq.write_table(table, folder / "pool" / f"part-{k:04d}.parquet", row_group_size=65536)
    task = np.random.default_rng(1).choice(200, 4, replace=False)
    q, lab = clustered(np.random.default_rng(2), TARGETS, centers[task], spread[task])
    pq.write_table(pa.table({"text": [f"target {i}" for i in range(TARGETS)],
                             "vector": pa.FixedSizeListArray.from_arrays(
                                 pa.array(q.reshape(-1)), DIM)}),
                   folder / "targets.parquet")  # fmt: skip
    (folder / "done").write_text("")
    return folder


class Cluster:
    """`ray start` head (0 CPUs) + worker raylets, on their own ports and temp dir."""

    def __init__(self, base: Path, workers: int, store_gb: float, head_store_gb: float,
                 pythonpath: Path | None = None):  # fmt: skip
        # the workers import what the raylets' environment points at: the old code's cluster
        # gets its worktree on PYTHONPATH (else the editable install's new modules would load)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token"}
        if pythonpath is not None:
            self.env["PYTHONPATH"] = str(pythonpath)
        ray = str(Path(sys.executable).parent / "ray")
        if not (Path.home() / ".ray" / "auth_token").is_file():  # token auth, as on a cluster
            subprocess.run([ray, "get-auth-token", "--generate"], env=self.env, check=True,
                           capture_output=True)  # fmt: skip
        self.port = 6390
        self.address = f"127.0.0.1:{self.port}"
        temp = base.resolve() / "ray-tmp"  # ray start wants an absolute path
        temp.mkdir(parents=True, exist_ok=True)
        common = ["--disable-usage-stats", f"--temp-dir={temp}"]
        subprocess.run([ray, "start", "--head", f"--port={self.port}", "--num-cpus=0",
                        f"--object-store-memory={int(head_store_gb * 1e9)}",
                        "--include-dashboard=false", *common],
                       check=True, env=self.env, capture_output=True)  # fmt: skip
        for _ in range(workers):
            subprocess.run([ray, "start", f"--address={self.address}", "--num-cpus=1",
                            f"--object-store-memory={int(store_gb * 1e9)}"],
                           check=True, env=self.env, capture_output=True)  # fmt: skip

    def stop(self) -> None:
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray, "stop", "--force"], env=self.env, capture_output=True)


class Sampler(Poller):
    """Peak RSS of every `ray::` process (titles: actor classes and task functions), and every
    10th sample its USS: RSS also counts the object store's shared pages a worker has written
    (its task's results), which stay mapped while the objects live; USS is its private memory."""

    def __init__(self) -> None:
        super().__init__(0.2)
        self.peaks: dict[str, int] = {}
        self.uss: dict[str, int] = {}
        self._n = 0

    def sample(self) -> None:
        import psutil

        self._n += 1
        for proc in psutil.process_iter(["cmdline", "memory_info"]):
            try:
                title = (proc.info["cmdline"] or [""])[0]
                if title.startswith("ray::") and proc.info["memory_info"]:
                    name = title.split()[0]
                    rss = proc.info["memory_info"].rss
                    self.peaks[name] = max(self.peaks.get(name, 0), rss)
                    if self._n % 10 == 1:
                        uss = proc.memory_full_info().uss
                        self.uss[name] = max(self.uss.get(name, 0), uss)
            except (psutil.Error, IndexError):
                continue


def driver(
    args: list[str], cwd: Path, out: Path, cluster: Cluster, pythonpath: Path = ROOT
) -> dict:
    """Run one stage as a `raysift` process; its wall time, peak RSS and accounting."""
    probe = out.with_suffix(".probe.json")
    env = {**cluster.env, "PROBE_OUT": str(probe), "PYTHONPATH": str(pythonpath),
           "HARNESS": str(ROOT / "benchmarks")}  # fmt: skip
    t0 = time.perf_counter()
    with Sampler() as sampler:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", PROBE, *args],
                              cwd=cwd, env=env, capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{args}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    accounting = json.loads(probe.read_text())
    return {
        "wall_s": round(wall, 1),
        "driver_peak_rss_mb": round(int(proc.stderr.strip().splitlines()[-1]) / 1024, 1),
        "driver_received_mb": round(accounting["get_bytes"] / 1e6, 3),
        "driver_sent_mb": round(accounting["put_bytes"] / 1e6, 3),
        "driver_file_reads_mb": round(accounting["read_chars"] / 1e6, 1),
        "worker_peak_rss_mb": {k: round(v / 1e6) for k, v in sorted(sampler.peaks.items())},
        "worker_peak_uss_mb": {k: round(v / 1e6) for k, v in sorted(sampler.uss.items())},
    }


def config(path: Path, pool: Path, run: Path, address: str, select: dict | None = None) -> Path:
    import yaml

    cfg = {
        "output_dir": str(run),
        "candidates": {"path": str(pool / "pool"), "vector_column": "vector",
                       "keep_columns": ["source"]},
        "targets": {"path": str(pool / "targets.parquet"), "vector_column": "vector"},
        "ray": {"address": address},
        "select": {"budget": 1000, **(select or {})},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def new_code(
    base: Path, n: int, methods: list[str], cluster: Cluster, stages=("ingest", "embed")
) -> dict:
    pool = write_pool(base / "input" / str(n), n)
    run, out = base / "runs" / str(n), base / "results" / str(n)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(out / "config.yaml", pool, run, cluster.address)
    rows = {}
    for stage in stages:
        rows[stage] = driver([stage, str(cfg)], ROOT, out / stage, cluster)
        print(n, stage, rows[stage], flush=True)
    for method in methods:
        cfg_m = config(out / f"{method}.yaml", pool, run, cluster.address, METHODS[method])
        rows[f"select {method}"] = driver(["select", str(cfg_m)], ROOT, out / method, cluster)
        print(n, method, rows[f"select {method}"], flush=True)
    return rows


def old_layout(new_run: Path, old_run: Path) -> None:
    """The run folder of the code before the scale-out, from the new one's parts and chunks (the
    harness reads them; neither driver does)."""
    from raysift.jobs.core.pool import load_pool, read_part, read_vectors
    from raysift.jobs.core.storage import Store

    store = Store.local(new_run)
    for side in ("candidates", "targets"):
        pool = load_pool(store, side)
        (old_run / "data").mkdir(parents=True, exist_ok=True)
        cols = ["id", "text", *(["source"] if side == "candidates" else [])]
        writer = None
        (old_run / "embeddings" / side).mkdir(parents=True, exist_ok=True)
        for k, part in enumerate(pool.parts):
            table = read_part(pool, part, cols)
            writer = writer or pq.ParquetWriter(old_run / "data" / f"{side}.parquet", table.schema)
            writer.write_table(table)
            vec = read_vectors(pool, part)
            shard = pa.table({"id": table["id"], "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(vec.reshape(-1)), vec.shape[1])})  # fmt: skip
            pq.write_table(shard, old_run / "embeddings" / side / f"part-{k:05d}.parquet")
        writer.close()


def old_code(base: Path, n: int, methods: list[str], cluster: Cluster, worktree: Path) -> dict:
    pool = base / "input" / str(n)
    new_run, old_run = base / "runs" / str(n), base / "old-runs" / str(n)
    out = base / "results" / f"old-{n}"
    out.mkdir(parents=True, exist_ok=True)
    if not (old_run / "data" / "candidates.parquet").is_file():
        old_layout(new_run, old_run)
    rows = {}
    ingest_cfg = config(out / "ingest.yaml", pool, base / "old-ingest" / str(n), cluster.address)
    text = ingest_cfg.read_text().replace("  vector_column: vector\n", "")  # it has no such key
    ingest_cfg.write_text(text)
    rows["ingest"] = driver(
        ["ingest", str(ingest_cfg)], worktree, out / "ingest", cluster, worktree
    )
    print("old", n, "ingest", rows["ingest"], flush=True)
    for method in methods:
        cfg = config(out / f"{method}.yaml", pool, old_run, cluster.address, METHODS[method])
        cfg.write_text(cfg.read_text().replace("  vector_column: vector\n", ""))
        rows[f"select {method}"] = driver(["select", str(cfg)], worktree, out / method, cluster,
                                          worktree)  # fmt: skip
        print("old", n, method, rows[f"select {method}"], flush=True)
    return rows


def report(results: dict) -> str:
    """The BENCHMARKS.md tables: every stage at every size, the driver's growth between the
    sizes (the criterion: larger <= 1.2 x smaller + 100 MB), and the old code side by side."""
    runs = results["runs"]
    sizes = sorted(int(n) for n in runs if not n.startswith("old"))
    lines = [
        "| rows | stage | wall s | driver peak RSS MB | driver received MB | driver sent MB "
        "| driver file reads MB | largest worker process (peak RSS MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        for stage, row in runs[str(n)].items():
            ours = {
                k: v
                for k, v in row["worker_peak_rss_mb"].items()
                if not k.startswith(("ray::IDLE", "ray::_", "ray::Dashboard", "ray::Runtime",
                                     "ray::DELETE", "ray::SPILL", "ray::RESTORE"))
            }  # fmt: skip
            worker = max(ours.items(), key=lambda kv: kv[1], default=("-", 0))
            uss = row.get("worker_peak_uss_mb", {}).get(worker[0])
            lines.append(
                f"| {n:,} | {stage} | {row['wall_s']} | {row['driver_peak_rss_mb']:.0f} "
                f"| {row['driver_received_mb']:.3f} | {row['driver_sent_mb']:.3f} "
                f"| {row['driver_file_reads_mb']:.0f} | {worker[0]} {worker[1]:,}"
                f"{f' (USS {uss:,})' if uss else ''} |"
            )
    lines += ["", "| stage | rows (small -> large) | driver peak RSS MB | limit 1.2 x small + 100 "
              "| within |", "|---|---|---|---|---|"]  # fmt: skip
    stages = {s for n in sizes for s in runs[str(n)]}
    for stage in sorted(stages):
        have = [n for n in sizes if stage in runs[str(n)]]
        if len(have) < 2:
            continue
        small, large = runs[str(have[0])][stage], runs[str(have[-1])][stage]
        a, b = small["driver_peak_rss_mb"], large["driver_peak_rss_mb"]
        limit = 1.2 * a + 100
        lines.append(f"| {stage} | {have[0]:,} -> {have[-1]:,} | {a:.0f} -> {b:.0f} "
                     f"| {limit:.0f} | {'yes' if b <= limit else '**no**'} |")  # fmt: skip
    olds = [k for k in runs if k.startswith("old")]
    if olds:
        lines += ["", "| rows | stage | before: wall s | now: wall s | before: driver peak RSS MB "
                  "| now: driver peak RSS MB | driver RSS before / now |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for key in sorted(olds):
            n = key.split()[1]
            for stage, old in runs[key].items():
                new = runs.get(n, {}).get(stage)
                if new is None:
                    continue
                ratio = old["driver_peak_rss_mb"] / new["driver_peak_rss_mb"]
                lines.append(
                    f"| {int(n):,} | {stage} | {old['wall_s']} | {new['wall_s']} "
                    f"| {old['driver_peak_rss_mb']:.0f} | {new['driver_peak_rss_mb']:.0f} "
                    f"| {ratio:.1f}x |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--tsds-sizes", type=int, nargs="+", default=[500_000, 2_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--store-gb", type=float, default=4.0, help="object store per worker")
    parser.add_argument("--head-store-gb", type=float, default=2.0)
    parser.add_argument("--old", action="store_true", help="also the code before the scale-out")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "scale")
    parser.add_argument("--report", action="store_true", help="print the tables of results.json")
    parser.add_argument(
        "--redo", nargs="+", default=None, help="measure these stages again (ingest, embed)"
    )
    args = parser.parse_args()
    if args.report:
        print(report(json.loads((args.out / "results.json").read_text())))
        return
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results: dict = {"machine": f"{os.uname().nodename}, {os.cpu_count()} cores",
                     "date": time.strftime("%Y-%m-%d"), "runs": {}}  # fmt: skip
    if results_path.is_file():  # a resumed benchmark keeps what it measured
        results["runs"] = json.loads(results_path.read_text())["runs"]
    plan = {n: ["random", "knn", "gotd"] for n in args.sizes}
    for n in args.tsds_sizes:
        plan.setdefault(n, []).append("tsds")
    cluster = Cluster(args.out, args.workers, args.store_gb, args.head_store_gb)
    try:
        for n in sorted(plan) if args.redo else []:  # again, into the results already there
            shutil.rmtree(args.out / "runs" / str(n), ignore_errors=True)  # else: all reused
            rows = new_code(args.out, n, [], cluster, stages=args.redo)
            results["runs"].setdefault(str(n), {}).update(rows)
            results_path.write_text(json.dumps(results, indent=1))
        for n in sorted(plan):
            if str(n) not in results["runs"]:
                results["runs"][str(n)] = new_code(args.out, n, plan[n], cluster)
                results_path.write_text(json.dumps(results, indent=1))
    finally:
        cluster.stop()
    if args.old:
        worktree = args.out / "old-code"
        if not worktree.is_dir():
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), OLD_COMMIT],
                           cwd=ROOT, check=True)  # fmt: skip
        small = {min(args.sizes): ["random", "knn", "gotd"]}
        small.setdefault(min(args.tsds_sizes), []).append("tsds")
        cluster = Cluster(args.out, args.workers, args.store_gb, args.head_store_gb, worktree)
        try:
            for n, methods in sorted(small.items()):
                if f"old {n}" not in results["runs"]:
                    results["runs"][f"old {n}"] = old_code(args.out, n, methods, cluster,
                                                           worktree)  # fmt: skip
                    results_path.write_text(json.dumps(results, indent=1))
        finally:
            cluster.stop()
    print(report(results))


if __name__ == "__main__":
    main()
