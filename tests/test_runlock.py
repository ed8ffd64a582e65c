"""One writer per run folder (jobs.runlock): a second writer refuses with one line naming the
holder, or waits; a SIGKILLed holder leaves nothing stale; two curations started together give
what one gives. The object-store lock (conditional writes, expiry, takeover) is tested on the
loopback S3 in test_storage.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raysift.jobs.core.runlock import FolderBusy, hold
from tests.conftest import DEMO_POOL, DEMO_TARGETS, REPO, write_config

HOLDER = """
import sys, time
from raysift.jobs.core.runlock import hold
with hold(sys.argv[1], command="raysift curate"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(folder: Path, seconds: float) -> subprocess.Popen:
    """Another process holding `folder` for `seconds` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(seconds)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_refuses_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "runs" / "demo"
    proc = _holder(folder, 60)
    try:
        with pytest.raises(FolderBusy) as busy, hold(str(folder)):
            pass
        line = str(busy.value)
        assert line.startswith(f"{folder} is in use by raysift curate (")
        assert f"pid {proc.pid}, since " in line and line.endswith("wait for it or stop it")
        assert "\n" not in line
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup: the OS drops its lock with the process
        proc.wait()
    with hold(str(folder)) as lock:  # at once: nothing stale
        assert json.loads((folder / ".raysift.lock").read_text())["pid"] == os.getpid()
        with hold(str(folder / "evaluate" / "knn-seed0")) as inner:  # below a held folder
            assert inner is lock


def test_a_waiting_writer_gets_the_folder_when_the_holder_ends(tmp_path, capsys):
    folder = tmp_path / "run"
    proc = _holder(folder, 2)
    t0 = time.monotonic()
    with hold(str(folder), wait=60):
        assert time.monotonic() - t0 > 1  # it waited for the holder
    proc.wait()
    said = capsys.readouterr().err
    assert f"{folder} is in use by raysift curate (" in said and "; waiting (up to 60 s" in said
    with pytest.raises(FolderBusy, match=r"\(waited 1 s\)$"):
        proc = _holder(folder, 30)
        try:
            with hold(str(folder), wait=1):
                pass
        finally:
            proc.kill()
            proc.wait()


def test_a_run_refused_by_its_checks_leaves_no_folder(tmp_path):
    from raysift.jobs.core.errors import InputError

    folder = tmp_path / "new"
    with pytest.raises(InputError, match="a check"), hold(str(folder)):
        assert (folder / ".raysift.lock").is_file()
        raise InputError("a check")
    assert not folder.exists()


def _curate(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": "/tmp"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "raysift", "curate", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO, start_new_session=True)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_curations_started_together_give_what_one_gives(tmp_path):
    """The scheduled-curation race: a pool folder grows, two `raysift curate` start at once. One
    writes the new version; the other waits for it and finds nothing new (--wait), or refuses
    at once with one line (no --wait). The pool holds each row once."""
    rows = pq.read_table(DEMO_POOL).slice(0, 910)
    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(rows.slice(0, 600), pool / "a.parquet")
    config = write_config(
        tmp_path / "curate.yaml", output_dir=str(tmp_path / "run"),
        candidates={"path": str(pool), "id_column": "id"},
        targets={"path": str(DEMO_TARGETS), "limit": 10},
        select={"method": "random", "budget": 50}, stages=["ingest", "select"],
        ray={"num_cpus": 2},
    )  # fmt: skip
    first = _curate(config)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    pq.write_table(rows.slice(600, 300), pool / "b.parquet")  # the folder grew

    a, b = _curate(config, "--wait", "300"), _curate(config, "--wait", "300")
    outs = [p.communicate(timeout=400) for p in (a, b)]
    assert [p.returncode for p in (a, b)] == [0, 0], [o[1][-1500:] for o in outs]
    summaries = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(s["new_version"] for s in summaries) == [False, True]  # one wrote v0002
    assert all(s["version"] == 2 for s in summaries)
    waited = [o[1] for o in outs if "; waiting (up to 300 s" in o[1]]
    assert len(waited) == 1, [o[1][-800:] for o in outs]
    latest = json.loads((tmp_path / "run" / "curate" / "latest.json").read_text())
    assert latest["version"] == 2 and latest["pool"] == 900  # every row once

    pq.write_table(rows.slice(900, 10), pool / "c.parquet")  # the folder grew again
    holder = _curate(config)
    deadline = time.monotonic() + 120
    lock = tmp_path / "run" / ".raysift.lock"
    while time.monotonic() < deadline:  # until the first one holds the folder
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == holder.pid:
                break
        except ValueError:
            pass
        time.sleep(0.2)
    refused = _curate(config)
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2, err[-1500:]
    lines = [x for x in err.splitlines() if x.strip()]
    want = f"raysift: error: {tmp_path / 'run'} is in use by raysift curate"
    assert len(lines) == 1 and lines[0].startswith(want), lines
    _, err = holder.communicate(timeout=300)
    assert holder.returncode == 0, err[-1500:]
