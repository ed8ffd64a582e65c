"""`raysift estimate`: GradEx's source estimates on their own, and their validation against real
fine-tunes (`--validate N`): a workflow over the GradEx method (`jobs.methods.gradex`), the
pipeline's ingest, the fine-tune stage and the evaluation's held-out scorer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from raysift.engine import gradex as gx
from raysift.jobs.config import Config, to_yaml
from raysift.jobs.core.runfolder import RunFolder, write_json, write_jsonl, write_text
from raysift.jobs.core.runlock import writes_run_folder
from raysift.jobs.finetune import run_finetune
from raysift.jobs.methods.gradex import Estimator, _sub_config, check_static, estimate_sources
from raysift.jobs.pipeline import run
from raysift.jobs.workflows.evaluate import Heldout, heldout_scores

# -- validation -----------------------------------------------------------------------------------


def validate(cfg: Config, run_dir: Path, n: int, log=print) -> dict:
    """Fine-tune `n` sampled subsets for real from theta* (Ray Train) and compare with the
    estimates; writes gradex/validation.json."""

    g = cfg.select.gradex
    out = estimate_sources(cfg, run_dir, log)
    names, est, gdir, sample = out["names"], out["estimator"], out["gdir"], out["sample"]
    subsets = gx.sample_subsets(len(names), n, out["size"], cfg.seed + 1)
    c0, e0 = est.cpu_seconds, est.estimates
    estimated = est(subsets)
    per_estimate = (est.cpu_seconds - c0) / max(1, est.estimates - e0)
    src = np.asarray(sample.column("source").to_pylist())
    todo = []
    for i, subset in enumerate(subsets):
        folder = gdir / "validation" / f"{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        chosen = [names[j] for j in np.flatnonzero(subset)]
        rows = folder / "rows.jsonl"
        write_jsonl(rows, sample.filter(pa.array(np.isin(src, chosen))).select(["id", "text"]))
        sub = _sub_config(
            cfg, folder, init_adapter=str(out["adapter"].resolve()), epochs=g.validate_epochs,
            learning_rate=g.validate_learning_rate or cfg.finetune.learning_rate, max_steps=None,
        )  # fmt: skip
        write_text(folder / RunFolder.CONFIG, to_yaml(sub))
        todo.append((chosen, sub, folder, rows))
    infos = _finetunes(todo, g.validate_parallel, log)
    losses: list[float] = []
    runs = []
    for i, ((chosen, _, folder, _), info) in enumerate(zip(todo, infos, strict=True)):
        loss = _real_loss(cfg, folder, est.texts)
        losses.append(loss)
        runs.append({"sources": chosen, "estimated_loss": float(estimated[i]), "real_loss": loss,
                     "steps": info["steps"], "train_seconds": info["train_seconds"],
                     "train_cpu_seconds": info.get("cpu_seconds")})  # fmt: skip
    base = est.target.base_loss()
    real = np.array(losses)
    metrics = gx.Validation(estimated, real, base).metrics()
    cpu_ft = [r["train_cpu_seconds"] for r in runs if r["train_cpu_seconds"] is not None]
    result = {
        "estimator_name": g.estimator,
        "projection_dim": g.projection_dim,
        "l2": g.l2,
        "sources": names,
        "subset_size": out["size"],
        "target_loss_at_theta_star": base,
        **metrics,
        "cpu_seconds_per_estimate": per_estimate,
        "cpu_seconds_per_finetune": float(np.mean(cpu_ft)) if cpu_ft else None,
        "speedup_per_estimate": float(np.mean(cpu_ft)) / per_estimate
        if cpu_ft and per_estimate > 0
        else None,
        "gradient_wall_seconds_once": out["result"]["gradients"]["seconds"],
        "other_estimators": _compare(cfg, out, subsets, real, base),
        "runs": runs,
    }
    write_json(gdir / "validation.json", result)
    return result


def _finetune_task(tree: dict, folder: str, rows: str) -> dict:
    """One validation fine-tune, as a Ray task (Ray Train starts its own workers from it)."""
    return run_finetune(Config.model_validate(tree), Path(folder), Path(rows))


def _finetunes(todo: list, parallel: int, log) -> list[dict]:
    """Run the validation fine-tunes, `parallel` at a time (Ray tasks launching Ray Train runs;
    each run's workers take their resources from finetune.*): in order, one by one, when 1."""
    import ray

    if parallel <= 1:
        infos = []
        for i, (chosen, sub, folder, rows) in enumerate(todo):
            log(f"gradex: validation fine-tune {i + 1}/{len(todo)} on {', '.join(chosen)}")
            infos.append(run_finetune(sub, folder, rows))
        return infos
    launch = ray.remote(num_cpus=0)(_finetune_task)
    refs: dict = {}
    pending: list = []
    for i, (_, sub, folder, rows) in enumerate(todo):
        if len(pending) >= parallel:
            _, pending = ray.wait(pending, num_returns=1)
        ref = launch.remote(sub.model_dump(mode="json"), str(folder), str(rows))
        refs[i] = ref
        pending.append(ref)
    log(f"gradex: {len(todo)} validation fine-tunes, {parallel} at a time")
    return ray.get([refs[i] for i in range(len(todo))])


L2_SCAN = (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def _compare(cfg: Config, out: dict, subsets, real: np.ndarray, base: float) -> dict:
    """The same validation subsets through every other estimator, and the offset estimator over a
    range of l2 (each against the same real fine-tunes): what the choice of estimator and lambda
    does. Cheap next to the fine-tunes (the functional one runs forward passes)."""
    est = out["estimator"]
    g = cfg.select.gradex
    found = {}
    shared = est  # the model and P^T P are loaded / computed once for every estimator
    for name in gx.ESTIMATORS:
        if name == g.estimator:
            continue
        other = cfg.model_copy(deep=True)
        other.select.gradex.estimator = name  # type: ignore[assignment]  # one of ESTIMATORS
        e = Estimator(other, out["adapter"], est.grads, est.target, est.texts, like=shared)
        shared = e if e.gram is not None else shared
        t0 = time.process_time()
        values = e(subsets)
        found[name] = {
            **gx.Validation(values, real, base).metrics()["estimator"],
            "cpu_seconds_per_estimate": max(e.cpu_seconds, time.process_time() - t0) / len(subsets),
        }
    scan, by_lam = {}, {}
    for lam in L2_SCAN:
        by_lam[lam] = est.target.loss(gx.offset_weights(est.grads, subsets, lam), g.c)
        scan[str(lam)] = gx.Validation(by_lam[lam], real, base).metrics()["estimator"]
    found["offset_l2_scan"] = scan
    # lambda calibrated on the first few real fine-tunes (lowest relative error there), scored
    # on the others only: what a user who calibrates on a handful of fine-tunes gets
    n_cal = max(1, len(real) // 6)
    if len(real) - n_cal >= 3:

        def err(lam):
            return float(np.mean(np.abs(by_lam[lam][:n_cal] - real[:n_cal]) / real[:n_cal]))

        lam = min(L2_SCAN, key=err)
        held = gx.Validation(by_lam[lam][n_cal:], real[n_cal:], base).metrics()["estimator"]
        found["offset_calibrated"] = {"l2": lam, "calibration_runs": n_cal,
                                      "scored_runs": len(real) - n_cal, **held}  # fmt: skip
    return found


def _real_loss(cfg: Config, folder: Path, texts: list[str]) -> float:
    """Mean token cross-entropy on the target texts after a validation fine-tune: the
    evaluation's held-out scorer (cached under the fine-tune's fingerprint), at GradEx's
    max_length."""
    scored = cfg.model_copy(deep=True)
    scored.evaluate.max_length = cfg.select.gradex.max_length
    scores = heldout_scores(scored, folder / RunFolder.MODEL, Heldout(texts, None, []), folder)
    return scores["loss"]


@writes_run_folder
def run_estimate(cfg: Config, validate_n: int = 0, log: Callable[[str], None] = print) -> Path:
    """`raysift estimate`: ingest, then GradEx's source estimates (and --validate N)."""
    if cfg.select.method != "gradex":
        cfg = cfg.model_copy(update={"select": cfg.select.model_copy(update={"method": "gradex"})})
    check_static(cfg)
    run_dir = run(cfg, ["ingest"], log)  # checks the inputs before anything is written
    if validate_n:
        validate(cfg, run_dir, validate_n, log)
    else:
        estimate_sources(cfg, run_dir, log)
    return run_dir


