"""Run folders on S3: a real S3 protocol endpoint on loopback (moto's server, with IAM signature
checks on), reached through pyarrow's own S3 client -- nothing of raysift is mocked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raysift.jobs.core import storage
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.runfolder import write_json, write_parquet
from tests.conftest import DEMO_POOL, DEMO_TARGETS, REPO, write_config

BUCKET = "raysift-runs"
NO_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server with authentication enforced after the first three calls (an IAM user,
    its policy, its key); yields the environment a client needs (credentials + endpoint)."""
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    home = tmp_path_factory.mktemp("home")  # no ~/.aws of the machine's user
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        boot = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="x", aws_secret_access_key="x", **boot)
        iam.create_user(UserName="raysift")
        allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        policy = {"Version": "2012-10-17", "Statement": [allow]}
        iam.put_user_policy(UserName="raysift", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="raysift")["AccessKey"]
        env = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "HOME": str(home),
        }
        boto3.client(
            "s3", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], **boot,
        ).create_bucket(Bucket=BUCKET)  # fmt: skip
        yield env
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for k in NO_CREDENTIALS:
        monkeypatch.delenv(k, raising=False)
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    return s3


def _remote_files(env_prefix: str) -> dict[str, int]:
    fs, root = pafs.FileSystem.from_uri(env_prefix)
    sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    return {
        i.path[len(root) + 1 :]: i.size
        for i in fs.get_file_info(sel)
        if i.type == pafs.FileType.File
    }


def test_mirror_uploads_each_commit_syncs_deletions_and_pulls_elsewhere(s3_env, tmp_path):
    import pyarrow as pa

    uri = f"s3://{BUCKET}/unit"
    remote = storage.Remote(uri, local=tmp_path / "a")
    remote.probe()
    remote.pull()
    storage._MIRRORS[remote.local.resolve()] = remote
    bulk = [
        "data/candidates/part-00000-x.parquet",
        "embeddings/candidates/d/rows-0-1.parquet",
        "evaluate/knn-seed0/finetune/ray/ckpt",
        "finetune/tokens/part-00000.parquet",
    ]
    try:
        write_json(remote.local / "manifest.json", {"x": 1})
        write_parquet(remote.local / "selection.parquet", pa.table({"id": ["a"]}))
        # uploaded at the atomic rename, before any sync
        assert set(_remote_files(uri)) == {"manifest.json", "selection.parquet"}
        store = storage.Store.for_run(remote.local)  # what workers write straight to S3
        for rel in bulk:
            store.write_bytes(rel, b"a worker's")
        (remote.local / "selection.parquet").unlink()
        remote.sync()
        # the deletion synced; the workers' files, which the mirror never held, untouched
        assert set(_remote_files(uri)) == {"manifest.json", *bulk}
    finally:
        storage._MIRRORS.clear()
    other = storage.Remote(uri, local=tmp_path / "b")  # another machine's driver
    assert other.pull() == 1  # the manifest: the mirror keeps small files only
    assert json.loads((other.local / "manifest.json").read_text()) == {"x": 1}
    assert not (other.local / "data").exists() and not (other.local / "embeddings").exists()
    assert other.pull() == 0  # nothing new


def test_storage_uri_without_credentials_fails_in_seconds(s3, monkeypatch, tmp_path):
    for k in NO_CREDENTIALS:
        monkeypatch.delenv(k, raising=False)
    for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED", "HOME"):
        monkeypatch.setenv(k, s3[k])
    t0 = time.monotonic()
    with pytest.raises(InputError, match=r"output_dir: cannot use s3://.*no AWS credentials"):
        storage.open_run(f"s3://{BUCKET}/nocreds")
    assert time.monotonic() - t0 < 20
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(InputError, match=r"output_dir: cannot use s3://.*ACCESS_DENIED|Forbidden"):
        storage.open_run(f"s3://{BUCKET}/wrongcreds")


