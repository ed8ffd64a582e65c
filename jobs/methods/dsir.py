"""DSIR as a select method: hashed n-gram features and importance weights on partitioned pools.

    1. features   every chunk of rows [a, b) of every part, on an actor pool (each actor keeps
                  its token -> bucket memo warm across chunks): the per-row bucket lists are
                  cached in `features/<side>/n<ngrams>-b<num_buckets>/<digest>/rows-A-B.parquet`
                  (keyed by the part's content digest: reused by every seed, target and rerun; a
                  killed run loses the chunks in flight) and the chunk's count vectors come back
    2. fit        the pool's count vector = the sum of the chunks' (all rows in compat mode, the
                  rows the length filter keeps in default mode, or a seeded sample of rows by id
                  hash when `fit_tokens` is a number); the targets' likewise (per target set)
    3. weights    per chunk, in tasks: log w = log_diff . counts, the length filter, the key
                  (log w + Gumbel noise from (seed, id), or log w alone for top_k), the chunk's
                  best `budget` rows; the lists merge in a tree of tasks

The driver holds count vectors (num_buckets) and the B chosen rows, never the pool. The math is in
`engine.dsir`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from raysift.actors.partitions import gather, merge_ranked
from raysift.actors.pool import map_actors
from raysift.engine.dsir import Features, Featurizer, gumbel, log_diff, split_budget
from raysift.engine.ids import hash_uniform
from raysift.engine.selection import Ranked, Selection
from raysift.jobs.config import DSIRConfig
from raysift.jobs.core.console import progress
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.pool import (
    Pool,
    as_strings,
    chunk_file,
    drop_stale_parts,
    plan_chunks,
    read_part_rows,
)
from raysift.jobs.core.runfolder import RunFolder
from raysift.jobs.core.storage import Store
from raysift.jobs.methods.base import Context, Method, cluster_cpus
from raysift.jobs.runtime import start_ray

FEATURES = RunFolder.FEATURES


def features_root(pool: Pool, o: DSIRConfig) -> str:
    """The folder of one side's features under one setting (a folder per part digest)."""
    return f"{FEATURES}/{pool.side}/n{o.ngrams}-b{o.num_buckets}"


def drop_stale(pool: Pool, o: DSIRConfig) -> None:
    """Delete cached features of parts no longer in the pool (a re-ingested, changed input)."""
    drop_stale_parts(pool, features_root(pool, o))


def _bucket_type(num_buckets: int) -> pa.DataType:
    return pa.uint16() if num_buckets <= 1 << 16 else pa.int32()


def write_features(store: Store, rel: str, feats: Features, num_buckets: int) -> None:
    """One row per text: its buckets, grouped by text (a list column: CSR on disk)."""
    order = np.argsort(feats.text, kind="stable")  # runs of ascending text: a cheap merge
    offsets = np.concatenate([[0], np.cumsum(feats.grams)]).astype(np.int32)
    values = pa.array(feats.buckets[order].astype(np.int64), type=_bucket_type(num_buckets))
    store.write_parquet(rel, pa.table({"buckets": pa.ListArray.from_arrays(offsets, values)}))


def read_features(store: Store, rel: str, ngrams: int) -> Features:
    column = store.parquet(rel).read(columns=["buckets"]).column("buckets").combine_chunks()
    grams = np.diff(column.offsets.to_numpy()).astype(np.int64)
    buckets = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    text = np.repeat(np.arange(len(grams), dtype=np.int64), grams)
    return Features(buckets, text, grams, ngrams)


def chunk_features(item: dict, featurize: Featurizer | None, o: DSIRConfig):
    """A chunk's features: from the cache, else computed (when `featurize` is given) and cached.
    Returns (features, whether they were computed)."""
    pool, part = item["pool"], item["part"]
    store = pool.store
    rel = chunk_file(features_root(pool, o), item)
    if store.is_file(rel):
        return read_features(store, rel, o.ngrams), False
    if featurize is None:
        raise InputError(f"{store.uri_of(rel)}: missing; run the select stage again")
    texts = read_part_rows(store, pool.part_path(part), item["a"], item["b"], ["text"])
    feats = featurize(texts.column("text").to_pylist())
    write_features(store, rel, feats, o.num_buckets)
    return feats, True


def _chunk_ids(item: dict) -> np.ndarray:
    pool, part = item["pool"], item["part"]
    table = read_part_rows(pool.store, pool.part_path(part), item["a"], item["b"], ["id"])
    return as_strings(table.column("id"))


