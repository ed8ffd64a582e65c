"""The finetune stage's record: the training itself is `jobs.finetune` (Ray Train), which LESS's
warm-up and GradEx's meta-initialisation run too, below the methods."""

from __future__ import annotations

from raysift.jobs.core.runfolder import RunFolder
from raysift.jobs.finetune import check_finetune, check_model, run_finetune
from raysift.jobs.stages.base import Stage, StageRun, always_runs


def _checks(run: StageRun) -> None:
    if "select" not in run.stages:  # the rows are a finished selection: check them and the model
        check_finetune(run.cfg, run.run_dir / RunFolder.SELECTED)
        return
    check_model(run.cfg.finetune.model)  # the rows come from this run's select: the model now


STAGE = Stage(
    name="finetune",
    summary="selected.jsonl -> finetune/model (LoRA adapter or model) (Ray Train, resumable)",
    checks=_checks,
    current=always_runs,  # it resumes from its last checkpoint, and skips a finished identical run
    run=lambda run: run_finetune(run.cfg, run.run_dir),
    needs_ray=False,
)
