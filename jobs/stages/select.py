"""Select stage: the partitioned pool + a method -> `selection.parquet` and `selected.jsonl`.

The config's plan names the selector, the representation (for knn, tsds, gotd) and the
aggregation (`jobs.config.Plan`); the method and representation tables (`jobs.methods`) hold what
each does. The stage prepares the representation -- the embed stage's vectors, or a
representation the select stage computes (lm_hidden, less), committed chunk by chunk and reused --
and hands the selector a `Context`: the pool and the targets reading that representation, the
options, where outputs go. The work that grows with the pool runs where the pool is: per-part
tasks whose best-first lists merge in a tree of tasks (random, knn, GradEx's rows), or shard
actors that load their own row ranges from the run folder (TSDS's FAISS shards, GOT-D's Sinkhorn
shards). The driver plans and merges; what it holds grows with the budget B and the targets M,
never with the pool N.

`selection.parquet` has the same columns for every method: id, row (the pool's dense row
number), rank (0 = best), score, probability (null where the method has none), count (null
unless the method samples with replacement), then the carried source columns. `selected.jsonl`
holds the selected rows with their text, in rank order, as the fine-tune stage reads them; both
are fetched by row number from the parts that hold them. TSDS also writes `probabilities/`: its
support (the rows with p > 0), written by the shards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from raysift.actors.partitions import fetch_rows
from raysift.engine.selection import Selection
from raysift.jobs.config import Config
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.pool import Pool, load_pool, row_columns
from raysift.jobs.core.runfolder import RunFolder, write_jsonl, write_parquet
from raysift.jobs.core.storage import Store
from raysift.jobs.methods import METHODS, REPRESENTATIONS, Context
from raysift.jobs.stages.base import Stage, StageRun, always_runs
from raysift.jobs.vectors import SIDES, check_vectors_ready

GOTD_POTENTIAL = RunFolder.GOTD_POTENTIAL


def needs_embed_stage(cfg: Config) -> bool:
    """Whether the select stage reads the embed stage's vectors (embedding, vectors)."""
    rep = cfg.plan().representation
    return rep is not None and REPRESENTATIONS[rep].embed_stage


def check_budget(cfg: Config, pool: Pool) -> int:
    """The pool size, from the pool index; the budget must fit in it."""
    if cfg.select.budget > pool.n:
        raise InputError(
            f"select.budget: {cfg.select.budget} is larger than the pool ({pool.n} candidates)"
        )
    return pool.n


def checks(cfg: Config) -> None:
    """The method's and its representation's static checks (before Ray, before any write)."""
    plan = cfg.plan()
    METHODS[plan.method].checks(cfg)
    if plan.representation is not None:
        REPRESENTATIONS[plan.representation].checks(cfg)


def run_select(
    cfg: Config, run_dir: Path, data: Store | None = None, log: Callable[[str], None] = print
) -> dict:
    """Select with the configured method; `data` is where the pool lives (default: this run
    folder; `raysift evaluate`'s runs select from the shared one)."""
    out = Store.for_run(run_dir)
    data = data or out
    pool, targets = load_pool(data, "candidates"), load_pool(data, "targets")
    check_budget(cfg, pool)
    plan = cfg.plan()
    method = METHODS[plan.method]
    if method.needs & {"vectors", "texts"} and targets.n == 0:  # they select for the targets
        raise InputError(f"{data.uri_of('data/targets')}: no target rows (empty target set)")
    ctx = Context(cfg, pool, targets, run_dir, out, log)
    represented: dict = {}
    if plan.representation is not None:
        t0 = time.perf_counter()
        ctx.pool, ctx.targets, represented = REPRESENTATIONS[plan.representation].prepare(ctx)
        represented["representation_seconds"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    sel = method.select(ctx)
    seconds = round(time.perf_counter() - t0, 3)
    if sel.potential is not None:
        target_ids = fetch_rows(targets, np.arange(targets.n), ["id"]).column("id")
        write_parquet(
            run_dir / GOTD_POTENTIAL,
            pa.table({"id": target_ids, "f": pa.array(sel.potential, pa.float32())}),
        )
    info = write_selection(ctx, sel)
    info.update(represented, selector=plan.selector, representation=plan.representation,
                aggregation=plan.aggregation, selector_seconds=seconds)  # fmt: skip
    return info


def write_selection(ctx: Context, sel: Selection) -> dict:
    """selection.parquet and selected.jsonl: the B chosen rows, fetched by row number."""
    keep = list(ctx.cfg.candidates.keep_columns)
    rows = fetch_rows(ctx.pool, sel.indices, ["id", *row_columns(ctx.pool), *keep])
    table = selection_table(sel, rows, keep)
    write_parquet(ctx.run_dir / RunFolder.SELECTION, table)
    selected = rows.append_column("rank", table.column("rank"))
    write_jsonl(ctx.run_dir / RunFolder.SELECTED, selected)
    return {"method": ctx.cfg.select.method, "rows": len(sel.indices), "pool": ctx.pool.n,
            **sel.info}  # fmt: skip


def selection_table(sel: Selection, rows: pa.Table, keep: list[str]) -> pa.Table:
    """selection.parquet's columns for the chosen rows (`rows`: their id and keep columns)."""
    n = len(sel.indices)
    return pa.table(
        {
            "id": rows.column("id"),
            "row": pa.array(sel.indices, pa.int64()),
            "rank": pa.array(np.arange(n, dtype=np.int64)),
            "score": pa.array(sel.score, pa.float64()),
            "probability": pa.array(sel.probability, pa.float64())
            if sel.probability is not None
            else pa.nulls(n, pa.float64()),
            "count": pa.array(sel.count, pa.int64())
            if sel.count is not None
            else pa.nulls(n, pa.int64()),
            **{c: rows.column(c) for c in keep},
        }
    )


def _checks(run: StageRun) -> None:
    cfg = run.cfg
    checks(cfg)  # the method's and its representation's (the tables' records)
    if "ingest" in run.stages:
        return
    store = run.pool_store
    for side in SIDES:
        load_pool(store, side)  # the index exists (run the ingest stage first, else)
    check_budget(cfg, load_pool(store, "candidates"))
    if "embed" not in run.stages and needs_embed_stage(cfg):
        for side in SIDES:
            check_vectors_ready(store, side, cfg.embed)


STAGE = Stage(
    name="select",
    summary="the partitioned pool -> selection.parquet + selected.jsonl (per-part tasks, shards)",
    checks=_checks,
    current=always_runs,
    run=lambda run: run_select(run.cfg, run.run_dir, run.data, run.log),
)
