"""Local autoscaling proof on Ray's fake_multinode provider (cluster.fake.yaml).

Starts `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=cluster.fake.yaml --num-cpus 1`
and runs a raysift job on it. Every second it records the alive nodes and, for the feature pass,
how many chunks are committed: the autoscaler adds worker nodes for the pending actors, the
pass's actor pool (`actors.pool.map_actors`) gives work to each actor as it comes up on a node
that joined mid-pass (the manifest counts chunks per node), and the nodes go after the idle
timeout once the job is done.

    python benchmarks/autoscale_fake.py [--job gotd|lm_hidden]   # -> runs/bench/autoscale/

gotd: GOT-D with 3 shard actors x 1 CPU (the head has 1). lm_hidden: RDS+'s hidden-state pass of
SmolLM2 over 1,500 demo texts with 4 actors x 1 CPU, 25 rows per chunk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OUT = REPO / "runs" / "bench" / "autoscale"


JOBS = {
    "gotd": ["candidates.limit=600", "embed.cpus_per_actor=0.5", "select.method=gotd",
             "select.gotd.shards=3", "select.gotd.cpus_per_shard=1"],
    "lm_hidden": ["candidates.limit=1500", "targets.limit=20", "stages=[ingest, select]",
                  "select.method=rds", "select.lm_hidden.num_actors=4",
                  "select.lm_hidden.cpus_per_actor=1", "select.lm_hidden.chunk_rows=25",
                  "select.lm_hidden.precision=fp32", "select.budget=100"],
}  # fmt: skip


def committed_chunks(run: Path) -> int:
    return sum(1 for _ in (run / "features" / "candidates").glob("hidden-*/*/rows-*.parquet"))


def main() -> None:
    import argparse
    import secrets

    ap = argparse.ArgumentParser()
    ap.add_argument("--job", choices=list(JOBS), default="gotd")
    args = ap.parse_args()
    out = OUT / args.job
    # Token auth on, with a token this script holds (set before Ray is imported: it reads once).
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    import ray

    out.mkdir(parents=True, exist_ok=True)
    # The fake provider's worker nodes dial the GCS on Ray's default port, whatever the head
    # was started with (seen here: with --port=6411 the three launched nodes never joined).
    port = 6379
    temp = "/tmp/rsfake"
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "PATH": f"{BIN}:{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         f"--autoscaling-config={REPO / 'cluster.fake.yaml'}", "--dashboard-host=127.0.0.1",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=open(out / "head.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    timeline: list[tuple[float, int, int]] = []  # (s, alive nodes, committed chunks)
    t0 = time.monotonic()
    try:
        for _ in range(120):
            try:
                ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
                break
            except ConnectionError:
                time.sleep(1)
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                alive = sum(n["Alive"] for n in ray.nodes())
                chunks = committed_chunks(out / "run")
                timeline.append((round(time.monotonic() - t0, 1), alive, chunks))
                stop.wait(1.0)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        job_start = time.monotonic() - t0
        sets = [f"output_dir={out / 'run'}", f"ray.address=127.0.0.1:{port}", *JOBS[args.job]]
        job = subprocess.run(
            [sys.executable, "-m", "raysift", "run", str(REPO / "configs" / "demo.yaml"),
             *[a for s in sets for a in ("--set", s)]],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        job_end = time.monotonic() - t0
        print(job.stderr[-1500:])
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and (not timeline or timeline[-1][1] > 1):
            time.sleep(2)
        time.sleep(3)
        stop.set()
        poller.join()
    finally:
        try:
            ray.shutdown()
        finally:
            os.killpg(head.pid, signal.SIGTERM)  # the head and the fake nodes it started
            time.sleep(5)
            os.killpg(head.pid, signal.SIGKILL)
    peak = max(n for _, n, _ in timeline)
    up = next((t for t, n, _ in timeline if n > 1), None)
    down = next((t for t, n, _ in timeline if t > job_end and n == 1), None)
    manifest = json.loads((out / "run" / "manifest.json").read_text())["stages"].get("select", {})
    result = {
        "job": args.job,
        "chunks_per_node": manifest.get("chunks_per_node"),
        "chunks_by_nodes_alive": rates(timeline),
        "job_returncode": job.returncode,
        "job_seconds": round(job_end - job_start, 1),
        "peak_nodes": peak,
        "first_node_added_s": up,
        "job_end_s": round(job_end, 1),
        "back_to_head_only_s": down,
        "timeline": timeline,
    }
    (out / "timeline.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))
    changes = [timeline[0]] + [b for a, b in zip(timeline, timeline[1:]) if a[1] != b[1]]  # noqa: B905
    print("node count changes (s, nodes, chunks):", changes)


def rates(timeline: list) -> dict:
    """Chunks committed per second while k nodes were alive (the pass's throughput as nodes
    join), over the seconds the pass was running."""
    out: dict = {}
    for (t0, n0, c0), (t1, _, c1) in zip(timeline, timeline[1:]):  # noqa: B905
        if c1 > 0 or c0 > 0:
            seconds, chunks = out.get(n0, (0.0, 0))
            out[n0] = (seconds + (t1 - t0), chunks + (c1 - c0))
    return {k: round(c / s, 3) for k, (s, c) in sorted(out.items()) if s > 0}


if __name__ == "__main__":
    main()
