"""GradEx through Ray on a local cluster: meta-init (Ray Train), gradients (Ray Data actors),
estimates, the chosen sources, validation fine-tunes, resume, and the select stage. The model is
the tiny Llama (plumbing); the SmolLM2 numbers come from benchmarks/gradex_validate.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysift.engine import gradex as gx
from raysift.engine import lm
from raysift.engine.baselines import random_select
from raysift.jobs.config import load_config
from raysift.jobs.methods.gradex import load_target, load_train, shard_files
from raysift.jobs.pipeline import run
from raysift.jobs.workflows.gradex_estimate import run_estimate

from .conftest import DEMO_POOL, DEMO_TARGETS, pool_table, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PER_SOURCE = 4
TARGET_TEXTS = 3


def _config(tmp_path, tiny_lm, name="run", **gradex):
    return load_config(
        write_config(
            tmp_path / f"{name}.yaml",
            output_dir=str(tmp_path / name),
            candidates={"path": str(DEMO_POOL), "id_column": "id", "keep_columns": ["source"]},
            targets={"path": str(DEMO_TARGETS), "limit": 20},
            stages=["ingest", "select"],
            select={
                "method": "gradex",
                "budget": 40,
                "gradex": {
                    "rows_per_source": PER_SOURCE,
                    "target_texts": TARGET_TEXTS,
                    "projection_dim": 16,
                    "subsets": 15,
                    "max_length": 24,
                    "rows_per_call": 8,
                    **gradex,
                },
            },
            finetune={
                "model": str(tiny_lm),
                "max_length": 24,
                "batch_size": 4,
                "learning_rate": 0.01,
            },
        )  # fmt: skip
    )


@pytest.fixture(scope="module")
def estimated(tmp_path_factory, tiny_lm, ray_cluster):
    tmp = tmp_path_factory.mktemp("gradex")
    cfg = _config(tmp, tiny_lm)
    run_dir = run_estimate(cfg, validate_n=2, log=lambda m: None)
    return cfg, run_dir


def test_estimate_writes_gradients_estimates_and_choice(estimated):
    cfg, run_dir = estimated
    g = run_dir / "gradex"
    sample = pq.read_table(g / "sample.parquet")
    names = sorted(set(sample.column("source").to_pylist()))
    assert len(names) == 6 and sample.num_rows == 6 * PER_SOURCE
    train = load_train(g, sample, names)
    assert train.G.shape == (6 * PER_SOURCE, 16) and np.isfinite(train.G).all()
    # one target row per scored token: every token after the first, the end token included
    _, tok = lm.load_lm(cfg.finetune.model)
    texts = [json.loads(x)["text"] for x in DEMO_TARGETS.read_text().splitlines()[:TARGET_TEXTS]]
    tokens = sum(len(lm.encode_text(tok, t, 24).input_ids) - 1 for t in texts)
    targets = pool_table(run_dir, "targets", ["id"]).column("id").to_pylist()
    target = load_target(g, targets[:TARGET_TEXTS])
    assert len(target.f0) == tokens
    # the stored estimates are the engine's offset estimates from the stored gradients
    est = pq.read_table(g / "estimates.parquet")
    subsets = np.array(
        [[int(n in row) for n in names] for row in est.column("sources").to_pylist()]
    )
    assert len(subsets) == 15 and (subsets.sum(1) == 3).all()
    again = target.loss(gx.offset_weights(train, subsets, cfg.select.gradex.l2))
    np.testing.assert_allclose(est.column("estimated_loss").to_numpy(), again, rtol=1e-10)
    result = json.loads((g / "result.json").read_text())
    sources = pq.read_table(g / "sources.parquet").to_pylist()
    chosen = [s["source"] for s in sources if s["chosen"]]
    assert result["chosen"] == chosen and len(chosen) == 2  # ceil(0.25 x 6)
    best = sorted(sources, key=lambda s: (s["ensemble_score"], s["source"]))[:2]
    assert {s["source"] for s in best} == set(chosen)


def test_validation_compares_estimates_with_real_finetunes(estimated):
    cfg, run_dir = estimated
    v = json.loads((run_dir / "gradex" / "validation.json").read_text())
    assert v["subsets"] == 2 and len(v["runs"]) == 2
    for r in v["runs"]:
        assert len(r["sources"]) == 3 and r["steps"] == 3  # 12 rows / batch 4, from theta*
        assert r["real_loss"] > 0 and r["estimated_loss"] > 0 and r["train_cpu_seconds"] > 0
    real = np.array([r["real_loss"] for r in v["runs"]])
    assert v["estimator"]["mean_relative_error"] == pytest.approx(
        float(np.mean(np.abs(np.array([r["estimated_loss"] for r in v["runs"]]) - real) / real))
    )
    assert v["constant"]["spearman"] is None  # a constant has no rank
    assert v["cpu_seconds_per_estimate"] > 0 and v["speedup_per_estimate"] > 1
    assert set(v["other_estimators"]) >= {"reference", "reference_fast", "functional"}
    # every validation fine-tune started from theta*, the meta-initialisation's adapter
    config = (run_dir / "gradex" / "validation" / "000" / "config.yaml").read_text()
    assert "init_adapter: " + str(run_dir / "gradex" / "meta" / "finetune" / "model") in config


def test_rerun_reuses_everything_and_recomputes_only_a_lost_shard(estimated, tiny_lm):
    cfg, run_dir = estimated
    g = run_dir / "gradex"
    before = pq.read_table(g / "estimates.parquet")
    lost = shard_files(g / "gradients" / "train")[0]
    lost_rows = pq.read_metadata(lost).num_rows
    lost.unlink()  # a run killed while that shard was in flight
    run_estimate(cfg, log=lambda m: None)
    result = json.loads((g / "result.json").read_text())
    assert result["gradients"]["train"]["rows_reused"] == 6 * PER_SOURCE - lost_rows
    assert result["gradients"]["target"]["rows_reused"] == TARGET_TEXTS
    assert result["meta"]["steps"] == 6  # the meta-init was reused, not retrained
    after = pq.read_table(g / "estimates.parquet")
    np.testing.assert_allclose(
        after.column("estimated_loss").to_numpy(), before.column("estimated_loss").to_numpy(),
        rtol=1e-5,
    )  # fmt: skip


def test_actor_batching_does_not_change_the_gradients(estimated, tmp_path, tiny_lm):
    cfg, run_dir = estimated
    other = _config(tmp_path, tiny_lm, rows_per_call=5, chunk=3)
    shutil.copytree(run_dir / "data", tmp_path / "run" / "data")
    shutil.copytree(run_dir / "gradex" / "meta", tmp_path / "run" / "gradex" / "meta")
    run_estimate(other, log=lambda m: None)
    sample = pq.read_table(run_dir / "gradex" / "sample.parquet")
    names = sorted(set(sample.column("source").to_pylist()))
    a = load_train(run_dir / "gradex", sample, names)
    b = load_train(tmp_path / "run" / "gradex", sample, names)
    np.testing.assert_allclose(a.G, b.G, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.f0, b.f0, rtol=1e-5)
    assert (
        json.loads((tmp_path / "run" / "gradex" / "result.json").read_text())["chosen"]
        == json.loads((run_dir / "gradex" / "result.json").read_text())["chosen"]
    )


def test_parallel_validation_equals_sequential(estimated, tmp_path, tiny_lm):
    """Two validation fine-tunes at a time (Ray tasks launching Ray Train runs) give the runs
    one at a time gave: the same subsets, steps and real losses."""
    cfg, run_dir = estimated
    shutil.copytree(run_dir / "data", tmp_path / "run" / "data")
    for part in ("meta", "gradients"):  # theta* and its gradients: only the fine-tunes rerun
        shutil.copytree(run_dir / "gradex" / part, tmp_path / "run" / "gradex" / part)
    other = _config(tmp_path, tiny_lm, validate_parallel=2)
    run_estimate(other, validate_n=2, log=lambda m: None)  # one round of two
    a = json.loads((run_dir / "gradex" / "validation.json").read_text())["runs"]
    b = json.loads((tmp_path / "run" / "gradex" / "validation.json").read_text())["runs"]
    assert len(a) == len(b) == 2
    assert [r["sources"] for r in a] == [r["sources"] for r in b]
    assert [r["steps"] for r in a] == [r["steps"] for r in b]
    np.testing.assert_allclose([r["real_loss"] for r in a], [r["real_loss"] for r in b], rtol=1e-5)


def test_select_stage_takes_the_chosen_sources_rows(estimated, tmp_path, tiny_lm):
    cfg, run_dir = estimated
    shutil.copytree(run_dir, tmp_path / "run", symlinks=True)
    sub = _config(tmp_path, tiny_lm)
    run(sub, log=lambda m: None)
    chosen = json.loads((tmp_path / "run" / "gradex" / "result.json").read_text())["chosen"]
    sel = pq.read_table(tmp_path / "run" / "selection.parquet")
    pool = pq.read_table(DEMO_POOL, columns=["source"]).column("source").to_pylist()
    assert sel.num_rows == min(40, sum(s in chosen for s in pool))
    assert set(sel.column("source").to_pylist()) <= set(chosen)
    lines = (tmp_path / "run" / "selected.jsonl").read_text().splitlines()
    assert len(lines) == sel.num_rows
    # the same config and seed select the same rows
    first = sel.column("id").to_pylist()
    run(sub, ["select"], log=lambda m: None)
    assert pq.read_table(tmp_path / "run" / "selection.parquet").column("id").to_pylist() == first
    # the all-sources baseline at a budget is the random baseline: the same seeded id-hash order
    run(_config(tmp_path, tiny_lm, strategy="all"), ["select"], log=lambda m: None)
    ids = np.asarray(pool_table(tmp_path / "run", "candidates", ["id"]).column("id").to_pylist())
    expected = ids[random_select(ids, 40, cfg.seed).indices].tolist()
    assert (
        pq.read_table(tmp_path / "run" / "selection.parquet").column("id").to_pylist() == expected
    )


def test_evaluate_compares_gradex_with_random_sources(tmp_path, tiny_lm, ray_cluster):
    """`evaluate.methods` takes gradex and its baselines: each run fine-tunes the base model on
    the budget's rows of its sources, and the report has a row for each. (gradex-all is the
    random baseline at the budget: test_select_stage_takes_the_chosen_sources_rows.)"""
    from raysift.jobs.workflows.evaluate import run_evaluate

    cfg = load_config(
        write_config(
            tmp_path / "c.yaml",
            output_dir=str(tmp_path / "run"),
            candidates={"path": str(DEMO_POOL), "id_column": "id", "limit": 400,
                        "keep_columns": ["source", "label"]},
            targets={"path": str(DEMO_TARGETS), "limit": 20},
            embed={"max_length": 32},
            select={"budget": 16, "gradex": {"rows_per_source": 3, "target_texts": 2,
                                             "projection_dim": 8, "subsets": 10,
                                             "max_length": 24}},
            finetune={"model": str(tiny_lm), "batch_size": 8, "max_length": 24},
            evaluate={"heldout": {"path": str(DEMO_TARGETS), "limit": 4}, "oracle": False,
                      "methods": ["gradex", "gradex-random"],
                      "target_rows": {"source": ["debian_pkg"]}, "max_length": 24},
        )
    )  # fmt: skip
    run_dir = run_evaluate(cfg, log=lambda m: None)
    result = json.loads((run_dir / "evaluation.json").read_text())
    assert [r["method"] for r in result["runs"]] == ["gradex", "gradex-random"]
    pool = pool_table(run_dir, "candidates", ["source"])
    n_sources = len(set(pool.column("source").to_pylist()))
    for r in result["runs"]:
        sel = pq.read_table(run_dir / r["folder"] / "selection.parquet")
        sources = set(sel.column("source").to_pylist())
        assert sel.num_rows == 16 and r["steps"] == 2
        assert len(sources) <= -(-n_sources // 4)  # ceil(0.25 x sources) sources
    # only the estimating run computed gradients
    assert (run_dir / "evaluate" / "gradex-seed0" / "gradex" / "validation").exists() is False
    assert (run_dir / "evaluate" / "gradex-seed0" / "gradex" / "estimates.parquet").is_file()
    assert not (run_dir / "evaluate" / "gradex-random-seed0" / "gradex").exists()
    assert "gradex-random" in (run_dir / "report.html").read_text()
