"""`raysift curate` on a pool folder that grows: only new rows are embedded, the selection equals a
from-scratch run on the union (exact modes), a run with nothing new writes nothing, and GOT-D's
incremental mode scores new rows by the c-transform of the stored target potential."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raysift.jobs.config import load_config
from raysift.jobs.pipeline import run
from raysift.jobs.workflows.curate import run_curate
from tests.conftest import DEMO_POOL, DEMO_TARGETS, pool_table, write_config


def _config(tmp_path, name, pool, method, **select):
    return load_config(
        write_config(
            tmp_path / f"{name}.yaml",
            output_dir=str(tmp_path / name),
            candidates={"path": str(pool), "id_column": "id", "keep_columns": ["source"]},
            targets={"path": str(DEMO_TARGETS), "limit": 20},
            # fp32: bf16 vectors of the same text move with the batch it was padded in
            embed={"shard_rows": 64, "cpus_per_actor": 0.5, "precision": "fp32"},
            select={"method": method, "budget": 30, **select},
            ray={"num_cpus": 2},
        )
    )


def _pool(tmp_path, first: int, name: str):
    """The demo pool's first 300 rows, and a pool folder holding the first `first` of them."""
    rows = pq.read_table(DEMO_POOL).slice(0, 300)
    pool = tmp_path / "pool"
    pool.mkdir()
    pq.write_table(rows.slice(0, first), pool / name)
    return rows, pool


def embeddings(run_dir, side):
    """(ids, vectors) of a side, in row order (read back by the test)."""
    from raysift.jobs.core.pool import load_pool, read_vector_range
    from raysift.jobs.core.storage import Store

    pool = load_pool(Store.local(run_dir), side)
    return pool_table(run_dir, side, ["id"])["id"].to_pylist(), read_vector_range(pool, 0, pool.n)


