"""Local autoscaling proof on Ray's fake_multinode provider (cluster.fake.yaml).

Starts `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=cluster.fake.yaml --num-cpus 1`,
runs a raysift job on it whose GOT-D stage asks for 3 shard actors x 1 CPU (the head has 1 CPU),
and records the number of alive nodes every second: the autoscaler adds worker nodes for the
pending actors, and removes them after the idle timeout once the job is done.

    python benchmarks/autoscale_fake.py          # -> runs/bench/autoscale/timeline.json
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


def main() -> None:
    import secrets

    # Token auth on, with a token this script holds (set before Ray is imported: it reads once).
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    import ray

    OUT.mkdir(parents=True, exist_ok=True)
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
        env=env, stdout=open(OUT / "head.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    timeline: list[tuple[float, int]] = []
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
                timeline.append((round(time.monotonic() - t0, 1), alive))
                stop.wait(1.0)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        job_start = time.monotonic() - t0
        sets = [
            f"output_dir={OUT / 'run'}", f"ray.address=127.0.0.1:{port}",
            "candidates.limit=600", "embed.cpus_per_actor=0.5", "select.method=gotd",
            "select.gotd.shards=3", "select.gotd.cpus_per_shard=1",
        ]  # fmt: skip
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
    peak = max(n for _, n in timeline)
    up = next((t for t, n in timeline if n > 1), None)
    down = next((t for t, n in timeline if t > job_end and n == 1), None)
    result = {
        "job_returncode": job.returncode,
        "job_seconds": round(job_end - job_start, 1),
        "peak_nodes": peak,
        "first_node_added_s": up,
        "job_end_s": round(job_end, 1),
        "back_to_head_only_s": down,
        "timeline": timeline,
    }
    (OUT / "timeline.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))
    changes = [timeline[0]] + [b for a, b in zip(timeline, timeline[1:]) if a[1] != b[1]]  # noqa: B905
    print("node count changes (s, nodes):", changes)


if __name__ == "__main__":
    main()
