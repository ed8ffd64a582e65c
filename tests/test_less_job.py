"""LESS through Ray on a local cluster: the warm-up (Ray Train, a state per epoch), the feature
actors (committed chunk by chunk, resumed), the scores and the select stage. The model is the
tiny Llama (plumbing); the SmolLM2 numbers come from benchmarks/less_cost.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysift.engine import less
from raysift.jobs.config import load_config
from raysift.jobs.core.storage import Store
from raysift.jobs.finetune import epoch_state_name
from raysift.jobs.methods.less import WARMUP, committed_chunks, load_state, read_chunk
from raysift.jobs.pipeline import run

from .conftest import DEMO_POOL, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
POOL_ROWS = 60
BUDGET = 12


def _inputs(folder):
    """60 pool rows and 8 targets in two subtasks (python_code and debian texts kept out of the
    pool), written as files."""
    table = pq.read_table(DEMO_POOL)
    sources = np.asarray(table.column("source").to_pylist())
    names = sorted(set(sources))[:2]
    picks = [np.flatnonzero(sources == n)[:4] for n in names]
    held = np.concatenate(picks)
    rest = np.setdiff1d(np.arange(table.num_rows), held)[:POOL_ROWS]
    pool = folder / "pool.parquet"
    pq.write_table(table.take(pa.array(rest)), pool)
    targets = folder / "targets.jsonl"
    rows = table.take(pa.array(held)).to_pylist()
    targets.write_text("".join(json.dumps({"text": r["text"], "task": r["source"]}) + "\n"
                               for r in rows))  # fmt: skip
    return pool, targets


def _config(folder, tiny_lm, name="run", subtasks=True, **options):
    pool, targets = folder / "pool.parquet", folder / "targets.jsonl"
    return load_config(
        write_config(
            folder / f"{name}.yaml",
            output_dir=str(folder / name),
            candidates={"path": str(pool), "id_column": "id", "keep_columns": ["source"]},
            targets={"path": str(targets), "keep_columns": ["task"]},
            stages=["ingest", "select"],
            select={
                "method": "less",
                "budget": BUDGET,
                "less": {
                    "warmup_fraction": 0.2,
                    "warmup_epochs": 2,
                    "proj_dim": 16,
                    "max_length": 24,
                    "chunk_rows": 8,
                    "chunk": 4,
                    "num_actors": 1,
                    "learning_rate": 0.01,
                    "lora": {"r": 4, "alpha": 16, "modules": ["q_proj", "v_proj"]},
                    "subtask_column": "task" if subtasks else None,
                    **options,
                },
            },
            finetune={"model": str(tiny_lm), "batch_size": 4},
        )  # fmt: skip
    )


@pytest.fixture(scope="module")
def selected(tmp_path_factory, tiny_lm, ray_cluster):
    folder = tmp_path_factory.mktemp("less")
    _inputs(folder)
    cfg = _config(folder, tiny_lm)
    run(cfg, log=lambda m: None)
    return folder, cfg


def _manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())["stages"]["select"]


def _features(store: Store, root: str, checkpoints: int) -> np.ndarray:
    return np.concatenate([read_chunk(store, f"{root}/{rel}", checkpoints)
                           for rel in committed_chunks(store, root)])  # fmt: skip


def test_select_writes_the_warmup_states_features_and_the_top_rows(selected):
    folder, cfg = selected
    run_dir = folder / "run"
    info = _manifest(run_dir)
    assert info["warmup_rows"] == 12 and info["checkpoints"] == 2  # ceil(0.2 x 60), 2 epochs
    assert info["warmup_steps"] == 6  # 12 rows / batch 4, 2 epochs
    sources = sorted(set(pq.read_table(DEMO_POOL, columns=["source"]).column(0).to_pylist()))
    assert info["subtasks"] == sources[:2]
    assert info["chunks"] == 8 + 1  # 60 rows in chunks of 8, the 8 targets in one
    assert info["chunks_computed"] == 9 and info["chunks_reused"] == 0
    store = Store.local(run_dir)
    # each epoch's state carries the Adam moments of every LoRA weight, by name
    for e in (1, 2):
        state = load_state(store, f"{WARMUP}/finetune/epochs/{epoch_state_name(e)}")
        assert state["step"] == 3 * e and set(state["moments"]) == set(state["weights"])
        assert all(m.abs().sum() > 0 for m, _ in state["moments"].values())
    # the score: the engine's, from the stored features, is what was selected
    key = info["key"]
    C = 2
    F = _features(store, f"features/candidates/less-{key}", C)
    G = _features(store, f"features/targets/less-{key}", C)
    assert F.shape == (POOL_ROWS, C, 16) and G.shape == (8, C, 16)
    sel = pq.read_table(run_dir / "selection.parquet")
    assert sel.num_rows == BUDGET
    rows = sel.column("row").to_numpy()
    groups = np.array([0] * 4 + [1] * 4)  # the targets file: 4 of each task, sorted by name
    w = np.array(info["checkpoint_weights"])
    scores = less.scores(F, G, w, groups)  # F in part/row order: one input file
    np.testing.assert_allclose(sel.column("score").to_numpy(), scores[rows], rtol=1e-5)
    assert set(rows) == set(np.argsort(-scores, kind="stable")[:BUDGET])
    assert (np.diff(sel.column("score").to_numpy()) <= 0).all()


def test_rerun_recomputes_only_the_lost_chunk(selected):
    folder, cfg = selected
    run_dir = folder / "run"
    info = _manifest(run_dir)
    before = pq.read_table(run_dir / "selection.parquet")
    store = Store.local(run_dir)
    root = f"features/candidates/less-{info['key']}"
    lost = committed_chunks(store, root)[3]
    store.delete(f"{root}/{lost}")  # a run killed while that chunk was in flight
    run(cfg, ["select"], log=lambda m: None)
    again = _manifest(run_dir)
    assert again["chunks_computed"] == 1 and again["chunks_reused"] == 8
    assert pq.read_table(run_dir / "selection.parquet").equals(before)
    fp = run_dir / WARMUP / "finetune" / "result.json"
    assert json.loads(fp.read_text())["steps"] == 6  # the warm-up was reused, not retrained


def test_features_do_not_depend_on_the_actor_or_chunking(selected, tmp_path, tiny_lm):
    folder, _ = selected
    for name in ("pool.parquet", "targets.jsonl"):
        shutil.copy(folder / name, tmp_path / name)
    other = _config(tmp_path, tiny_lm, chunk_rows=5, chunk=3, num_actors=2)
    for sub in ("data", "less"):  # the same pool and warm-up (the rows and settings match: the
        shutil.copytree(folder / "run" / sub, tmp_path / "run" / sub)  # fine-tune is reused)
    run(other, ["select"], log=lambda m: None)
    a, b = _manifest(folder / "run"), _manifest(tmp_path / "run")
    assert a["key"] == b["key"]  # the same warm-up and projection
    C = 2
    fa = _features(Store.local(folder / "run"), f"features/candidates/less-{a['key']}", C)
    fb = _features(Store.local(tmp_path / "run"), f"features/candidates/less-{b['key']}", C)
    np.testing.assert_allclose(fa, fb, rtol=0, atol=1e-5)
    sa = pq.read_table(folder / "run" / "selection.parquet")
    sb = pq.read_table(tmp_path / "run" / "selection.parquet")
    assert sa.column("id").to_pylist() == sb.column("id").to_pylist()


def test_one_subtask_and_another_seed_reuse_the_features(selected, tiny_lm):
    folder, _ = selected
    cfg = _config(folder, tiny_lm, subtasks=False)
    cfg = cfg.model_copy(update={"seed": 5})
    run(cfg, ["select"], log=lambda m: None)
    info = _manifest(folder / "run")
    assert info["subtasks"] == ["all"] and info["chunks_computed"] == 0


def test_bad_subtask_column_is_one_line(selected, tiny_lm):
    from raysift.jobs.core.errors import InputError

    folder, _ = selected
    cfg = _config(folder, tiny_lm, subtask_column="nope")
    with pytest.raises(InputError, match=r"select\.less\.subtask_column: 'nope'"):
        run(cfg, ["select"], log=lambda m: None)


def test_evaluate_runs_less_with_one_warmup_and_one_feature_pass(selected, tmp_path, tiny_lm):
    """`raysift evaluate` with LESS over two seeds: the warm-up and the pool's features live
    beside the shared pool and are computed once; the report lists LESS."""
    from raysift.jobs.workflows.evaluate import run_evaluate

    folder, _ = selected
    cfg = load_config(
        write_config(
            tmp_path / "e.yaml",
            output_dir=str(tmp_path / "run"),
            candidates={"path": str(folder / "pool.parquet"), "id_column": "id",
                        "keep_columns": ["source"]},
            targets={"path": str(folder / "targets.jsonl")},
            select={"budget": BUDGET, "less": {
                "warmup_fraction": 0.2, "warmup_epochs": 2, "proj_dim": 16, "max_length": 24,
                "chunk_rows": 30, "num_actors": 1, "lora": {"r": 4, "modules": ["q_proj"]}}},
            finetune={"model": str(tiny_lm), "batch_size": 8, "max_length": 24},
            evaluate={"heldout": {"path": str(folder / "targets.jsonl"), "limit": 4},
                      "oracle": False, "methods": ["less"], "seeds": [0, 1],
                      "target_rows": {"source": ["debian_pkg"]}, "max_length": 24},
        )
    )  # fmt: skip
    run_dir = run_evaluate(cfg, log=lambda m: None)
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [("less", 0), ("less", 1)]
    first, second = (_manifest(run_dir / r["folder"]) for r in result["runs"])
    assert first["chunks_computed"] == 3 and second["chunks_computed"] == 0  # 2 pool + 1 target
    assert (run_dir / WARMUP / "finetune" / "epochs" / epoch_state_name(2)).is_file()
    assert not (run_dir / result["runs"][0]["folder"] / WARMUP).exists()
    sel = [pq.read_table(run_dir / r["folder"] / "selection.parquet").column("id").to_pylist()
           for r in result["runs"]]  # fmt: skip
    assert sel[0] == sel[1]  # the seed moves the fine-tune, not LESS's rows
    assert "less" in (run_dir / "report.html").read_text()
