"""The pipeline: a list of stages, each with one job, run in order over one run folder.

    ingest   candidates and targets -> data/<side>.parquet          (Ray Data read + clean)
    embed    data/<side>.parquet -> embeddings/<side>/part-*.parquet (actor pool, resumable)
    select   embeddings -> selection.parquet + selected.jsonl        (engine method)
    finetune selected.jsonl -> finetune/model (LoRA adapter or model)  (Ray Train, resumable)

Each stage records status, rows and seconds in manifest.json. A finished stage whose inputs are
unchanged is skipped on a rerun; embed resumes inside the stage, shard by shard.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from engine.embed import resolve_model_path
from engine.lm import resolve_lm_path
from jobs.cluster import TOKEN_HELP, check_ray_address, token_present
from jobs.config import Config, to_yaml
from jobs.embed import SIDES, run_embed, shard_files
from jobs.errors import InputError
from jobs.finetune import check_finetune, run_finetune
from jobs.ingest import check_input, fingerprint, ingest_side, input_files
from jobs.runfolder import Manifest, clean_leftovers, write_parquet, write_text
from jobs.select import NEEDS_VECTORS, check_budget, run_select
from jobs.storage import open_run

STAGES = ("ingest", "embed", "select", "finetune")
RAY_ENV = {"HF_HUB_OFFLINE": "1"}


def start_ray(cfg: Config) -> None:
    """Join `ray.address`, or the cluster this process was submitted to (`ray job submit` sets
    RAY_ADDRESS for the driver), or start a local cluster; reuse the one this process has."""
    import ray

    os.environ.update(RAY_ENV)
    if not ray.is_initialized():
        kwargs: dict = {"include_dashboard": False, "log_to_driver": False}
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        if not in_job:  # a submitted job has its runtime env already; adding one conflicts
            kwargs["runtime_env"] = {"env_vars": RAY_ENV}
        address = cfg.ray.address or (os.environ.get("RAY_ADDRESS") if in_job else None)
        if address:
            check_ray_address(address)  # a dead address fails in seconds, not minutes
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as exc:
                hint = "" if token_present() else f"; no Ray auth token found: {TOKEN_HELP}"
                raise InputError(f"ray.address: {address}: {exc}{hint}") from None
        else:
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, **kwargs)
    configure_data()


def configure_data() -> None:
    """Ray Data settings every raysift driver uses."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # ingest keeps input order; `limit` takes the head
    # Raise the UDF's own exception (an InputError stays an InputError -> exit 2), not a wrapper.
    ctx.raise_original_map_exception = True


def run_ingest(cfg: Config, run_dir: Path) -> dict:
    info = {}
    for side in SIDES:
        spec = getattr(cfg, side)
        table, counts = ingest_side(spec, side)
        write_parquet(run_dir / "data" / f"{side}.parquet", table)
        info[side] = {**counts, "spec": spec.model_dump(mode="json")}
    return info


def ingest_is_current(cfg: Config, run_dir: Path, manifest: Manifest) -> bool:
    """True when the last ingest finished with the same input specs and unchanged input files."""
    entry = manifest.stage("ingest")
    if entry.get("status") != "done":
        return False
    for side in SIDES:
        spec = getattr(cfg, side)
        if not (run_dir / "data" / f"{side}.parquet").is_file():
            return False
        _, files = input_files(spec, side)  # preflight has checked the schemas already
        previous = entry.get(side, {})
        if previous.get("spec") != spec.model_dump(mode="json"):
            return False
        if previous.get("inputs") != fingerprint(files):
            return False
    return True


RUNNERS: dict[str, Callable[[Config, Path], dict]] = {
    "ingest": run_ingest,
    "embed": run_embed,
    "select": run_select,
    "finetune": run_finetune,
}
NEEDS_RAY = {"ingest", "embed"}


def preflight(cfg: Config, stages: list[str], run_dir: Path) -> None:
    """Every check that needs no cluster, before one starts: a typo fails in a second."""
    check_ray_address(cfg.ray.address)
    if "embed" in stages:
        try:
            resolve_model_path(cfg.embed.model)
        except FileNotFoundError as exc:
            raise InputError(str(exc)) from None
    if "finetune" in stages and "select" not in stages:
        check_finetune(cfg, run_dir / "selected.jsonl")
    elif "finetune" in stages:  # the rows come from this run's select: check the model now
        try:
            resolve_lm_path(cfg.finetune.model)
        except FileNotFoundError as exc:
            raise InputError(str(exc)) from None
    if "select" in stages and cfg.select.method == "gradex":
        from jobs.gradex import check_static

        check_static(cfg)
    if "ingest" in stages:
        for side in SIDES:
            check_input(getattr(cfg, side), side)
        return
    if stages == ["finetune"]:
        return
    for side in SIDES:
        if not (run_dir / "data" / f"{side}.parquet").is_file():
            raise InputError(f"{run_dir}: no data/{side}.parquet; run the ingest stage first")
    if "select" in stages:
        check_budget(cfg, run_dir)
        if "embed" not in stages and cfg.select.method in NEEDS_VECTORS:
            for side in SIDES:
                if not shard_files(run_dir / "embeddings" / side):
                    raise InputError(f"{run_dir}: no embeddings/{side}; run the embed stage first")


def run(cfg: Config, stages: list[str] | None = None, log: Callable[[str], None] = print) -> Path:
    """Run `stages` (default: the config's) in pipeline order; returns the run folder."""
    stages = [s for s in STAGES if s in (stages or cfg.stages)]
    run_dir, remote = open_run(cfg.output_dir)  # a URI: a local mirror, synced as files land
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"output_dir: {run_dir} exists and is not a folder")
    preflight(cfg, stages, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(run_dir)
    write_text(run_dir / "config.yaml", to_yaml(cfg))
    manifest = Manifest(run_dir, cfg.model_dump(mode="json"), cfg.seed)
    manifest.save()
    for stage in stages:
        if stage == "ingest" and ingest_is_current(cfg, run_dir, manifest):
            log("ingest: inputs unchanged since the last run, reusing data/")
            continue
        if stage in NEEDS_RAY:  # select and finetune start Ray themselves, after their checks
            start_ray(cfg)
        log(f"{stage}: running")
        t0 = manifest.start(stage)
        try:
            info = RUNNERS[stage](cfg, run_dir)
        except BaseException as exc:
            manifest.fail(stage, f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
            if remote is not None:
                remote.sync()
            raise
        manifest.finish(stage, t0, **info)
        if remote is not None:
            remote.sync()
        log(f"{stage}: done in {manifest.stage(stage)['seconds']:.1f} s")
    return run_dir
