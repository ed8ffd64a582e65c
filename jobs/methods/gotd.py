"""gotd: the gradient of the entropic OT distance to the targets (GOT-D, Kang et al. ICLR 2024):
the candidates' Sinkhorn potential g, most negative first. Candidate shards (`actors.ot_shard`, each
loading its own rows of the representation) compute partial potentials; the coordinator
(`engine.sinkhorn.coordinate`) merges them exactly every iteration. The converged target potential
f is kept (gotd_potential.parquet): what curate scores new rows against."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raysift.actors.fanout import stop
from raysift.actors.ot_shard import ot_fanout, start_ot_shards
from raysift.engine.fanout import local_fanout
from raysift.engine.gotd import merge_smallest
from raysift.engine.gotd import select as gotd_select
from raysift.engine.selection import Selection
from raysift.engine.sinkhorn import SinkhornShard, coordinate
from raysift.jobs.config import GOTDConfig
from raysift.jobs.core.console import progress
from raysift.jobs.core.runfolder import RunFolder
from raysift.jobs.methods.base import Context, InMemory, Method, start_cluster
from raysift.jobs.methods.tsds import shards_fit

GOTD_POTENTIAL = RunFolder.GOTD_POTENTIAL


def select(ctx: Context) -> Selection:
    o = ctx.cfg.select.gotd
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


def local(a: InMemory) -> Selection:
    o = a.cfg.select.gotd
    X, Y = a.both_vectors()
    shard = SinkhornShard(
        X, Y, n_total=len(a.ids), epsilon=o.epsilon,
        cache_bytes=o.cache_mb << 20, block=o.block,
    )  # fmt: skip
    f, n_iter, errors, converged = coordinate(
        local_fanout([shard]), len(Y), epsilon=o.epsilon, threshold=o.threshold,
        momentum=o.momentum, max_iterations=o.max_iterations,
    )  # fmt: skip
    g, rows = merge_smallest([shard.smallest(a.budget)], a.budget)
    chosen = gotd_select(g, rows, a.budget, len(a.ids))
    chosen.potential = f
    chosen.info = {"iterations": n_iter, "converged": converged,
                   "final_error": float(errors[-1])}  # fmt: skip
    return chosen


def read_potentials(store) -> pa.Table | None:
    """The converged target potential (target id, f); None when none was written."""
    return store.parquet(GOTD_POTENTIAL).read() if store.is_file(GOTD_POTENTIAL) else None


METHOD = Method(
    name="gotd",
    summary="OT gradient to the targets (GOT-D)",
    select=select,
    local=local,
    score="-(1 + 1/N) g: the OT distance's decrease per unit of mass (g its potential)",
    needs=frozenset({"vectors"}),
    options=GOTDConfig,
    checks=lambda cfg: shards_fit(cfg, "gotd"),
    outputs={"potentials": read_potentials},
)
