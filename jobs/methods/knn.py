"""knn: the candidates most similar to the targets, on any representation, with an aggregation.

    max               score = cosine to the nearest target                  (per-part top B)
    centroid          score = cosine to the targets' mean direction         (per-part top B)
    subtask_mean_max  score = the best subtask's mean cosine (LESS's)        (per-part top B)
    round_robin       each target in turn takes its best candidate not yet  (per-target lists)
                      taken (RDS+'s); score = cosine to the target that took it

The per-row aggregations score every part in a task and keep its best B, merged in a tree of
tasks (`engine.baselines.knn_scores`). Round robin needs each target's ranked list: every part's
task returns each target's best L rows, merged per target in a tree of tasks to the exact global
lists; the driver runs the round robin on them (M x L numbers, never N), and fetches longer lists
when one runs out before the budget is filled (`engine.round_robin`)."""

from __future__ import annotations

import numpy as np

from raysift.actors.partitions import fetch_rows, map_parts, merge_ranked, merge_tree
from raysift.engine import round_robin as rr
from raysift.engine.baselines import knn_scores
from raysift.engine.less import subtask_codes
from raysift.engine.selection import Ranked, Selection
from raysift.jobs.config import Config, KnnConfig
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.pool import Part, Pool, as_strings, read_vectors
from raysift.jobs.methods.base import Context, InMemory, Method
from raysift.jobs.methods.random import part_ids


def subtask_column(cfg: Config) -> str | None:
    """The targets column whose values are subtasks: knn's, or LESS's when the preset runs."""
    return (cfg.select.less if cfg.select.method == "less" else cfg.select.knn).subtask_column


def checks(cfg: Config) -> None:
    column = subtask_column(cfg)
    if column is not None and column not in cfg.targets.keep_columns:
        section = "less" if cfg.select.method == "less" else "knn"
        raise InputError(
            f"select.{section}.subtask_column: {column!r} is not carried with the targets: add "
            f"it to targets.keep_columns ({cfg.targets.keep_columns})"
        )


def groups(cfg: Config, targets: Pool) -> tuple[np.ndarray | None, list[str]]:
    """Each target's subtask code and the subtask names (one subtask without a column)."""
    column = subtask_column(cfg)
    if column is None:
        return None, ["all"]
    labels = fetch_rows(targets, np.arange(targets.n), [column]).column(0)  # target-sized
    if labels.null_count:
        raise InputError(f"{column}: {labels.null_count} target rows have no subtask value")
    return subtask_codes(as_strings(labels))


def knn_part(pool: Pool, part: Part, targets: np.ndarray, mode: str, k: int, codes=None) -> Ranked:
    """A part's k rows with the best aggregated similarity to the targets."""
    score = knn_scores(read_vectors(pool, part), targets, mode, codes).astype(np.float64)
    return Ranked(score, part_ids(pool, part), part.first + np.arange(part.rows), score).top(k)


def lists_part(pool: Pool, part: Part, targets: np.ndarray, L: int) -> tuple:
    """A part's best L rows for each target (round robin's input)."""
    rows = part.first + np.arange(part.rows)
    return rr.target_lists(read_vectors(pool, part), targets, rows, L)


def _merge_lists(parts: list, L: int) -> tuple:
    return rr.merge_lists(parts, L)


def round_robin(ctx: Context, Q: np.ndarray) -> Selection:
    n = ctx.pool.n
    L = rr.first_length(ctx.budget, len(Q), n)
    while True:
        rows, sims = merge_tree(map_parts(lists_part, ctx.pool, Q, L), _merge_lists, L)
        sel = rr.select(rows, sims, ctx.budget, n)
        if sel is not None:
            sel.info = {"list_length": L}
            return sel
        L = min(n, 2 * L)  # a target's list ran out before the budget: longer lists


def select(ctx: Context) -> Selection:
    Q = ctx.target_vectors()
    mode = ctx.plan.aggregation
    if mode == "round_robin":
        return round_robin(ctx, Q)
    codes, names = groups(ctx.cfg, ctx.targets) if mode == "subtask_mean_max" else (None, [])
    best = merge_ranked(map_parts(knn_part, ctx.pool, Q, mode, ctx.budget, codes), ctx.budget)
    return Selection(best.row, best.score, info={"subtasks": names} if names else {})


def local(a: InMemory) -> Selection:
    mode, n = a.plan.aggregation, len(a.ids)
    X, Y = a.both_vectors()
    if mode == "round_robin":
        L = rr.first_length(a.budget, len(Y), n)
        while (sel := rr.select(*rr.target_lists(X, Y, np.arange(n), L),
                                a.budget, n)) is None:  # fmt: skip
            L = min(n, 2 * L)
        return sel
    codes = None
    column = subtask_column(a.cfg)
    if mode == "subtask_mean_max" and column is not None and a.target_table is not None:
        codes, _ = subtask_codes(as_strings(a.target_table.column(column)))
    score = knn_scores(X, Y, mode or "max", codes).astype(np.float64)
    best = Ranked(score, a.ids, np.arange(n), score).top(a.budget)
    return Selection(best.row, best.score)


METHOD = Method(
    name="knn",
    summary="most similar to the targets (max, centroid, round robin, subtask mean-max)",
    select=select,
    local=local,
    score="similarity to the targets: max, centroid, round robin or subtask mean-max",
    needs=frozenset({"vectors"}),
    options=KnnConfig,
    checks=checks,
)
