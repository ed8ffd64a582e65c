"""The pipeline: a list of stages, each with one job, run in order over one run folder.

    ingest   candidates and targets -> data/<side>/ parts + _index.json (Ray tasks per piece)
    embed    data/<side>/ parts -> embeddings/<side>/<digest>/ chunks     (actor pool, resumable)
    select   the partitioned pool -> selection.parquet + selected.jsonl  (per-part tasks, shards)
    finetune selected.jsonl -> finetune/model (LoRA adapter or model)     (Ray Train, resumable)

Each stage is a record (`jobs.stages.base.Stage`: its checks, its "is the committed result
current" test, its run); this module runs the records in order and knows none by name. Each
stage records status, rows and seconds in manifest.json. A finished stage whose inputs are
unchanged is skipped on a rerun; embed resumes inside the stage, chunk by chunk. The driver plans
and merges: it reads the pool's index, never its rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from raysift.jobs.cluster import check_ray_address
from raysift.jobs.config import Config, to_yaml
from raysift.jobs.core.console import attach, say
from raysift.jobs.core.errors import describe
from raysift.jobs.core.pool import load_pool
from raysift.jobs.core.runfolder import Manifest, RunFolder, clean_leftovers, write_text
from raysift.jobs.core.runlock import hold
from raysift.jobs.core.storage import Store, open_run
from raysift.jobs.runtime import interruption, start_ray
from raysift.jobs.stages import embed, finetune, ingest, select
from raysift.jobs.stages.base import Stage, StageRun
from raysift.jobs.vectors import SIDES

STAGES: tuple[Stage, ...] = (ingest.STAGE, embed.STAGE, select.STAGE, finetune.STAGE)
NAMES = tuple(stage.name for stage in STAGES)


def check_layout(store: Store) -> None:
    """A run folder of the layout before partitioned pools is refused with what to do."""
    for side in SIDES:
        if store.is_file(f"data/{side}.parquet"):
            load_pool(store, side)  # raises the one-line explanation


def preflight(run: StageRun) -> None:
    """Every check that needs no cluster, before one starts: a typo fails in a second. (The run
    folder itself was made by its lock, `jobs.core.runlock.hold`, which removes it again when a
    check fails and nothing else is in it.)"""
    check_ray_address(run.cfg.ray.address)
    check_layout(run.pool_store)
    for stage in STAGES:
        if stage.name in run.stages:
            stage.checks(run)


def run(
    cfg: Config,
    stages: list[str] | None = None,
    log: Callable[[str], None] = say,
    data: Store | None = None,
    append: bool = False,
) -> Path:
    """Run `stages` (default: the config's) in pipeline order; returns the run folder. `data`:
    where the ingested pool lives when it is not this run folder (`raysift evaluate`'s runs
    select and fine-tune from the shared one; only select and finetune run then). `append`:
    ingest only new input files, after the pool's rows (`raysift curate`)."""
    names = [n for n in NAMES if n in (stages or cfg.stages)]
    with hold(cfg.output_dir) as lock:  # one writer per run folder
        return _run(cfg, names, log, data, append, lock)


def _run(cfg: Config, names: list[str], log, data: Store | None, append: bool, lock) -> Path:
    run_dir, remote = open_run(cfg.output_dir)  # a URI: a local mirror, synced as files land
    ctx = StageRun(cfg, run_dir, names, data, log, append)
    preflight(ctx)
    clean_leftovers(run_dir)
    attach(run_dir)
    write_text(run_dir / RunFolder.CONFIG, to_yaml(cfg))
    manifest = Manifest(run_dir, cfg.model_dump(mode="json"), cfg.seed)
    manifest.save()
    for stage in (s for s in STAGES if s.name in names):
        if lock is not None:
            lock.check()  # an object-store lock taken over: stop before the next stage
        reuse = stage.current(ctx, manifest)
        if reuse is not None:
            if reuse.info is not None:
                manifest.finish(stage.name, manifest.start(stage.name), **reuse.info)
            log(reuse.message)
            continue
        if stage.needs_ray:
            start_ray(cfg.ray)
        log(f"{stage.name}: running")
        t0 = manifest.start(stage.name)
        try:
            info = stage.run(ctx)
        except BaseException as exc:
            stopped = interruption(exc)
            if stopped is not None:
                stopped.stage = stopped.stage or stage.name
                manifest.interrupt(stage.name, stopped.name)
                if remote is not None:
                    remote.sync()
                raise stopped from None
            manifest.fail(stage.name, describe(exc))
            if remote is not None:
                remote.sync()
            raise
        manifest.finish(stage.name, t0, **info)
        if remote is not None:
            remote.sync()
        log(f"{stage.name}: done in {manifest.stage(stage.name)['seconds']:.1f} s")
    return run_dir
