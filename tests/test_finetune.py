"""The fine-tune stage (Ray Train) and the evaluation job, on a tiny random Llama: plumbing only —
resume after a kill, reuse, restart on new rows, and the evaluation's perplexity checked against
an independent computation. The real-model numbers are in BENCHMARKS.md."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from .conftest import DEMO_POOL, DEMO_TARGETS, REPO, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
HELDOUT = REPO / "demo" / "heldout.jsonl"


def rows_file(path: Path, n: int, start: int = 0) -> Path:
    texts = pq.read_table(DEMO_POOL, columns=["text"]).column("text").to_pylist()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[start : start + n]))
    return path


def finetune_config(tmp_path: Path, model: Path, **finetune) -> Path:
    return write_config(
        tmp_path / "c.yaml",
        output_dir=str(tmp_path / "run"),
        seed=3,
        candidates={"path": str(DEMO_POOL), "id_column": "id"},
        targets={"path": str(DEMO_TARGETS)},
        ray={"num_cpus": 2},
        finetune={"model": str(model), "batch_size": 4, "lora_dropout": 0.0,
                  "cpus_per_worker": 1, "torch_threads": 1, **finetune},
    )  # fmt: skip


def raysift(*args, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "raysift", *map(str, args)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: the kill takes Ray's processes too
    )  # fmt: skip


def registered_checkpoint(train_dir: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has committed to its snapshot, if any."""
    try:
        snap = json.loads((train_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return None
    latest = snap.get("latest_checkpoint_result")
    return latest["metrics"]["step"] if latest else None


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "finetune" / "model" / "adapter_model.safetensors")


def _wait_for_checkpoint(proc: subprocess.Popen, train_dir: Path, after: int = 0) -> int:
    """The step of a checkpoint Ray Train registered past `after`, while `proc` runs."""
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        step = registered_checkpoint(train_dir)
        if step is not None and step > after:
            return step
        time.sleep(0.2)
    raise AssertionError(proc.communicate()[0][-2000:])


def _group_gone(pgid: int) -> bool:
    """No process of the group is left (Ray's included), after a grace period."""
    for _ in range(60):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.timeout(600)
def test_interrupted_and_killed_runs_resume_from_their_checkpoints(tmp_path, tiny_lm, ray_cluster):
    """Ctrl-C a fine-tune (off a terminal: step/loss lines; then one line, exit 130, the stage
    `interrupted`, Ray's processes gone), SIGKILL the rerun, resume: the adapter equals an
    uninterrupted run's. A new torch_threads (execution only) reuses the model."""
    steps = 40
    rows_file(tmp_path / "run" / "selected.jsonl", 48)
    cfg = finetune_config(tmp_path, tiny_lm, max_steps=steps, checkpoint_every=5)
    train_dir = tmp_path / "run" / "finetune" / "ray" / "train"
    manifest = tmp_path / "run" / "manifest.json"

    first = raysift("finetune", cfg, env={"RAYSIFT_PROGRESS_SECONDS": "0"})
    interrupted_at = _wait_for_checkpoint(first, train_dir)
    first.send_signal(signal.SIGINT)  # the driver only, as a terminal's Ctrl-C reaches it
    lines = first.communicate(timeout=120)[0].splitlines()
    assert first.returncode == 130, lines[-15:]
    assert [x for x in lines if "interrupted" in x] == [
        "raysift: interrupted by SIGINT during finetune; what was committed is kept: run the "
        "same command again to resume"
    ]
    assert json.loads(manifest.read_text())["stages"]["finetune"]["status"] == "interrupted"
    progress = [x for x in lines if x.startswith("raysift: finetune: ") and "/40 steps" in x]
    assert progress and all(", loss " in x and "last checkpoint" in x for x in progress), lines
    assert _group_gone(first.pid), "Ray processes outlived the interrupted run"

    second = raysift("finetune", cfg)  # resumes, and dies harder
    killed_at = _wait_for_checkpoint(second, train_dir, after=interrupted_at)
    os.killpg(second.pid, signal.SIGKILL)  # driver, raylet, GCS and the Train workers
    second.wait()
    assert not (tmp_path / "run" / "finetune" / "result.json").exists()
    killed_at = registered_checkpoint(train_dir)
    assert interrupted_at < killed_at < steps

    # The rerun (here on the shared cluster: the CLI path ran above) resumes from the checkpoint.
    from raysift.jobs.config import load_config
    from raysift.jobs.pipeline import run

    run(load_config(cfg), ["finetune"], log=lambda m: None)
    entry = json.loads(manifest.read_text())["stages"]["finetune"]
    assert entry["resumed_from_step"] >= killed_at > 0  # from the checkpoint, not from zero
    assert entry["steps"] == steps
    logged = [s for s, _ in entry["losses"]]
    assert logged == list(range(5, steps + 1, 5))  # the history before the kills survived

    # The same steps uninterrupted give the same adapter: resume trains what the run would have.
    from raysift.jobs.finetune import run_finetune

    whole = tmp_path / "whole"
    rows_file(whole / "run" / "selected.jsonl", 48)
    cfg_whole = finetune_config(whole, tiny_lm, max_steps=steps, checkpoint_every=5)
    assert run_finetune(load_config(cfg_whole), whole / "run")["steps"] == steps
    resumed, uninterrupted = adapter(tmp_path / "run"), adapter(whole / "run")
    assert resumed.keys() == uninterrupted.keys()
    for name, value in resumed.items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=1e-4, atol=1e-6)

    # Execution-only settings are not in the fingerprint: the finished model is reused.
    faster = load_config(cfg, ["finetune.torch_threads=2", "finetune.cpus_per_worker=0.5"])
    assert run_finetune(faster, tmp_path / "run").get("reused") is True


