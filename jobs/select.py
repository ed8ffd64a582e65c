"""Select stage: the partitioned pool + a method -> `selection.parquet` and `selected.jsonl`.

Every method is one entry of `METHODS`: what it needs (vectors, texts, sources) and its `select`,
which gets a `Context` -- a handle on the partitioned pool (its parts and row ranges, the run
folder's filesystem), the targets and the options -- and returns a B-sized `Selection`. The work
that grows with the pool runs where the pool is: per-part tasks whose best-first lists merge in a
tree of tasks (random, knn, GradEx's rows), or shard actors that load their own row ranges from
the run folder (TSDS's FAISS shards, GOT-D's Sinkhorn shards). The driver plans and merges; what
it holds grows with the budget B and the targets M, never with the pool N.

`selection.parquet` has the same columns for every method: id, row (the pool's dense row
number), rank (0 = best), score, probability (null where the method has none), count (null
unless the method samples with replacement), then the carried source columns. `selected.jsonl`
holds the selected rows with their text, in rank order, as the fine-tune stage reads them; both
are fetched by row number from the parts that hold them. TSDS also writes `probabilities/`: its
support (the rows with p > 0), written by the shards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from raysift.actors.fanout import ResilientFanout, stop
from raysift.actors.index_shard import start_shards
from raysift.actors.ot_shard import ot_fanout, start_ot_shards
from raysift.actors.partitions import fetch_rows, map_parts, merge_ranked
from raysift.engine.baselines import knn_scores, random_keys
from raysift.engine.fanout import local_fanout
from raysift.engine.gotd import merge_smallest
from raysift.engine.gotd import select as gotd_select
from raysift.engine.knn import IndexParams, IndexShard, ShortResults
from raysift.engine.sampling import sample
from raysift.engine.selection import Ranked, Selection
from raysift.engine.sinkhorn import SinkhornShard, coordinate
from raysift.engine.tsds_search import (
    TSDSParams,
    reference_index_params,
    select_compat,
    select_exact,
)
from raysift.jobs.config import Config, RayConfig
from raysift.jobs.console import progress
from raysift.jobs.dsir import dsir_select
from raysift.jobs.errors import InputError
from raysift.jobs.pool import (
    Part,
    Pool,
    as_strings,
    load_pool,
    read_part,
    read_vector_range,
    read_vectors,
)
from raysift.jobs.runfolder import RunFolder, write_jsonl, write_parquet
from raysift.jobs.runtime import start_ray
from raysift.jobs.storage import Store
from raysift.jobs.vectors import check_vectors_ready, vector_dim

GOTD_POTENTIAL = RunFolder.GOTD_POTENTIAL
PROBABILITIES = RunFolder.PROBABILITIES


@dataclass
class MethodInput:
    """What every method's input has: the config, and from it the budget, the seed and the
    method's own section."""

    cfg: Config

    @property
    def budget(self) -> int:
        return self.cfg.select.budget

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def options(self):
        """The method's own section of the config (`select.<method>`)."""
        return getattr(self.cfg.select, self.cfg.select.method)


@dataclass
class Context(MethodInput):
    """What a method gets: the partitioned pool, the targets, the options, where outputs go."""

    pool: Pool  # the candidates: parts read by tasks and actors, never by the driver
    targets: Pool
    run_dir: Path  # the driver's run folder (small files)
    out: Store  # the run folder as workers reach it (bulk outputs)
    log: Callable[[str], None] = print

    def target_vectors(self) -> np.ndarray:
        """The M target vectors (the driver may hold what grows with the targets)."""
        return read_vector_range(self.targets, 0, self.targets.n)


@dataclass
class InMemory(MethodInput):
    """What a method's in-process `local` gets (`raysift.select` on a pool that fits in memory,
    no Ray): the pool's ids in row order, its vectors and the target vectors (None for a method
    that needs none), the config. It returns the same `Selection` as its `select` on Ray."""

    ids: np.ndarray  # str, the pool's row order
    vectors: np.ndarray | None = None  # (N, d) float32
    target_vectors: np.ndarray | None = None  # (M, d) float32


