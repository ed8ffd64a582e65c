"""Embedding throughput: the Ray embedding stage against a plain single-process loop.

Same model (packaged all-MiniLM-L6-v2), same texts (N real rows sampled from the shared
pool.parquet, or the demo pool when it is absent), same batch size, max_length and length-bucketed
dynamic padding (both call `engine.embed.encode`). Each configuration runs in a fresh process, in
the order raw/ray alternating, with bf16 autocast on and off. Timings include importing torch and
loading the model (and, for Ray, starting the actor) but not starting the Ray cluster and warming
Ray Data (its first execution starts helper actors), a once-per-cluster cost that the pipeline
pays in its ingest stage; it is reported separately. Peak RSS is the sum over the process tree
(driver, raylet, workers, actors), sampled every 0.25 s.

    python benchmarks/embed_throughput.py [--n 10000] [--repeats 1] [--precisions bf16 fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
from harness import DriverBytes, Poller

REPO = Path(__file__).resolve().parent.parent
SHARED_POOL = REPO.parent / "shared" / "data" / "pool.parquet"
DEMO_POOL = REPO / "demo" / "pool.parquet"
BATCH, MAX_LENGTH, SHARD_ROWS = 64, 128, 4096  # the stage embeds a chunk of SHARD_ROWS a call


class PeakRSS(Poller):
    """Peak of the summed RSS of this process and all its descendants."""

    def __init__(self, interval: float = 0.25):
        super().__init__(interval)
        self.peak = 0

    def sample(self) -> None:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)


def sample_texts(n: int, out: Path) -> str:
    source = SHARED_POOL if SHARED_POOL.is_file() else DEMO_POOL
    table = pq.read_table(source, columns=["id", "text"])
    rows = np.sort(np.random.default_rng(0).choice(table.num_rows, min(n, table.num_rows), False))
    pq.write_table(table.take(rows), out)
    return str(source)


def worker(mode: str, precision: str, data: Path) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    texts = pq.read_table(data, columns=["text"])["text"].to_pylist()
    threads = os.cpu_count() or 1
    result = {"mode": mode, "precision": precision, "texts": len(texts), "threads": threads}
    if mode == "raw":
        with PeakRSS() as rss:
            t0 = time.perf_counter()  # the imports count, as they do in a fresh Ray actor
            from raysift.engine.embed import encode, load_encoder

            enc = load_encoder(
                max_length=MAX_LENGTH, batch_size=BATCH, precision=precision, num_threads=threads
            )
            for i in range(0, len(texts), SHARD_ROWS):
                encode(enc, texts[i : i + SHARD_ROWS])
            result["seconds"] = time.perf_counter() - t0
    else:
        import ray
        import ray.data

        from raysift.jobs.config import EmbedConfig
        from raysift.jobs.runtime import RAY_ENV, configure_data
        from raysift.jobs.stages.embed import embed_sides

        t0 = time.perf_counter()
        ray.init(
            num_cpus=threads,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": RAY_ENV},
        )
        configure_data()
        # Ray Data's first execution on a fresh cluster starts its helper actors (stats, autoscaling
        # coordinator); in the pipeline the ingest stage has paid this before embed runs.
        ray.data.range(8).materialize()
        result["ray_start_seconds"] = time.perf_counter() - t0
        from raysift.jobs.config import IngestConfig, InputSpec
        from raysift.jobs.core.storage import Store
        from raysift.jobs.stages.ingest import ingest_side

        cfg = EmbedConfig(
            max_length=MAX_LENGTH, batch_size=BATCH, precision=precision, num_actors=1,
            cpus_per_actor=1, shard_rows=SHARD_ROWS,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            store = Store.local(Path(tmp))  # ingested first (not timed): the stage's input
            spec = InputSpec(path=str(data), id_column="id")
            ingest_side(spec, "candidates", store, "candidates", IngestConfig())
            with PeakRSS() as rss, DriverBytes() as received:
                t0 = time.perf_counter()
                info = embed_sides(store, ("candidates",), cfg)["candidates"]
                result["seconds"] = time.perf_counter() - t0
            assert info["rows_embedded"] == len(texts), info
            result["resolved_precision"] = info["precision"]
            result["driver_bytes_received"] = received.bytes
        ray.shutdown()
    result["texts_per_s"] = len(texts) / result["seconds"]
    result["peak_rss_gb"] = rss.peak / 1e9
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "fp16"]
    )
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "PRECISION", "DATA"))
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], args.worker[1], Path(args.worker[2]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "texts.parquet"
        source = sample_texts(args.n, data)
        results = []
        for _ in range(args.repeats):
            for precision in args.precisions:
                for mode in ("raw", "ray"):
                    out = subprocess.run(
                        [sys.executable, __file__, "--worker", mode, precision, str(data)],
                        capture_output=True,
                        text=True,
                        cwd=REPO,
                        check=True,
                    )
                    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
                    results.append(json.loads(line[7:]))
                    print(json.dumps(results[-1]), file=sys.stderr)
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({cpu}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {results[0]['texts']} "
        f"texts from {Path(source).name}, batch {BATCH}, max_length {MAX_LENGTH}\n"
    )
    print(
        "| precision | raw loop texts/s | Ray stage texts/s | Ray / raw | raw peak RSS GB "
        "| Ray peak RSS GB (all processes) | Ray cluster start + Ray Data warm-up s "
        "| driver bytes received per text |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for precision in args.precisions:
        raw = [r for r in results if r["mode"] == "raw" and r["precision"] == precision]
        ray_ = [r for r in results if r["mode"] == "ray" and r["precision"] == precision]
        r_tps = np.median([r["texts_per_s"] for r in raw])
        y_tps = np.median([r["texts_per_s"] for r in ray_])
        print(
            f"| {precision} | {r_tps:.1f} | {y_tps:.1f} | {y_tps / r_tps:.2f} "
            f"| {max(r['peak_rss_gb'] for r in raw):.2f} "
            f"| {max(r['peak_rss_gb'] for r in ray_):.2f} "
            f"| {np.median([r['ray_start_seconds'] for r in ray_]):.1f} "
            f"| {max(r['driver_bytes_received'] / r['texts'] for r in ray_):.2f} |"
        )


if __name__ == "__main__":
    main()
