"""The pipeline: a list of stages, each with one job, run in order over one run folder.

    ingest   candidates and targets -> data/<side>/ parts + _index.json (Ray tasks per piece)
    embed    data/<side>/ parts -> embeddings/<side>/<digest>/ chunks     (actor pool, resumable)
    select   the partitioned pool -> selection.parquet + selected.jsonl  (per-part tasks, shards)
    finetune selected.jsonl -> finetune/model (LoRA adapter or model)     (Ray Train, resumable)

Each stage records status, rows and seconds in manifest.json. A finished stage whose inputs are
unchanged is skipped on a rerun; embed resumes inside the stage, chunk by chunk. The driver plans
and merges: it reads the pool's index, never its rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from raysift.engine.embed import resolve_model_path
from raysift.engine.lm import resolve_lm_path
from raysift.jobs.cluster import check_ray_address
from raysift.jobs.config import Config, to_yaml
from raysift.jobs.console import attach, say
from raysift.jobs.embed import embed_sides
from raysift.jobs.errors import InputError, describe
from raysift.jobs.finetune import check_finetune, run_finetune
from raysift.jobs.ingest import check_input, fingerprint, ingest_side
from raysift.jobs.pool import INDEX, load_pool
from raysift.jobs.runfolder import Manifest, RunFolder, clean_leftovers, write_text
from raysift.jobs.runlock import hold
from raysift.jobs.runtime import interruption, start_ray
from raysift.jobs.select import check_budget, needs_embed_stage, run_select
from raysift.jobs.select import checks as select_checks
from raysift.jobs.storage import Store, open_run
from raysift.jobs.vectors import SIDES, check_vectors_ready, embeddings_current

STAGES = ("ingest", "embed", "select", "finetune")


def run_ingest(cfg: Config, run_dir: Path, append: bool = False) -> dict:
    store = Store.for_run(run_dir)
    info = {}
    for side in SIDES:
        spec = getattr(cfg, side)
        counts = ingest_side(spec, side, store, side, cfg.ingest, append)
        info[side] = {**counts, "spec": spec.model_dump(mode="json")}
    dims = {side: info[side]["dim"] for side in SIDES}
    if dims["candidates"] != dims["targets"]:
        raise InputError(
            f"candidates.vector_column: {cfg.candidates.vector_column!r} in {cfg.candidates.path} "
            f"has dimension {dims['candidates']}, targets.vector_column "
            f"{cfg.targets.vector_column!r} in {cfg.targets.path} has {dims['targets']}"
        )
    return info


def run_embed(cfg: Config, run_dir: Path) -> dict:
    return embed_sides(Store.for_run(run_dir), SIDES, cfg.embed)


def ingest_is_current(cfg: Config, run_dir: Path, manifest: Manifest) -> bool:
    """True when the last ingest finished with the same input specs and unchanged input files."""
    entry = manifest.stage("ingest")
    if entry.get("status") != "done":
        return False
    store = Store.for_run(run_dir)
    for side in SIDES:
        spec = getattr(cfg, side)
        if not store.is_file(RunFolder.data(side, INDEX)):
            return False
        previous = entry.get(side, {})
        if previous.get("spec") != spec.model_dump(mode="json"):
            return False
        if previous.get("inputs") != fingerprint(check_input(spec, side)):
            return False
    return True


def embed_is_current(cfg: Config, run_dir: Path, manifest: Manifest) -> dict | None:
    """The embed stage's manifest entry when the last embed finished and every row still has its
    vector (nothing to embed), else None."""
    if manifest.stage("embed").get("status") != "done":
        return None
    return embeddings_current(Store.for_run(run_dir), cfg.embed)


RUNNERS: dict[str, Callable[[Config, Path], dict]] = {
    "ingest": run_ingest,
    "embed": run_embed,
    "select": run_select,
    "finetune": run_finetune,
}
NEEDS_RAY = {"ingest", "embed", "select"}  # finetune starts Ray after its own checks


def check_layout(store: Store) -> None:
    """A run folder of the layout before partitioned pools is refused with what to do."""
    for side in SIDES:
        if store.is_file(f"data/{side}.parquet"):
            load_pool(store, side)  # raises the one-line explanation


def preflight(cfg: Config, stages: list[str], run_dir: Path, data: Store | None = None) -> None:
    """Every check that needs no cluster, before one starts: a typo fails in a second. (The run
    folder itself was made by its lock, `jobs.runlock.hold`, which removes it again when a check
    fails and nothing else is in it.)"""
    check_ray_address(cfg.ray.address)
    if "embed" in stages and not cfg.candidates.vector_column:
        try:
            resolve_model_path(cfg.embed.model)
        except FileNotFoundError as exc:
            raise InputError(str(exc)) from None
    if "finetune" in stages and "select" not in stages:
        check_finetune(cfg, run_dir / RunFolder.SELECTED)
    elif "finetune" in stages:  # the rows come from this run's select: check the model now
        try:
            resolve_lm_path(cfg.finetune.model)
        except FileNotFoundError as exc:
            raise InputError(str(exc)) from None
    if "select" in stages:
        select_checks(cfg)  # the method's and its representation's (the tables' records)
    if "ingest" in stages:
        for side in SIDES:
            check_input(getattr(cfg, side), side)
    store = data or Store.for_run(run_dir)
    check_layout(store)
    if "ingest" not in stages and stages != ["finetune"]:
        for side in SIDES:
            load_pool(store, side)  # the index exists (run the ingest stage first, else)
        if "select" in stages:
            check_budget(cfg, load_pool(store, "candidates"))
            if "embed" not in stages and needs_embed_stage(cfg):
                for side in SIDES:
                    check_vectors_ready(store, side, cfg.embed)


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
    stages = [s for s in STAGES if s in (stages or cfg.stages)]
    with hold(cfg.output_dir) as lock:  # one writer per run folder
        return _run(cfg, stages, log, data, append, lock)


def _run(cfg: Config, stages: list[str], log, data: Store | None, append: bool, lock) -> Path:
    run_dir, remote = open_run(cfg.output_dir)  # a URI: a local mirror, synced as files land
    preflight(cfg, stages, run_dir, data)
    clean_leftovers(run_dir)
    attach(run_dir)
    write_text(run_dir / RunFolder.CONFIG, to_yaml(cfg))
    manifest = Manifest(run_dir, cfg.model_dump(mode="json"), cfg.seed)
    manifest.save()
    for stage in stages:
        if lock is not None:
            lock.check()  # an object-store lock taken over: stop before the next stage
        if stage == "embed" and "select" in stages and not needs_embed_stage(cfg):
            plan = cfg.plan()
            what = f"on {plan.representation}" if plan.representation else "needs no embeddings"
            log(f"embed: skipped, {cfg.select.method} {what}")
            continue
        if stage == "ingest" and ingest_is_current(cfg, run_dir, manifest):
            log("ingest: inputs unchanged since the last run, reusing data/")
            continue
        reused = stage == "embed" and embed_is_current(cfg, run_dir, manifest)
        if reused:  # recorded as a finished stage that embedded nothing
            manifest.finish(stage, manifest.start(stage), **reused)
            log("embed: every row has its vector, reusing embeddings/")
            continue
        if stage in NEEDS_RAY:
            start_ray(cfg.ray)
        log(f"{stage}: running")
        t0 = manifest.start(stage)
        try:
            if stage == "select":
                info = run_select(cfg, run_dir, data, log)
            elif stage == "ingest":
                info = run_ingest(cfg, run_dir, append)
            else:
                info = RUNNERS[stage](cfg, run_dir)
        except BaseException as exc:
            stopped = interruption(exc)
            if stopped is not None:
                stopped.stage = stopped.stage or stage
                manifest.interrupt(stage, stopped.name)
                if remote is not None:
                    remote.sync()
                raise stopped from None
            manifest.fail(stage, describe(exc))
            if remote is not None:
                remote.sync()
            raise
        manifest.finish(stage, t0, **info)
        if remote is not None:
            remote.sync()
        log(f"{stage}: done in {manifest.stage(stage)['seconds']:.1f} s")
    return run_dir
