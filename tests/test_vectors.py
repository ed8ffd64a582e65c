"""Bring your own vectors: `candidates.vector_column` / `targets.vector_column` make the embed
stage commit the given vectors instead of running a model; every bad vector exits 2 with one
line naming the file and the column."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysift.engine.baselines import knn_select
from raysift.jobs import cli

from .conftest import pool_table, write_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("ray_cluster")]
RNG = np.random.default_rng(7)
X = RNG.standard_normal((60, 8)).astype(np.float32) * 3
Q = RNG.standard_normal((4, 8)).astype(np.float32)


def table(x, prefix="c", vectors=None):
    vec = vectors if vectors is not None else [list(map(float, v)) for v in x]
    return pa.table({"text": [f"{prefix} {i}" for i in range(len(vec))], "emb": vec})


def config(tmp_path, candidates, targets, **sections):
    return write_config(
        tmp_path / "c.yaml",
        output_dir=str(tmp_path / "run"),
        candidates={"path": str(candidates), "vector_column": "emb"},
        targets={"path": str(targets), "vector_column": "emb"},
        select={"method": "knn", "budget": 10},
        **sections,
    )


def read_vectors(run):
    from raysift.jobs.core.pool import load_pool, read_vector_range
    from raysift.jobs.core.storage import Store

    pool = load_pool(Store.local(run), "candidates")
    return read_vector_range(pool, 0, pool.n)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "hf"])
def test_given_vectors_are_committed_and_selected_on(tmp_path, fmt):
    cand, targ = tmp_path / f"pool.{fmt}", tmp_path / "targets.parquet"
    if fmt == "parquet":  # a fixed-size list column
        vec = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), 8)
        pq.write_table(table(X, vectors=vec), cand)
    elif fmt == "jsonl":  # lists of numbers
        cand.write_text("".join(json.dumps(r) + "\n" for r in table(X).to_pylist()))
    else:  # a datasets folder: a Sequence(float) column
        from datasets import Dataset

        Dataset.from_dict(table(X).to_pydict()).save_to_disk(str(cand))
    pq.write_table(table(Q, "t"), targ)
    assert cli.main(["run", str(config(tmp_path, cand, targ))]) == 0
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["embed"]["candidates"]["source"] == "precomputed:emb"
    vectors = read_vectors(run)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)  # normalize: true (the default)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(vectors, unit, rtol=1e-5, atol=1e-6)
    ids = np.asarray(pool_table(run, columns=["id"])["id"].to_pylist())
    want = knn_select(unit, Q / np.linalg.norm(Q, axis=1, keepdims=True), ids, 10)
    got = pq.read_table(run / "selection.parquet")
    assert got["row"].to_pylist() == want.indices.tolist()


def test_normalize_false_keeps_the_norms_and_a_change_recommits(tmp_path):
    cand, targ = tmp_path / "pool.parquet", tmp_path / "targets.parquet"
    pq.write_table(table(X), cand)
    pq.write_table(table(Q, "t"), targ)
    cfg = config(tmp_path, cand, targ, embed={"normalize": False})
    assert cli.main(["run", str(cfg)]) == 0
    np.testing.assert_allclose(read_vectors(tmp_path / "run"), X, rtol=1e-6)
    assert cli.main(["embed", str(cfg), "--set", "embed.normalize=true"]) == 0
    stage = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["embed"]
    assert stage["candidates"]["shards_discarded"] >= 1
    assert stage["candidates"]["rows_embedded"] == 60
    norms = np.linalg.norm(read_vectors(tmp_path / "run"), axis=1)
    np.testing.assert_allclose(norms, 1, rtol=1e-6)


def _bad(tmp_path, candidates: pa.Table, targets: pa.Table | None = None):
    pq.write_table(candidates, tmp_path / "pool.parquet")
    pq.write_table(targets if targets is not None else table(Q, "t"), tmp_path / "t.parquet")
    return config(tmp_path, tmp_path / "pool.parquet", tmp_path / "t.parquet")


COLUMN = "column 'emb' (candidates.vector_column)"


def ragged(tmp_path):
    vec = [list(map(float, v)) for v in X]
    vec[17] = vec[17][:5]
    expected = f"pool.parquet: row 17: {COLUMN} has 5 values where the first row has 8 (ragged"
    return _bad(tmp_path, table(X, vectors=vec)), expected


def dimension_across_sides(tmp_path):
    cfg = _bad(tmp_path, table(X), table(Q[:, :4], "t"))
    return cfg, "candidates.vector_column: 'emb' in "


def dimension_across_files(tmp_path):
    (tmp_path / "pool").mkdir()
    pq.write_table(table(X[:30]), tmp_path / "pool" / "a.parquet")
    pq.write_table(table(X[30:, :6], "d"), tmp_path / "pool" / "b.parquet")
    pq.write_table(table(Q, "t"), tmp_path / "t.parquet")
    cfg = config(tmp_path, tmp_path / "pool", tmp_path / "t.parquet")
    return cfg, f"b.parquet: {COLUMN} has dimension 6, "


def nan(tmp_path):
    x = X.copy()
    x[3, 2] = np.inf
    return _bad(tmp_path, table(x)), f"pool.parquet: row 3: {COLUMN} has NaN or inf"


def zero(tmp_path):
    x = X.copy()
    x[41] = 0
    return _bad(tmp_path, table(x)), f"pool.parquet: row 41: {COLUMN} is a zero vector"


def not_numeric(tmp_path):
    strings = table(X).set_column(1, "emb", pa.array([["a", "b"]] * len(X)))
    expected = f"pool.parquet: {COLUMN}: expected a list of floats, got list<element: string>"
    return _bad(tmp_path, strings), expected


def not_numeric_jsonl(tmp_path):
    lines = [json.dumps({"text": f"c {i}", "emb": [1.0, 2.0]}) for i in range(10)]
    lines[6] = json.dumps({"text": "c 6", "emb": "a string"})
    (tmp_path / "pool.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(table(Q[:, :2], "t"), tmp_path / "t.parquet")
    return config(tmp_path, tmp_path / "pool.jsonl", tmp_path / "t.parquet"), "pool.jsonl: "


def one_side_only(tmp_path):
    _bad(tmp_path, table(X))
    cfg = write_config(
        tmp_path / "c.yaml",
        output_dir=str(tmp_path / "run"),
        candidates={"path": str(tmp_path / "pool.parquet"), "vector_column": "emb"},
        targets={"path": str(tmp_path / "t.parquet")},  # embedded by the model
    )
    return cfg, "targets.vector_column: candidates bring their own vectors, targets do not"


CASES = [ragged, dimension_across_sides, dimension_across_files, nan, zero, not_numeric,
         not_numeric_jsonl, one_side_only]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_vectors_exit_2_naming_file_and_column(tmp_path, case, capsys):
    cfg, expected = case(tmp_path)
    code = cli.main(["run", str(cfg)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2, err
    assert sum(ln.startswith("raysift: error") for ln in err) == 1, err
    assert err[-1].startswith("raysift: error: ") and expected in err[-1], err[-1]
    assert not (tmp_path / "run" / "embeddings").exists()  # nothing committed