def _table(path):
    return pq.read_table(path).select(["id", "rank", "score", "probability"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_curate_embeds_only_new_rows_and_matches_a_run_on_the_union(ray_cluster, tmp_path):
    rows, pool = _pool(tmp_path, 240, "2026-11-01.parquet")
    tsds = {"tsds": {"mode": "exact", "shards": 2, "cpus_per_shard": 0.5}}
    cfg = _config(tmp_path, "curated", pool, "tsds", **tsds)

    first = run_curate(cfg, log=lambda m: None)
    assert first["version"] == 1 and first["rows_embedded"]["candidates"] == 240
    assert first["new_files"] == [str(pool / "2026-11-01.parquet")]

    pq.write_table(rows.slice(240, 60), pool / "2026-11-02.parquet")  # the pool grows
    second = run_curate(cfg, log=lambda m: None)
    assert second["version"] == 2 and second["new_version"]
    assert second["new_files"] == [str(pool / "2026-11-02.parquet")]
    assert second["rows_added"] == 60 and second["pool"] == 300
    assert second["rows_embedded"] == {"targets": 0, "candidates": 60}  # only the new rows
    # what the second run opened: the new file (ingest), its one part (embed: one chunk)
    assert second["appended"] and second["files_read"] == 1 and second["parts_written"] == 1
    assert second["chunks_embedded"] == {"targets": 0, "candidates": 1}
    manifest = json.loads((tmp_path / "curated" / "manifest.json").read_text())
    assert manifest["stages"]["embed"]["candidates"]["rows_reused"] == 240

    versions = tmp_path / "curated" / "curate"
    v1 = _table(versions / "v0001" / "selection.parquet")
    v2 = _table(versions / "v0002" / "selection.parquet")
    diff = json.loads((versions / "v0002" / "diff.json").read_text())
    ids1, ids2 = set(v1.column("id").to_pylist()), set(v2.column("id").to_pylist())
    assert diff["previous"] == 1 and diff["kept"] == len(ids1 & ids2)
    assert set(diff["added"]) == ids2 - ids1 and set(diff["removed"]) == ids1 - ids2

    stamp = (versions / "latest.json").stat().st_mtime_ns
    third = run_curate(cfg, log=lambda m: None)  # nothing new: nothing written
    assert third == {"version": 2, "new_version": False}
    assert not (versions / "v0003").exists()
    assert (versions / "latest.json").stat().st_mtime_ns == stamp

    # From scratch on the union, another folder, one FAISS shard: the same selection.
    union = tmp_path / "union"
    union.mkdir()
    pq.write_table(rows, union / "all.parquet")
    scratch = _config(
        tmp_path, "scratch", union, "tsds", tsds={"mode": "exact", "cpus_per_shard": 0.5}
    )
    run(scratch, log=lambda m: None)
    fresh = _table(tmp_path / "scratch" / "selection.parquet")
    assert fresh.select(["id", "rank"]).equals(v2.select(["id", "rank"]))
    for col in ("score", "probability"):  # fp32 vectors from other batches: last bits only
        np.testing.assert_allclose(fresh.column(col).to_numpy(), v2.column(col).to_numpy(), 1e-5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gotd_c_transform_scores_new_rows_against_the_stored_potential(ray_cluster, tmp_path):
    rows, pool = _pool(tmp_path, 200, "a.parquet")
    gotd = {"gotd": {"epsilon": 0.1, "threshold": 0.01, "cpus_per_shard": 0.5}}
    cfg = _config(tmp_path, "inc", pool, "gotd", **gotd)
    cfg.curate.gotd = "c_transform"
    first = run_curate(cfg, log=lambda m: None)
    assert first["select"] == {"method": "gotd", "incremental": False}  # nothing to extend yet
    run_dir = tmp_path / "inc"
    f = pq.read_table(run_dir / "gotd_potential.parquet").column("f").to_numpy()

    pq.write_table(rows.slice(200, 100), pool / "b.parquet")
    second = run_curate(cfg, log=lambda m: None)
    assert second["select"]["incremental"] and second["rows_embedded"]["candidates"] == 100
    assert second["select"]["parts_read"] == 1  # only the new part's vectors were read
    v1 = pq.read_table(run_dir / "curate/v0001/selection.parquet")
    v2 = pq.read_table(run_dir / "curate/v0002/selection.parquet")

    # Independently: g_j = eps log(1/N) - eps LSE_i((f_i - C_ij)/eps) with C = squared distance.
    ids, vecs = embeddings(run_dir, "candidates")
    t_ids, t_vecs = embeddings(run_dir, "targets")
    order = pq.read_table(run_dir / "gotd_potential.parquet").column("id").to_pylist()
    y = t_vecs[[list(t_ids).index(i) for i in order]].astype(np.float64)
    vec = dict(zip(ids, vecs.astype(np.float64), strict=True))
    new = set(rows.slice(200, 100).column("id").to_pylist())
    n, eps = 300, 0.1
    for row in v2.to_pylist():
        if row["id"] in new:
            c = ((y - vec[row["id"]]) ** 2).sum(1)
            g = eps * np.log(1 / n) - eps * torch.logsumexp(torch.tensor((f - c) / eps), 0).item()
            assert row["score"] == pytest.approx(-(1 + 1 / n) * g, rel=1e-4, abs=1e-5)
    # Old rows keep their order among themselves; the ranking is by score.
    old_in_v2 = [i for i in v2.column("id").to_pylist() if i not in new]
    v1_order = [i for i in v1.column("id").to_pylist() if i in set(old_in_v2)]
    assert old_in_v2 == v1_order
    assert np.all(np.diff(v2.column("score").to_numpy()) <= 0)

    # The exact mode re-solves on the union; report how close the fast mode came.
    shutil.copytree(run_dir / "embeddings", tmp_path / "exact" / "embeddings")
    exact = _config(tmp_path, "exact", pool, "gotd", **gotd)
    run(exact, log=lambda m: None)
    full = set(pq.read_table(tmp_path / "exact" / "selection.parquet").column("id").to_pylist())
    overlap = len(full & set(v2.column("id").to_pylist())) / 30
    print(f"c_transform vs resolve: {overlap:.0%} of the 30 selected rows shared")
    assert overlap >= 0.5