def test_rerun_reuses_and_new_rows_start_from_step_zero(tmp_path, tiny_lm, ray_cluster):
    from raysift.jobs.config import load_config
    from raysift.jobs.finetune import run_finetune

    run = tmp_path / "run"
    rows_file(run / "selected.jsonl", 16)
    cfg = load_config(finetune_config(tmp_path, tiny_lm, epochs=2, checkpoint_every=3))
    first = run_finetune(cfg, run)
    assert first["steps"] == 8 and first["resumed_from_step"] == 0  # 2 epochs x 16 / 4
    assert run_finetune(cfg, run)["reused"]
    rows_file(run / "selected.jsonl", 16, start=100)  # a new selection: old checkpoints are stale
    again = run_finetune(cfg, run)
    assert "reused" not in again and again["resumed_from_step"] == 0 and again["steps"] == 8
    assert (run / "finetune" / "model" / "adapter_config.json").is_file()


def test_two_workers_with_a_last_batch_shorter_than_the_workers(tmp_path, tiny_lm, ray_cluster):
    """5 rows, 2 workers x 2 rows: step 2 has one row, so worker 1 joins DDP with a zero loss."""
    from raysift.jobs.config import load_config
    from raysift.jobs.finetune import run_finetune

    run = tmp_path / "run"
    rows_file(run / "selected.jsonl", 5)
    cfg = load_config(
        finetune_config(tmp_path, tiny_lm, batch_size=2, num_workers=2, cpus_per_worker=0.5)
    )
    info = run_finetune(cfg, run)
    assert info["steps"] == 2 and info["workers"] == 2
    assert all(math.isfinite(loss) for _, loss in info["losses"])


def test_full_finetune_writes_a_loadable_model(tmp_path, tiny_lm, ray_cluster):
    from raysift.engine.lm import load_finetuned
    from raysift.jobs.config import load_config
    from raysift.jobs.finetune import run_finetune

    run = tmp_path / "run"
    rows_file(run / "selected.jsonl", 8)
    cfg = load_config(finetune_config(tmp_path, tiny_lm, method="full", max_steps=2))
    run_finetune(cfg, run)
    model, _ = load_finetuned(str(tiny_lm), run / "finetune" / "model")
    base, _ = load_finetuned(str(tiny_lm), tiny_lm)
    moved = [
        not torch.equal(a, b)
        for a, b in zip(model.parameters(), base.parameters(), strict=True)
    ]  # fmt: skip
    assert any(moved)


def independent_perplexity(model, tokenizer, texts: list[str], max_length: int) -> float:
    """exp of the token-weighted mean of transformers' own per-text loss, one text at a time."""
    total = count = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            # the end token first, then the cut: a truncated text has no end token
            ids = torch.tensor([(ids + [tokenizer.eos_token_id])[:max_length]])
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


