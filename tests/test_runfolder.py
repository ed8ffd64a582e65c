import json

import pyarrow as pa
import pytest

from raysift.jobs.core.runfolder import (
    Manifest,
    atomic_path,
    clean_leftovers,
    write_json,
    write_parquet,
)


def test_a_failed_write_leaves_no_file_and_no_temp(tmp_path):
    target = tmp_path / "out" / "selection.parquet"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a parquet file")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failed_rewrite_keeps_the_previous_file(tmp_path):
    target = tmp_path / "m.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"v": 2')
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}


def test_folders_are_committed_whole(tmp_path):
    target = tmp_path / "shards"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        write_parquet(tmp / "a.parquet", pa.table({"x": [1]}))
    assert (target / "a.parquet").is_file()
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path):
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / ".tmp-1234abcd-part-x.parquet").write_bytes(b"x")
    (tmp_path / ".tmp-99-data").mkdir()
    (tmp_path / "keep.parquet").write_bytes(b"x")
    assert clean_leftovers(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["embeddings", "keep.parquet"]


def test_manifest_records_stages_and_survives_a_rerun(tmp_path):
    m = Manifest(tmp_path, {"a": 1}, seed=5)
    t0 = m.start("ingest")
    m.finish("ingest", t0, rows=10)
    m.start("embed")
    m.fail("embed", "boom")
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["seed"] == 5 and data["config"] == {"a": 1}
    assert data["stages"]["ingest"]["status"] == "done" and data["stages"]["ingest"]["rows"] == 10
    assert data["stages"]["embed"] == {
        **data["stages"]["embed"],
        "status": "failed",
        "error": "boom",
    }
    assert {"python", "ray", "torch", "pyarrow"} <= set(data["versions"])
    again = Manifest(tmp_path, {"a": 2}, seed=5)
    assert again.stage("ingest")["rows"] == 10
