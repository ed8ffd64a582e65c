"""Select stage: embeddings + method -> `selection.parquet` and `selected.jsonl`.

`selection.parquet` has the same columns for every method: id, rank (0 = best), score,
probability (null where the method has none), count (null unless the method samples with
replacement), then the carried source columns. `selected.jsonl` holds the selected rows with their
text, in rank order, as the fine-tune stage reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.baselines import knn_select, random_select
from engine.gotd import merge_smallest
from engine.gotd import select as gotd_select
from engine.knn import IndexParams, ShortResults
from engine.sampling import sample
from engine.selection import Selection
from engine.sinkhorn import coordinate
from engine.tsds_search import TSDSParams, reference_index_params, select_compat, select_exact
from jobs.config import Config
from jobs.embed import read_embeddings
from jobs.errors import InputError
from jobs.runfolder import write_jsonl, write_parquet


def _random(cfg: Config, ids, candidates, targets) -> Selection:
    return random_select(ids, cfg.select.budget, cfg.seed)


def _knn(cfg: Config, ids, candidates, targets) -> Selection:
    return knn_select(candidates, targets, ids, cfg.select.budget, cfg.select.knn.mode)


def _start_cluster(cfg: Config, gpu: str) -> bool:
    """Start or join Ray for the shard actors (after the input checks); True when each shard
    should take a GPU (`gpu: auto` and the cluster has GPUs)."""
    import ray

    from jobs.pipeline import start_ray

    start_ray(cfg)
    return gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0


def _tsds(cfg: Config, ids, candidates, targets) -> Selection:
    from actors.index_shard import ray_fanout, start_shards, stop_shards

    t = cfg.select.tsds
    use_gpu = _start_cluster(cfg, t.gpu)
    params = TSDSParams(
        alpha=t.alpha, C=t.C, sigma=t.sigma, max_K=t.max_K, kde_K=t.kde_K, mode=t.mode
    )
    index = reference_index_params() if t.mode == "compat" else IndexParams(**t.index.model_dump())
    actors = start_shards(
        candidates, t.shards, index, use_gpu=use_gpu, cpus_per_shard=t.cpus_per_shard
    )
    try:
        run = select_compat if t.mode == "compat" else select_exact
        sol, info = run(ray_fanout(actors), targets, len(candidates), params)
    except ShortResults as exc:
        field = (
            "select.tsds.mode (compat uses the reference's IVF)"
            if t.mode == "compat"
            else ("select.tsds.index")
        )
        raise InputError(f"{field}: {exc}") from None
    except ValueError as exc:  # e.g. a pool too small for compat mode's N // 10 lists
        raise InputError(f"select.tsds: {exc}") from None
    finally:
        stop_shards(actors)
    try:
        chosen = sample(sol.p, ids, cfg.select.budget, t.sampling, cfg.seed)
    except ValueError as exc:
        raise InputError(f"select.tsds.sampling: {exc}") from None
    chosen.info = {**info, "s": sol.s, "support": int(np.count_nonzero(sol.p))}
    chosen.p = sol.p
    return chosen


def _gotd(cfg: Config, ids, candidates, targets) -> Selection:
    from actors.ot_shard import ResilientFanout, start_ot_shards, stop_ot_shards

    o = cfg.select.gotd
    use_gpu = _start_cluster(cfg, o.gpu)
    actors, keep = start_ot_shards(
        candidates, targets, o.shards, epsilon=o.epsilon, cpus_per_shard=o.cpus_per_shard,
        use_gpu=use_gpu, cache_bytes=o.cache_mb << 20, block=o.block,
    )  # fmt: skip
    try:
        fanout = ResilientFanout(actors)
        f, n_iter, errors, converged = coordinate(
            fanout, len(targets), epsilon=o.epsilon, threshold=o.threshold,
            momentum=o.momentum, max_iterations=o.max_iterations,
        )  # fmt: skip
        g, rows = merge_smallest(fanout("smallest", cfg.select.budget), cfg.select.budget)
    finally:
        stop_ot_shards(actors)
        del keep
    chosen = gotd_select(g, rows, cfg.select.budget, len(candidates))
    chosen.potential = f  # the target potential: what a grown pool's new rows are scored against
    chosen.info = {
        "iterations": n_iter,
        "converged": converged,
        "final_error": float(errors[-1]),
        "shards": o.shards,
        "recoveries": fanout.recoveries,
    }
    return chosen


METHODS: dict[str, Callable[..., Selection]] = {
    "random": _random,
    "knn": _knn,
    "tsds": _tsds,
    "gotd": _gotd,
}
NEEDS_VECTORS = {"knn", "tsds", "gotd"}


def check_vectors(candidates: np.ndarray, targets: np.ndarray, run_dir: Path) -> None:
    """What every vector method needs: equal dimensions, finite values."""
    if candidates.shape[1] != targets.shape[1]:
        raise InputError(
            f"{run_dir}/embeddings: targets have dimension {targets.shape[1]}, candidates "
            f"{candidates.shape[1]}; embed both sides with the same model"
        )
    for side, x in (("candidates", candidates), ("targets", targets)):
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise InputError(
                f"{run_dir}/embeddings/{side}: {int(bad.sum())} vectors with NaN or inf "
                f"(first at row {int(np.argmax(bad))})"
            )


def check_budget(cfg: Config, run_dir: Path) -> int:
    """The pool size, from the ingested table's metadata; the budget must fit in it."""
    n = pq.ParquetFile(run_dir / "data" / "candidates.parquet").metadata.num_rows
    if cfg.select.budget > n:
        raise InputError(
            f"select.budget: {cfg.select.budget} is larger than the pool ({n} candidates)"
        )
    return n