def test_unknown_scheme_names_the_field():
    with pytest.raises(InputError, match=r"output_dir: nosuch://x/y"):
        storage.Remote("nosuch://x/y")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pipeline_on_s3_resumes_from_another_drivers_mirror(s3_env, tmp_path):
    """`raysift run` with output_dir on S3: every file lands there; a second driver with an empty
    local cache (another node) reuses the committed shards and writes the same selection."""
    uri = f"s3://{BUCKET}/runs/demo"
    cfg = write_config(
        tmp_path / "cfg.yaml",
        output_dir=uri,
        candidates={"path": str(DEMO_POOL), "id_column": "id", "limit": 200,
                    "keep_columns": ["source"]},
        targets={"path": str(DEMO_TARGETS), "limit": 20},
        embed={"shard_rows": 64},
        select={"method": "knn", "budget": 20},
        ray={"num_cpus": 2},
    )  # fmt: skip

    def run(cache: Path):
        env = {**os.environ, "RAYSIFT_CACHE": str(cache)}
        return subprocess.run(
            [sys.executable, "-m", "raysift", "run", str(cfg)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=500,
        )  # fmt: skip

    first = run(tmp_path / "cache1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"run folder: {uri}" in first.stdout
    files = _remote_files(uri)
    chunks = [f for f in files if f.startswith("embeddings/candidates/") and "/rows-" in f]
    assert len(chunks) == 4  # 200 rows / 64 per chunk, written by the actors
    assert any(f.startswith("data/candidates/part-") for f in files)  # by the ingest tasks
    assert not list((tmp_path / "cache1").rglob("part-*.parquet"))  # never on the driver
    assert {"manifest.json", "selection.parquet", "selected.jsonl", "config.yaml"} <= set(files)
    fs, root = pafs.FileSystem.from_uri(uri)
    with fs.open_input_file(f"{root}/manifest.json") as fh:
        manifest = json.loads(fh.read())
    assert manifest["stages"]["select"]["status"] == "done"
    with fs.open_input_file(f"{root}/selection.parquet") as fh:
        selection = pq.read_table(fh)

    second = run(tmp_path / "cache2")  # nothing local: everything comes from S3
    assert second.returncode == 0, second.stderr[-2000:]
    with fs.open_input_file(f"{root}/manifest.json") as fh:
        manifest = json.loads(fh.read())
    embed = manifest["stages"]["embed"]["candidates"]
    assert embed["rows_reused"] == 200 and embed["rows_embedded"] == 0
    with fs.open_input_file(f"{root}/selection.parquet") as fh:
        assert pq.read_table(fh).equals(selection)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_inputs_on_s3_are_read_by_the_workers_and_fingerprinted(s3_env, tmp_path):
    """candidates.path and targets.path on S3: listed and fingerprinted there (size, mtime),
    read by the ingest tasks; an unchanged input skips the ingest, a new file is appended."""
    import boto3

    client = boto3.client("s3", region_name="us-east-1")
    pool = pq.read_table(DEMO_POOL).slice(0, 120).select(["id", "text", "source"])
    for name, part in (("a.parquet", pool.slice(0, 80)), ("c.parquet", pool.slice(80, 20))):
        pq.write_table(part, tmp_path / name)
        client.upload_file(str(tmp_path / name), BUCKET, f"inputs/pool/{name}")
    client.upload_file(str(DEMO_TARGETS), BUCKET, "inputs/targets.jsonl")
    cfg = write_config(
        tmp_path / "cfg.yaml",
        output_dir=str(tmp_path / "run"),
        candidates={"path": f"s3://{BUCKET}/inputs/pool", "id_column": "id",
                    "keep_columns": ["source"]},
        targets={"path": f"s3://{BUCKET}/inputs/targets.jsonl", "limit": 20},
        select={"method": "random", "budget": 10},
        stages=["ingest", "select"],
        ray={"num_cpus": 2},
    )  # fmt: skip

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "raysift", *args, str(cfg)],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    first = run("run")
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    ingest = manifest["stages"]["ingest"]["candidates"]
    assert ingest["rows"] == 100 and ingest["files_read"] == 2
    assert [f[0] for f in ingest["inputs"]] == [
        f"s3://{BUCKET}/inputs/pool/a.parquet", f"s3://{BUCKET}/inputs/pool/c.parquet"
    ] and all(f[1] > 0 and f[2] > 0 for f in ingest["inputs"])  # fmt: skip
    again = run("ingest")  # the ingest alone: its reuse check needs no Ray start
    assert "inputs unchanged since the last run" in again.stderr
    pq.write_table(pool.slice(100, 20), tmp_path / "b.parquet")
    client.upload_file(str(tmp_path / "b.parquet"), BUCKET, "inputs/pool/b.parquet")
    third = run("curate")
    assert third.returncode == 0, third.stderr[-2000:]
    info = json.loads(third.stdout.strip().splitlines()[-1])
    assert info["appended"] and info["files_read"] == 1 and info["rows_added"] == 20
    assert info["version"] == 1 and len(info["new_files"]) == 3  # the first curated version


def test_object_store_lock_refuses_renews_expires_and_is_taken_over(s3_env, monkeypatch):
    """The run lock on S3: a conditional create; a second writer sees the holder while the
    holder renews it; a holder that stopped renewing (a killed run) loses it after the expiry
    to a conditional takeover, and finds out at its next renewal (its run stops there)."""
    import boto3

    from raysift.jobs.core import runlock
    from raysift.jobs.core.runlock import FolderBusy, ObjectLock, S3Object, hold, holder

    monkeypatch.setenv("RAYSIFT_LOCK_EXPIRY", "2")  # renewed every 0.5 s
    uri = f"s3://{BUCKET}/locked"
    key = "locked/.raysift.lock"
    client = boto3.client("s3")
    other = ObjectLock(S3Object(uri))  # another machine's run: not this process's registry
    mine = holder("raysift curate")
    with hold(uri, command="raysift curate") as lock:
        body = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        assert body["pid"] == os.getpid() and body["command"] == "raysift curate"
        time.sleep(3)  # past the expiry: renewals keep it
        seen = other.try_acquire(holder("raysift run"))
        assert seen["pid"] == os.getpid() and seen["renewed"] > body["renewed"]
        ours = runlock._HELD.pop(uri)  # ask as another process would (not re-entrant)
        try:
            with pytest.raises(FolderBusy, match=f"{uri} is in use by raysift curate"):
                with hold(uri):
                    pass
        finally:
            runlock._HELD[uri] = ours
        lock._stop.set()  # a run that stopped renewing (killed, or cut off)
        time.sleep(2.5)
        assert other.try_acquire(mine) is None  # taken over after the expiry
        assert not lock.backend.renew(lock.info)  # the old holder's renewal fails: it knows
        lock.lost = True
        with pytest.raises(FolderBusy, match="taken over by another run"):
            lock.check()
    # the old holder's release left the new holder's lock alone
    assert json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())["renewed"]
    other.release()
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket=BUCKET, Key=key)