class ChunkFeaturizer:
    """Actor callable: a chunk -> its cached features and count vectors (summed by the driver).

    counts: {target set (None for one): counts of every row}; `eligible_counts`: of the rows the
    length filter keeps (candidates only)."""

    def __init__(self, options: dict) -> None:
        self.o = DSIRConfig(**options)
        self.featurize = Featurizer(self.o.ngrams, self.o.num_buckets)

    def __call__(self, item: dict) -> dict:
        pool, o = item["pool"], self.o
        feats, computed = chunk_features(item, self.featurize, o)
        out = {"side": pool.side, "rows": feats.n, "computed": computed}
        if item["group"] is not None:  # separate targets: one count vector per target set
            table = read_part_rows(pool.store, pool.part_path(item["part"]), item["a"],
                                   item["b"], [item["group"]])  # fmt: skip
            groups = as_strings(table.column(item["group"]))
            out["counts"] = {g: feats.select(groups == g).counts(o.num_buckets)
                             for g in np.unique(groups)}  # fmt: skip
            return out
        out["counts"] = {None: feats.counts(o.num_buckets)}
        if pool.side == "candidates":
            keep = feats.lengths() >= o.min_example_length
            eligible = feats.select(keep)
            out.update(eligible=int(keep.sum()), eligible_counts=eligible.counts(o.num_buckets))
        return out


def _fit_sample(item: dict, options: dict, q: float, seed: int) -> np.ndarray:
    """The counts of a chunk's rows in the fit sample: H(seed, id) < q (eligible rows only)."""
    o = DSIRConfig(**options)
    feats, _ = chunk_features(item, None, o)
    u = np.asarray(hash_uniform([f"dsirfit:{i}" for i in _chunk_ids(item)], seed))
    return feats.select((u < q) & (feats.lengths() >= o.min_example_length)).counts(o.num_buckets)


def _chunk_best(
    item: dict, options: dict, ld: np.ndarray, k: list[int], seed: int
) -> list[Ranked] | Ranked:
    """Per target set t: the chunk's best k[t] eligible rows by key t (log w_t, plus Gumbel
    noise for sampling); one Ranked, not a list, for a single target set."""
    o = DSIRConfig(**options)
    feats, _ = chunk_features(item, None, o)
    logw = feats.log_weights(ld)  # (rows, K)
    keep = np.flatnonzero(feats.lengths() >= o.min_example_length)
    ids = _chunk_ids(item)[keep]
    rows = item["part"].first + item["a"] + keep
    out = []
    for t in range(ld.shape[0]):
        w = logw[keep, t]
        key = w + gumbel(ids, seed, t) if o.sampling == "gumbel" else w
        out.append(Ranked(key, ids, rows, w).top(k[t]))
    return out if len(out) > 1 else out[0]


