"""tsds: optimal transport to the targets with a density term (TSDS, Liu et al. NeurIPS 2024), on
FAISS index shard actors (`actors.index_shard`: each loads its own rows of the representation)
coordinated by `engine.tsds_search`. compat mode reproduces the reference's output; exact mode is
the corrected optimum. p lives on its support; the shards write it to probabilities/."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from raysift.actors.fanout import ResilientFanout, stop
from raysift.actors.index_shard import start_shards
from raysift.engine.fanout import local_fanout
from raysift.engine.knn import IndexParams, IndexShard, ShortResults
from raysift.engine.sampling import sample
from raysift.engine.selection import Selection
from raysift.engine.tsds_search import (
    TSDSParams,
    reference_index_params,
    select_compat,
    select_exact,
)
from raysift.jobs.config import Config, TSDSConfig
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.runfolder import RunFolder
from raysift.jobs.methods.base import Context, InMemory, Method, start_cluster

PROBABILITIES = RunFolder.PROBABILITIES


def shards_fit(cfg: Config, name: str) -> None:
    """Shard actors that ask for more CPUs than a local cluster has never start: the select stage
    would wait forever. (A remote cluster may autoscale: not checked there; with a GPU each shard
    takes a GPU instead of CPUs.)"""
    section = getattr(cfg.select, name)
    if cfg.ray.address is not None:
        return
    if section.gpu == "auto" and Path("/dev/nvidia0").exists():
        return
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    wanted = section.shards * section.cpus_per_shard
    if wanted > cpus:
        raise InputError(
            f"select.{name}.shards x select.{name}.cpus_per_shard = {wanted:g} is more than the "
            f"local cluster's {cpus} CPUs (the shards would never start); lower cpus_per_shard "
            "(fractions are fine)"
        )


def _params(t) -> tuple[TSDSParams, IndexParams]:
    return t.params(), reference_index_params() if t.mode == "compat" else t.index.params()


def _errors(t, exc: Exception) -> InputError:
    if isinstance(exc, ShortResults):
        field = "select.tsds.mode (compat uses the reference's IVF)" if t.mode == "compat" else (
            "select.tsds.index")
        return InputError(f"{field}: {exc}")
    return InputError(f"select.tsds: {exc}")  # e.g. a pool too small for compat mode's N // 10


def _sample(t, sol, ids: np.ndarray, budget: int, seed: int, n: int, info: dict) -> Selection:
    try:
        chosen = sample(sol.p, ids, budget, t.sampling, seed, n)
    except ValueError as exc:
        raise InputError(f"select.tsds.sampling: {exc}") from None
    chosen.indices = sol.rows[chosen.indices]
    chosen.info = {**info, "s": sol.s, "support": len(sol.rows)}
    return chosen


def local(a: InMemory) -> Selection:
    t = a.cfg.select.tsds
    params, index = _params(t)
    X, Y = a.both_vectors()
    try:
        run = select_compat if t.mode == "compat" else select_exact
        sol, info = run(local_fanout([IndexShard(X, 0, index)]), Y,
                        len(a.ids), params)  # fmt: skip
    except (ShortResults, ValueError) as exc:
        raise _errors(t, exc) from None
    chosen = _sample(t, sol, a.ids[sol.rows], a.budget, a.seed, len(a.ids), info)
    chosen.p = (sol.rows, sol.p)  # the distribution on its support
    return chosen


def select(ctx: Context) -> Selection:
    t = ctx.cfg.select.tsds
    use_gpu = start_cluster(ctx.cfg.ray, t.gpu)
    params, index = _params(t)
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
        raise _errors(t, exc) from None
    finally:
        stop(actors)
    chosen = _sample(t, sol, ids, ctx.budget, ctx.seed, ctx.pool.n, info)
    chosen.info.update(shards=t.shards, recoveries=fanout.recoveries)
    return chosen


def read_p(store) -> pa.Table | None:
    """p on its support (row, id, probability), from the shards' files (None: none written)."""
    if not store.exists(PROBABILITIES):
        return None
    return ds.dataset(store.path(PROBABILITIES), filesystem=store.fs).to_table()


METHOD = Method(
    name="tsds",
    summary="optimal transport + density (TSDS)",
    select=select,
    local=local,
    score="TSDS selection probability p",
    needs=frozenset({"vectors"}),
    options=TSDSConfig,
    checks=lambda cfg: shards_fit(cfg, "tsds"),
    outputs={"p": read_p},
)