@dataclass(frozen=True)
class Method:
    select: Callable[[Context], Selection]
    needs: frozenset[str]  # "vectors": committed embeddings; "texts"; "sources": a source column
    summary: str
    local: Callable[[InMemory], Selection] | None = None  # in-process, for pools held in memory


def start_cluster(settings: RayConfig, gpu: str) -> bool:
    """Start or join Ray for shard actors; True when each shard should take a GPU (`gpu: auto`
    and the cluster has GPUs)."""
    import ray

    start_ray(settings)
    return gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0


# -- random and knn: per-part best-first lists, merged on the workers -----------------------------


def _ids(pool: Pool, part: Part) -> np.ndarray:
    return as_strings(read_part(pool, part, ["id"]).column("id"))


def random_part(pool: Pool, part: Part, seed: int, k: int) -> Ranked:
    """A part's k rows of smallest u = H(seed, id) (score 1 - u)."""
    ids = _ids(pool, part)
    u = random_keys(ids, seed)
    return Ranked(-u, ids, part.first + np.arange(len(ids)), 1.0 - u).top(k)


def _random(ctx: Context) -> Selection:
    best = merge_ranked(map_parts(random_part, ctx.pool, ctx.seed, ctx.budget), ctx.budget)
    return Selection(best.row, best.score, probability=np.full(ctx.budget, ctx.budget / ctx.pool.n))


def _random_local(a: InMemory) -> Selection:
    u = random_keys(a.ids, a.seed)
    best = Ranked(-u, a.ids, np.arange(len(a.ids)), 1.0 - u).top(a.budget)
    return Selection(best.row, best.score, probability=np.full(a.budget, a.budget / len(a.ids)))


def knn_part(pool: Pool, part: Part, targets: np.ndarray, mode: str, k: int) -> Ranked:
    """A part's k rows most similar to the targets (`engine.baselines.knn_scores`)."""
    score = knn_scores(read_vectors(pool, part), targets, mode).astype(np.float64)
    return Ranked(score, _ids(pool, part), part.first + np.arange(part.rows), score).top(k)


def _knn(ctx: Context) -> Selection:
    refs = map_parts(knn_part, ctx.pool, ctx.target_vectors(), ctx.options.mode, ctx.budget)
    best = merge_ranked(refs, ctx.budget)
    return Selection(best.row, best.score)


def _knn_local(a: InMemory) -> Selection:
    score = knn_scores(a.vectors, a.target_vectors, a.options.mode).astype(np.float64)
    best = Ranked(score, a.ids, np.arange(len(a.ids)), score).top(a.budget)
    return Selection(best.row, best.score)


# -- TSDS: FAISS shard actors ----------------------------------------------------------------------


def _tsds_params(t) -> tuple[TSDSParams, IndexParams]:
    return t.params(), reference_index_params() if t.mode == "compat" else t.index.params()


def _tsds_errors(t, exc: Exception) -> InputError:
    if isinstance(exc, ShortResults):
        field = "select.tsds.mode (compat uses the reference's IVF)" if t.mode == "compat" else (
            "select.tsds.index")
        return InputError(f"{field}: {exc}")
    return InputError(f"select.tsds: {exc}")  # e.g. a pool too small for compat mode's N // 10


def _tsds_sample(t, sol, ids: np.ndarray, budget: int, seed: int, n: int, info: dict) -> Selection:
    try:
        chosen = sample(sol.p, ids, budget, t.sampling, seed, n)
    except ValueError as exc:
        raise InputError(f"select.tsds.sampling: {exc}") from None
    chosen.indices = sol.rows[chosen.indices]
    chosen.info = {**info, "s": sol.s, "support": len(sol.rows)}
    return chosen


def _tsds_local(a: InMemory) -> Selection:
    t = a.options
    params, index = _tsds_params(t)
    try:
        run = select_compat if t.mode == "compat" else select_exact
        sol, info = run(local_fanout([IndexShard(a.vectors, 0, index)]), a.target_vectors,
                        len(a.ids), params)  # fmt: skip
    except (ShortResults, ValueError) as exc:
        raise _tsds_errors(t, exc) from None
    chosen = _tsds_sample(t, sol, a.ids[sol.rows], a.budget, a.seed, len(a.ids), info)
    chosen.p = (sol.rows, sol.p)  # the distribution on its support
    return chosen