def select(ctx: Context) -> Selection:
    """The DSIR selection of the budget's rows of the pool for the targets (the module
    docstring)."""
    start_ray(ctx.cfg.ray)
    pool, targets, o, budget, seed, log = (ctx.pool, ctx.targets, ctx.cfg.select.dsir, ctx.budget,
                                           ctx.seed, ctx.log)  # fmt: skip
    cpus = cluster_cpus()
    if o.target_column is not None and o.target_column not in targets.columns:
        raise InputError(
            f"select.dsir.target_column: {o.target_column!r} is not a targets column (add it to "
            f"targets.keep_columns); targets have {[c for c in targets.columns if c != 'row']}"
        )
    options = o.model_dump()
    for side in (pool, targets):
        drop_stale(side, o)
    cand = plan_chunks(pool, o.chunk_rows, group=None)
    items = cand + plan_chunks(targets, o.chunk_rows, group=o.target_column)
    actors = o.num_actors or max(1, int(cpus))
    total: dict[str, dict] = {"candidates": {}, "targets": {}}
    stats = {"rows": 0, "eligible": 0, "chunks_computed": 0, "chunks_reused": 0}
    raw = np.zeros(o.num_buckets, np.int64)
    with progress("dsir: features", pool.n + targets.n, "texts") as shown:
        for r in map_actors(ChunkFeaturizer, {"options": options}, items, actors):
            counts = total[r["side"]]
            for g, c in r["counts"].items():
                counts[g] = counts.get(g, 0) + c
            stats["chunks_computed" if r["computed"] else "chunks_reused"] += 1
            if r["side"] == "candidates":
                for key in ("rows", "eligible"):
                    stats[key] += r[key]
                raw += r["eligible_counts"] if o.mode == "default" else 0
            shown.advance(r["rows"])
    if o.mode == "compat":
        raw = total["candidates"][None]
    fit_grams = int(raw.sum())
    dropped = stats["rows"] - stats["eligible"]
    if stats["eligible"] < budget:
        raise InputError(
            f"select.dsir.min_example_length: {stats['eligible']} of {stats['rows']} candidates "
            f"have at least {o.min_example_length} words, fewer than select.budget = {budget}; "
            "lower the threshold or the budget"
        )
    log(
        f"select: dsir: {stats['eligible']:,} of {stats['rows']:,} candidates have at least "
        f"{o.min_example_length} words ({dropped:,} dropped, {dropped / max(stats['rows'], 1):.1%})"
    )
    fit_rows: int | None = stats["rows"] if o.mode == "compat" else stats["eligible"]
    if o.fit_tokens != "all" and o.fit_tokens < fit_grams:
        q = o.fit_tokens / fit_grams
        task = ray.remote(_fit_sample)
        refs = [task.remote(i, options, q, seed) for i in cand]
        raw = gather(refs, np.add, np.zeros(o.num_buckets, np.int64))  # summed as they arrive
        fit_grams, fit_rows = int(raw.sum()), None
    if fit_grams == 0:
        raise InputError("candidates: no words in the rows DSIR fits on (every text is empty)")
    sets = sorted(total["targets"], key=str)
    target_counts = np.stack([total["targets"][g] for g in sets])
    hits = target_counts.sum(axis=1)
    if not hits.all():
        empty = [str(g) for g, h in zip(sets, hits, strict=True) if not h]
        raise InputError(f"targets: no words in the target texts (target sets {empty})")
    if o.target_column is None:
        share = [budget]
    else:
        given = o.target_proportions
        if given is not None and set(given) != set(map(str, sets)):
            raise InputError(
                f"select.dsir.target_proportions: keys {sorted(given)} must be the values of "
                f"targets column {o.target_column!r}: {sorted(map(str, sets))}"
            )
        p = np.array([given[str(g)] for g in sets]) if given else hits.astype(np.float64)
        share = split_budget(budget, p / p.sum())
    ld = log_diff(raw, target_counts)
    cumulative = list(np.cumsum(share) + 1)  # one more: to see a tie at the cut
    task = ray.remote(_chunk_best).options(num_returns=len(share))
    ld_ref = ray.put(ld)
    per_chunk = [task.remote(i, options, ld_ref, cumulative, seed) for i in cand]
    if len(share) == 1:
        per_chunk = [[r] for r in per_chunk]
    chosen_rows: list[int] = []
    scores: list[float] = []
    taken: set[int] = set()
    ties = 0
    for t, n_t in enumerate(share):
        best = merge_ranked([r[t] for r in per_chunk], int(cumulative[t]))
        mine = [j for j in range(len(best)) if int(best.row[j]) not in taken][: n_t + 1]
        if len(mine) > n_t and n_t > 0 and best.key[mine[n_t]] == best.key[mine[n_t - 1]]:
            ties += 1
        for j in mine[:n_t]:
            taken.add(int(best.row[j]))
            chosen_rows.append(int(best.row[j]))
            scores.append(float(best.score[j]))
    sel = Selection(np.array(chosen_rows, np.int64), np.array(scores))
    sel.info = {
        "mode": o.mode,
        "sampling": o.sampling,
        "ngrams": o.ngrams,
        "num_buckets": o.num_buckets,
        "min_example_length": o.min_example_length,
        "eligible": stats["eligible"],
        "dropped_by_length": dropped,
        "dropped_share": round(dropped / max(stats["rows"], 1), 6),
        "fit_rows": fit_rows,
        "fit_grams": fit_grams,
        "target_grams": int(hits[0])
        if o.target_column is None
        else {str(g): int(h) for g, h in zip(sets, hits, strict=True)},
        "chunks_computed": stats["chunks_computed"],
        "chunks_reused": stats["chunks_reused"],
        "tie_at_cut": bool(ties),
    }
    if o.target_column is not None:
        sel.info["budget_per_target"] = {str(g): n for g, n in zip(sets, share, strict=True)}
    return sel


METHOD = Method(
    name="dsir",
    summary="hashed n-gram importance resampling (DSIR)",
    select=select,
    score="log importance weight (hashed n-grams)",
    needs=frozenset({"texts"}),
    options=DSIRConfig,
)