@pytest.mark.timeout(600)  # ~2 min alone; CI machines are shared
def test_evaluate_end_to_end_and_its_perplexity(tmp_path, tiny_lm, ray_cluster):
    import pyarrow as pa

    from raysift.engine.lm import load_finetuned
    from raysift.jobs.config import load_config
    from raysift.jobs.workflows.evaluate import run_evaluate

    pool = pq.read_table(DEMO_POOL).slice(0, 400)
    pq.write_table(pool, tmp_path / "pool.parquet")
    targets = [json.loads(x) for x in DEMO_TARGETS.read_text().splitlines()[:30]]
    pq.write_table(pa.Table.from_pylist(targets), tmp_path / "targets.parquet")
    cfg = load_config(
        write_config(
            tmp_path / "c.yaml",
            output_dir=str(tmp_path / "run"),
            candidates={"path": str(tmp_path / "pool.parquet"), "id_column": "id",
                        "keep_columns": ["source", "label"]},
            targets={"path": str(tmp_path / "targets.parquet"), "keep_columns": ["label"]},
            embed={"num_actors": 1, "cpus_per_actor": 0.5, "max_length": 64},
            ray={"num_cpus": 2},
            select={"budget": 24, "dsir": {"min_example_length": 3}},
            finetune={"model": str(tiny_lm), "batch_size": 8, "max_length": 32,
                      "cpus_per_worker": 0.5},
            evaluate={"heldout": {"path": str(HELDOUT), "limit": 12},
                      "methods": ["knn", "dsir"], "seeds": [1], "oracle": False,
                      "target_rows": {"source": ["debian_pkg"]}, "max_length": 32},
        )
    )  # fmt: skip
    run_dir = run_evaluate(cfg, log=lambda m: None)
    result = json.loads((run_dir / "evaluation.json").read_text())
    # (the oracle run is covered by test_watch's demo run, the spread over seeds by
    # test_watch.py::test_summary_over_seeds: fine-tunes fewer here)
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [("knn", 1), ("dsir", 1)]
    assert result["summary"]["knn"]["seeds"] == 1 and result["summary"]["knn"]["vs_random"] is None
    for r in result["runs"]:  # the share is the selection's rows from the target's source
        chosen = pq.read_table(run_dir / r["folder"] / "selection.parquet").column("source")
        assert r["share_from_target"] == pytest.approx(
            sum(s == "debian_pkg" for s in chosen.to_pylist()) / 24
        )
        assert 0 <= r["label_tv"] <= 1

    heldout = [json.loads(x)["text"] for x in HELDOUT.read_text().splitlines()[:12]]
    run = next(r for r in result["runs"] if r["method"] == "knn" and r["seed"] == 1)
    model, tokenizer = load_finetuned(str(tiny_lm), run_dir / run["folder"] / "finetune" / "model")
    assert run["perplexity"] == pytest.approx(
        independent_perplexity(model.eval(), tokenizer, heldout, 32), rel=1e-5
    )
    report = (run_dir / "report.html").read_text()
    assert report.count("<svg") >= 4 and "no fine-tune" in report and "knn" in report
    assert "± 0.00" not in report and "<td>1</td><td>" in report  # one seed: no spread shown
    chosen = report.split("What each method chose")[1]
    for method in ("knn", "dsir"):  # its first 5 texts, best first
        block = chosen.split(f"<h3>{method}</h3>")[1].split("</ol>")[0]
        first = json.loads((run_dir / "evaluate" / f"{method}-seed1" / "selected.jsonl")
                           .read_text().splitlines()[0])  # fmt: skip
        assert block.count("<li>") == 5 and first["source"] in block

    # The paired comparison on the same held-out texts, and who to trust (one line).
    d = result["paired"]["knn"]["dsir"]
    assert d["low"] <= d["diff"] <= d["high"]
    assert d["diff"] == pytest.approx(
        result["summary"]["knn"]["perplexity_mean"] - result["summary"]["dsir"]["perplexity_mean"])
    assert result["paired"]["dsir"]["knn"]["diff"] == pytest.approx(-d["diff"])
    assert result["verdict"].startswith(("trust ", "no clear winner: "))
    assert result["verdict"] in report and "Paired differences" in report
    assert all(r["selection_cost"]["seconds"] > 0 for r in result["runs"])

    # A rerun reuses every fine-tune and perplexity: same numbers (the selection, seconds, reruns).
    again = json.loads((run_evaluate(cfg, log=lambda m: None) / "evaluation.json").read_text())
    for runs in (again["runs"], result["runs"]):
        for r in runs:
            r.pop("selection_cost")
    assert again["runs"] == result["runs"] and again["paired"] == result["paired"]


def test_run_with_finetune_in_stages(tmp_path, tiny_lm, ray_cluster):
    """`raysift run` with `finetune` listed: select's rows go straight into Ray Train."""
    from raysift.jobs.cli import main

    cfg = write_config(
        tmp_path / "c.yaml",
        output_dir=str(tmp_path / "run"),
        candidates={"path": str(DEMO_POOL), "id_column": "id", "limit": 60},
        targets={"path": str(DEMO_TARGETS), "limit": 10},
        stages=["ingest", "embed", "select", "finetune"],
        embed={"cpus_per_actor": 0.5, "max_length": 32},
        ray={"num_cpus": 2},
        select={"method": "knn", "budget": 12},
        finetune={"model": str(tiny_lm), "max_steps": 2, "cpus_per_worker": 0.5},
    )
    assert main(["run", str(cfg)]) == 0
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert stages["finetune"]["status"] == "done" and stages["finetune"]["rows"] == 12
    assert (tmp_path / "run" / "finetune" / "model" / "adapter_model.safetensors").is_file()