def aligned_vectors(run_dir: Path, side: str, ids: np.ndarray) -> np.ndarray:
    """The vectors of `ids` in that order, from the committed shards; every id must be there."""
    emb_ids, vectors = read_embeddings(run_dir / "embeddings" / side)
    order = np.argsort(emb_ids, kind="stable")
    pos = np.searchsorted(emb_ids[order], ids)
    pos = np.minimum(pos, len(order) - 1) if len(order) else pos
    found = len(order) > 0 and np.array_equal(emb_ids[order][pos], ids)
    if not found:
        raise InputError(f"{run_dir}/embeddings/{side}: vectors missing; run the embed stage first")
    return vectors[order[pos]]


def selection_table(sel: Selection, data: pa.Table, keep: list[str]) -> pa.Table:
    n = len(sel.indices)
    rows = pa.array(sel.indices)
    cols = {
        "id": data.column("id").take(rows),
        "rank": pa.array(np.arange(n, dtype=np.int64)),
        "score": pa.array(sel.score, pa.float64()),
        "probability": pa.array(sel.probability, pa.float64())
        if sel.probability is not None
        else pa.nulls(n, pa.float64()),
        "count": pa.array(sel.count, pa.int64())
        if sel.count is not None
        else pa.nulls(n, pa.int64()),
    }
    cols.update({c: data.column(c).take(rows) for c in keep})
    return pa.table(cols)


def run_select(cfg: Config, run_dir: Path) -> dict:
    data = pq.read_table(run_dir / "data" / "candidates.parquet")
    ids = np.asarray(data.column("id").to_numpy(zero_copy_only=False), dtype=str)
    check_budget(cfg, run_dir)
    candidates = targets = None
    if cfg.select.method in NEEDS_VECTORS:
        target_ids = pq.read_table(run_dir / "data" / "targets.parquet", columns=["id"])
        if target_ids.num_rows == 0:
            raise InputError(f"{run_dir}/data/targets.parquet: no target rows (empty target set)")
        candidates = aligned_vectors(run_dir, "candidates", ids)
        targets = aligned_vectors(
            run_dir,
            "targets",
            np.asarray(target_ids.column("id").to_numpy(zero_copy_only=False), str),
        )
        check_vectors(candidates, targets, run_dir)
    if cfg.select.method == "gradex":  # chooses whole data sources; needs no vectors
        from jobs.gradex import gradex_selection

        sel = gradex_selection(cfg, run_dir, ids)
    else:
        sel = METHODS[cfg.select.method](cfg, ids, candidates, targets)
    if sel.potential is not None:
        write_parquet(
            run_dir / GOTD_POTENTIAL,
            pa.table({"id": target_ids.column("id"), "f": pa.array(sel.potential, pa.float32())}),
        )
    return write_selection(cfg, run_dir, sel, data)


def write_selection(cfg: Config, run_dir: Path, sel: Selection, data: pa.Table) -> dict:
    """selection.parquet, probabilities.parquet (methods with a distribution), selected.jsonl."""
    ids = data.column("id")
    keep = list(cfg.candidates.keep_columns)
    table = selection_table(sel, data, keep)
    if sel.p is not None:  # the whole distribution, not only the sampled rows
        write_parquet(
            run_dir / "probabilities.parquet",
            pa.table({"id": ids, "probability": pa.array(sel.p)}),
        )
    write_parquet(run_dir / "selection.parquet", table)
    rows = data.take(pa.array(sel.indices)).select(["id", "text", *keep])
    write_jsonl(run_dir / "selected.jsonl", rows.append_column("rank", table.column("rank")))
    return {"method": cfg.select.method, "rows": table.num_rows, "pool": len(ids), **sel.info}


GOTD_POTENTIAL = "gotd_potential.parquet"