def _tsds(ctx: Context) -> Selection:
    t = ctx.options
    use_gpu = start_cluster(ctx.cfg.ray, t.gpu)
    params, index = _tsds_params(t)
    actors = start_shards(
        ctx.pool, t.shards, index, use_gpu=use_gpu, cpus_per_shard=t.cpus_per_shard
    )
    fanout = ResilientFanout(actors)
    try:
        run = select_compat if t.mode == "compat" else select_exact
        sol, info = run(fanout, ctx.target_vectors(), ctx.pool.n, params)
        ids = np.empty(len(sol.rows), dtype=object)
        for where, found in fanout("ids_of", sol.rows):
            ids[where] = found
        ids = ids.astype(str)
        ctx.out.delete(PROBABILITIES)
        fanout("write_probabilities", ctx.out, PROBABILITIES, sol.rows, sol.p)
    except (ShortResults, ValueError) as exc:
        raise _tsds_errors(t, exc) from None
    finally:
        stop(actors)
    chosen = _tsds_sample(t, sol, ids, ctx.budget, ctx.seed, ctx.pool.n, info)
    chosen.info.update(shards=t.shards, recoveries=fanout.recoveries)
    return chosen


# -- GOT-D: Sinkhorn shard actors ------------------------------------------------------------------


def _gotd(ctx: Context) -> Selection:
    o = ctx.options
    use_gpu = start_cluster(ctx.cfg.ray, o.gpu)
    actors = start_ot_shards(
        ctx.pool, ctx.targets, o.shards, epsilon=o.epsilon, cpus_per_shard=o.cpus_per_shard,
        use_gpu=use_gpu, cache_bytes=o.cache_mb << 20, block=o.block,
    )  # fmt: skip
    fanout = ot_fanout(actors)
    shown = progress("gotd: Sinkhorn", o.max_iterations, "iterations", eta=False)

    def step(it: int, f: np.ndarray, err: float) -> None:
        shown.update(it, error=err, threshold=o.threshold)

    try:
        f, n_iter, errors, converged = coordinate(
            fanout, ctx.targets.n, epsilon=o.epsilon, threshold=o.threshold,
            momentum=o.momentum, max_iterations=o.max_iterations, on_iteration=step,
        )  # fmt: skip
        shown.close()
        g, rows = merge_smallest(fanout("smallest", ctx.budget), ctx.budget)
    finally:
        stop(actors)
    chosen = gotd_select(g, rows, ctx.budget, ctx.pool.n)
    chosen.potential = f  # the target potential: what a grown pool's new rows are scored against
    chosen.info = {
        "iterations": n_iter,
        "converged": converged,
        "final_error": float(errors[-1]),
        "shards": o.shards,
        "recoveries": fanout.recoveries,
    }
    return chosen


def _gotd_local(a: InMemory) -> Selection:
    o = a.options
    shard = SinkhornShard(
        a.vectors, a.target_vectors, n_total=len(a.ids), epsilon=o.epsilon,
        cache_bytes=o.cache_mb << 20, block=o.block,
    )  # fmt: skip
    f, n_iter, errors, converged = coordinate(
        local_fanout([shard]), len(a.target_vectors), epsilon=o.epsilon, threshold=o.threshold,
        momentum=o.momentum, max_iterations=o.max_iterations,
    )  # fmt: skip
    g, rows = merge_smallest([shard.smallest(a.budget)], a.budget)
    chosen = gotd_select(g, rows, a.budget, len(a.ids))
    chosen.potential = f
    chosen.p = shard.potentials()  # g: every candidate's potential (its OT gradient)
    chosen.info = {"iterations": n_iter, "converged": converged,
                   "final_error": float(errors[-1])}  # fmt: skip
    return chosen


