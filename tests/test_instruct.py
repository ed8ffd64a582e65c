"""Instruction data end to end on a local cluster: a messages-format pool (the packaged slice,
demo/instruct/) through ingest, selection with knn, rds and less, the fine-tune (assistant turns
only) and the evaluation (assistant-token perplexity and the harness's task metric, multiple
choice and exact match), on the tiny Llama (its tokenizer has no chat template: the fallback
template). The SmolLM2 numbers come from benchmarks/finetune_eval.py --instruct."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from raysift.jobs.config import load_config
from tests.conftest import REPO, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
INSTRUCT = REPO / "demo" / "instruct"


def _config(folder, tiny_lm, target: str, **evaluate):
    return load_config(write_config(
        folder / "c.yaml", output_dir=str(folder / "run"),
        candidates={"path": str(INSTRUCT / "pool.jsonl"), "messages_column": "messages",
                    "keep_columns": ["task", "label"], "limit": 150},
        targets={"path": str(INSTRUCT / f"{target}.targets.jsonl"),
                 "messages_column": "messages", "limit": 8},
        embed={"precision": "fp32", "cpus_per_actor": 0.5},
        select={"budget": 16, "lm_hidden": {"precision": "fp32", "num_actors": 1,
                                            "cpus_per_actor": 0.5},
                "less": {"warmup_fraction": 0.1, "warmup_epochs": 1, "proj_dim": 16,
                         "max_length": 32, "num_actors": 1, "cpus_per_actor": 0.5,
                         "lora": {"r": 4, "modules": ["q_proj"]}}},
        finetune={"model": str(tiny_lm), "max_steps": 2, "batch_size": 4, "max_length": 48},
        evaluate={"heldout": {"path": str(INSTRUCT / f"{target}.heldout.jsonl"),
                              "messages_column": "messages"}, "max_texts": 6,
                  "oracle": False, "max_length": 48, **evaluate},
        ray={"num_cpus": 2},
    ))  # fmt: skip


def test_chat_pool_runs_and_evaluates_end_to_end(tmp_path, tiny_lm, ray_cluster):
    from raysift.jobs.pipeline import run
    from raysift.jobs.workflows.evaluate import run_evaluate

    cfg = _config(tmp_path, tiny_lm, "define_animals",
                  methods=["knn", "rds", "less"], seeds=[0])  # fmt: skip
    run_dir = run(cfg.model_copy(update={"stages": ["ingest", "embed", "select", "finetune"]}),
                  log=lambda m: None)  # fmt: skip
    rows = [json.loads(x) for x in (run_dir / "selected.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert rows[0]["text"].startswith("User: ")  # the conversation as text: ids, DSIR, encoder
    tokens = pq.read_table(run_dir / "finetune" / "tokens")
    for ids, labels in zip(tokens["input_ids"].to_pylist(), tokens["labels"].to_pylist(),
                           strict=True):  # fmt: skip
        scored = [i for i, y in zip(ids, labels, strict=True) if y != -100]
        assert 0 < len(scored) < len(ids)  # the assistant's tokens only

    result = json.loads((run_evaluate(cfg, log=lambda m: None) / "evaluation.json").read_text())
    assert [r["method"] for r in result["runs"]] == ["knn", "rds", "less"]
    assert result["heldout"]["task_metric"] == "multiple_choice"
    assert result["base"]["task_metric"]["metric"] == "acc"
    for r in result["runs"]:
        task = r["task_metric"]
        assert task["items"] == 6 and 0 <= task["value"] <= 1 and task["seconds"] > 0
        assert r["perplexity"] > 1
    summary = result["summary"]
    assert summary["rds"]["representation"] == "lm_hidden" and summary["less"]["seeds"] == 1
    report = (run_dir / "report.html").read_text()
    assert "acc" in report and "rds" in report

    # exact match on the debian_sections target's held-out questions
    other = tmp_path / "em"
    other.mkdir()
    em = _config(other, tiny_lm, "debian_sections", methods=["random"], task_metric="exact_match")
    result = json.loads((run_evaluate(em, log=lambda m: None) / "evaluation.json").read_text())
    assert result["runs"][0]["task_metric"]["metric"] == "exact_match"
