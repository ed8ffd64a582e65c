"""Job submission on a real two-node cluster started like a user would (`ray start --head`, then
`ray start --address` for a worker node) on ports of its own, with token authentication on.

The head advertises no CPUs, so every task and actor runs on worker nodes: the jobs below are
really spread over the cluster, and the run folder is written by a driver the Jobs API started."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent
DEMO = REPO / "configs" / "demo.yaml"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _cli(*args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysift", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


class Node:
    """`ray start ... --block` in its own process group: killing the group is a node dying."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill(self, sig=signal.SIGKILL) -> None:
        for s, grace in ((sig, 5), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, s)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # whatever the node left in its group (workers, object store)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


def _alive_nodes(env: dict, gcs: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", "import ray,sys; ray.init(address=sys.argv[1], "
         "log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))", gcs],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return int(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    gcs_port, dash, client, agent, wp_lo = _free_ports(5)
    temp = Path(f"/tmp/rs{os.getpid()}")  # short: Ray's socket paths must fit in 107 bytes
    logs = tmp_path_factory.mktemp("nodes")
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",  # the job's driver runs the `python` on this PATH
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "HF_HUB_OFFLINE": "1",
    }
    head = Node(
        ["--head", f"--port={gcs_port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         "--num-cpus=0", f"--temp-dir={temp}"],
        env, logs / "head.log",
    )  # fmt: skip
    gcs = f"127.0.0.1:{gcs_port}"
    nodes = [head]
    try:
        deadline = time.monotonic() + 90
        while True:  # the dashboard (Jobs API) is the last thing up
            try:
                socket.create_connection(("127.0.0.1", dash), 0.5).close()
                break
            except OSError:
                assert head.proc.poll() is None, (logs / "head.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "head did not come up"
                time.sleep(0.5)
        # its own temp dir: two nodes on one machine would otherwise share the head's, and the
        # worker node's agent re-extracts the job's working_dir there while the driver reads it
        nodes.append(Node([f"--address={gcs}", "--num-cpus=2", f"--temp-dir={temp}w"], env,
                          logs / "worker.log"))  # fmt: skip
        deadline = time.monotonic() + 90
        while _alive_nodes(env, gcs) < 2:
            assert time.monotonic() < deadline, "worker node did not join"
            time.sleep(1)
        yield {"env": env, "gcs": gcs, "address": f"http://127.0.0.1:{dash}", "nodes": nodes,
               "logs": logs}  # fmt: skip
    finally:
        for node in reversed(nodes):
            node.kill(signal.SIGTERM)
        subprocess.run(["rm", "-rf", str(temp), f"{temp}w"], check=False)


def jobs_api(cluster, job_id: str, timeout_s: float = 400) -> tuple[str, str]:
    """(final status, logs) of a job through the Jobs API, from a client process holding the token
    (Ray reads RAY_AUTH_MODE once per process; this one's Ray is the tests' local cluster)."""
    code = (
        "import json, sys; from raysift.jobs import cluster as c; a, j, t = sys.argv[1:]; "
        "print(json.dumps([c.wait(a, j, float(t)), c.logs(a, j)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, cluster["address"], job_id, str(timeout_s)],
        cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=timeout_s + 60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    status, log = json.loads(out.stdout.strip().splitlines()[-1])
    return status, log


def _job_id(stdout: str) -> str:
    return next(line.split()[1] for line in stdout.splitlines() if line.startswith("submitted"))


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_demo_through_the_jobs_api_with_the_token(cluster, tmp_path):
    run = tmp_path / "demo"
    res = _cli(
        "submit", str(DEMO), "--address", cluster["address"],
        "--set", f"output_dir={run}", "--set", "candidates.limit=300", "--set", "select.budget=100",
        env=cluster["env"],
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    job_id = _job_id(res.stdout)
    status, log = jobs_api(cluster, job_id)  # the Jobs API itself, with the token
    assert status == "SUCCEEDED", log[-3000:]
    manifest = _manifest(run)
    # the job ran the uploaded code (Ray's copy of this checkout), not the test env's install
    assert Path(manifest["code"]) != REPO and "_ray_pkg_" in manifest["code"], manifest["code"]
    stages = manifest["stages"]
    assert [stages[s]["status"] for s in ("ingest", "embed", "select")] == ["done"] * 3
    assert stages["embed"]["candidates"]["rows_embedded"] == 300
    assert stages["select"]["rows"] == 100 and (run / "selected.jsonl").is_file()
    assert len((run / "selected.jsonl").read_text().splitlines()) == 100


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_worker_node_dies_mid_embed_and_resubmission_resumes(cluster, tmp_path):
    """A second worker node joins, the embedding stage spreads over both, the node is killed
    after some shards are committed. The job finishes on the surviving node, or fails with a
    one-line error; either way a resubmission completes and never rewrites a committed shard."""
    env = cluster["env"]
    extra = Node([f"--address={cluster['gcs']}", "--num-cpus=2"], env, cluster["logs"] / "w2.log")
    deadline = time.monotonic() + 90
    while _alive_nodes(env, cluster["gcs"]) < 3:
        assert time.monotonic() < deadline, "second worker node did not join"
        time.sleep(1)
    run = tmp_path / "killed"
    shards = run / "embeddings" / "candidates"  # <digest>/rows-A-B.parquet chunks
    rows = 800  # 8 shards of 100: the kill lands after 2 and before the last
    sets = ["--set", f"output_dir={run}", "--set", f"candidates.limit={rows}",
            "--set", "embed.shard_rows=100",
            "--set", "embed.num_actors=2", "--set", "embed.cpus_per_actor=1",
            "--set", "stages=[ingest, embed]"]  # fmt: skip
    res = _cli("submit", str(DEMO), "--address", cluster["address"], "--no-wait", *sets, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    job_id = _job_id(res.stdout)
    deadline = time.monotonic() + 300
    while len(list(shards.glob("*/rows-*.parquet"))) < 2:
        assert time.monotonic() < deadline, "no shard committed in 300 s"
        time.sleep(0.5)
    before = {p: p.stat().st_mtime_ns for p in shards.glob("*/rows-*.parquet")}
    extra.kill()  # SIGKILL the node's raylet, object store and workers
    assert len(before) < rows // 100, "the embedding had finished before the kill"
    status, log = jobs_api(cluster, job_id)
    assert status in ("SUCCEEDED", "FAILED"), status
    if status == "FAILED":  # a clear one-line error from raysift, not a hang
        assert "raysift: " in log.strip().splitlines()[-1], log[-2000:]

    again = _cli("submit", str(DEMO), "--address", cluster["address"], *sets, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    embed = _manifest(run)["stages"]["embed"]["candidates"]
    assert embed["rows"] == rows
    for path, mtime in before.items():  # committed before the kill: kept, not redone
        assert path.stat().st_mtime_ns == mtime
    assert embed["rows_reused"] >= 100 * len(before)
    assert embed["rows_reused"] + embed["rows_embedded"] == rows
    print(f"first job: {status}; resubmission reused {embed['rows_reused']} rows")


@pytest.mark.timeout(120)
def test_submit_without_the_token_is_refused_in_seconds(cluster, tmp_path):
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    t0 = time.monotonic()
    res = _cli("submit", str(DEMO), "--address", cluster["address"], env=env, timeout=60)
    assert res.returncode == 2
    assert "auth token" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 30


@pytest.mark.timeout(120)
def test_dead_addresses_fail_in_seconds(tmp_path):
    (port,) = _free_ports(1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    res = _cli("submit", str(DEMO), "--address", f"http://127.0.0.1:{port}", env=env, timeout=60)
    assert res.returncode == 2 and "--address: nothing answers at 127.0.0.1" in res.stderr
    res = _cli("run", str(DEMO), "--set", f"ray.address=127.0.0.1:{port}",
               "--set", f"output_dir={tmp_path / 'run'}", env=env, timeout=60)  # fmt: skip
    assert res.returncode == 2 and "ray.address: nothing answers at 127.0.0.1" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 30