def _dsir(ctx: Context) -> Selection:
    import ray

    start_ray(ctx.cfg.ray)
    cpus = ray.cluster_resources().get("CPU", 1)
    o = ctx.options
    return dsir_select(ctx.pool, ctx.targets, o, ctx.budget, ctx.seed, cpus, ctx.log)


def _gradex(ctx: Context) -> Selection:
    from raysift.jobs.gradex import gradex_select

    return gradex_select(ctx)


def _less(ctx: Context) -> Selection:
    from raysift.jobs.less import less_select

    start_ray(ctx.cfg.ray)
    return less_select(ctx.cfg, ctx.pool, ctx.targets, ctx.run_dir, ctx.budget, ctx.log)


METHODS: dict[str, Method] = {
    "random": Method(_random, frozenset(), "seeded hash rank, uniform over the pool",
                     _random_local),
    "knn": Method(_knn, frozenset({"vectors"}), "most similar to the targets", _knn_local),
    "tsds": Method(_tsds, frozenset({"vectors"}), "optimal transport + density (TSDS)",
                   _tsds_local),
    "gotd": Method(_gotd, frozenset({"vectors"}), "OT gradient to the targets (GOT-D)",
                   _gotd_local),
    "gradex": Method(_gradex, frozenset({"sources"}), "whole data sources chosen by GradEx"),
    "dsir": Method(_dsir, frozenset({"texts"}), "hashed n-gram importance resampling (DSIR)"),
    "less": Method(_less, frozenset({"texts"}), "Adam-preconditioned LoRA gradients (LESS)"),
}


def needs_vectors(method: str) -> bool:
    return "vectors" in METHODS[method].needs


# -- the stage -------------------------------------------------------------------------------------


def check_budget(cfg: Config, pool: Pool) -> int:
    """The pool size, from the pool index; the budget must fit in it."""
    if cfg.select.budget > pool.n:
        raise InputError(
            f"select.budget: {cfg.select.budget} is larger than the pool ({pool.n} candidates)"
        )
    return pool.n


def check_dimensions(store: Store) -> None:
    """Candidates and targets vectors must have one dimension (as the embed stage recorded)."""
    dims = {side: vector_dim(store, side) for side in ("candidates", "targets")}
    if dims["candidates"] != dims["targets"]:
        raise InputError(
            f"{store.uri_of('embeddings')}: targets have dimension {dims['targets']}, candidates "
            f"{dims['candidates']}; embed both sides with the same model"
        )


def run_select(
    cfg: Config, run_dir: Path, data: Store | None = None, log: Callable[[str], None] = print
) -> dict:
    """Select with the configured method; `data` is where the pool lives (default: this run
    folder; `raysift evaluate`'s runs select from the shared one)."""
    out = Store.for_run(run_dir)
    data = data or out
    pool, targets = load_pool(data, "candidates"), load_pool(data, "targets")
    check_budget(cfg, pool)
    method = METHODS[cfg.select.method]
    if method.needs & {"vectors", "texts"} and targets.n == 0:  # they select for the targets
        raise InputError(f"{data.uri_of('data/targets')}: no target rows (empty target set)")
    if "vectors" in method.needs:
        for side in ("targets", "candidates"):
            check_vectors_ready(data, side, cfg.embed)
        check_dimensions(data)
    ctx = Context(cfg, pool, targets, run_dir, out, log)
    sel = method.select(ctx)
    if sel.potential is not None:
        target_ids = fetch_rows(targets, np.arange(targets.n), ["id"]).column("id")
        write_parquet(
            run_dir / GOTD_POTENTIAL,
            pa.table({"id": target_ids, "f": pa.array(sel.potential, pa.float32())}),
        )
    return write_selection(ctx, sel)


def write_selection(ctx: Context, sel: Selection) -> dict:
    """selection.parquet and selected.jsonl: the B chosen rows, fetched by row number."""
    keep = list(ctx.cfg.candidates.keep_columns)
    rows = fetch_rows(ctx.pool, sel.indices, ["id", "text", *keep])
    table = selection_table(sel, rows, keep)
    write_parquet(ctx.run_dir / RunFolder.SELECTION, table)
    selected = rows.select(["id", "text", *keep]).append_column("rank", table.column("rank"))
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
