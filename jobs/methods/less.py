"""LESS (Xia et al. ICML 2024) as a representation, and the `less` method (knn on it, LESS's
subtask mean-max): a warm-up fine-tune, gradient features of every row.

    less/warmup/rows.jsonl          the warm-up rows: min(warmup_fraction x N, warmup_max_rows)
                                    rows of smallest H(warmup_seed, id)
    less/warmup/finetune/           the warm-up LoRA fine-tune (the fine-tune stage on Ray Train),
                                    epochs/epoch-NNN.pt: each epoch's end, weights + Adam moments
    features/<side>/less-<key>/<part digest>/rows-A-B.parquet
                                    per row, C checkpoints x proj_dim unit-norm features: Adam-
                                    preconditioned gradients for the pool, plain ones for the
                                    targets (an actor pool; one file per chunk, committed as it
                                    finishes: a killed run loses the chunks in flight)

`<key>` digests what the features depend on (the warm-up's fingerprint, the projection, the token
length, the model), never the run's seed or the targets: every seed, target and `raysift evaluate`
run reuses the pool's features. As a representation a row is one vector, the concatenation of
sqrt(w_c) x its checkpoint-c feature (w_c the checkpoint weights, sum 1): a plain inner product is
LESS's weighted sum (engine.less.scores), so knn, tsds and gotd all run on it; `method: less` is
knn with the subtask mean-max aggregation, LESS's own score. The driver holds the targets'
features (M x C x proj_dim) and B rows; the warm-up's rows (at most warmup_max_rows) pass through
it once, into rows.jsonl. The math is in `engine.less`.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np

from raysift.actors.gradients import LessFeatures
from raysift.actors.partitions import fetch_rows, map_parts, merge_ranked
from raysift.actors.pool import map_actors
from raysift.engine import less
from raysift.engine.ids import hash_uniform
from raysift.engine.selection import Ranked
from raysift.jobs.config import Config, LessConfig, to_yaml
from raysift.jobs.core.console import progress
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.pool import (
    Pool,
    Vectors,
    as_strings,
    chunk_file,
    drop_stale_parts,
    missing_chunks,
    plan_chunks,
    read_part,
    row_columns,
)
from raysift.jobs.core.runfolder import RunFolder, write_jsonl, write_text
from raysift.jobs.core.storage import Store
from raysift.jobs.finetune import check_model
from raysift.jobs.methods import knn
from raysift.jobs.methods.base import Context, Method, Representation, all_checks
from raysift.jobs.runtime import start_ray
from raysift.jobs.vectors import resolve_threads

WARMUP = f"{RunFolder.LESS}/warmup"
STEPS_WARMUP_RATIO = 0.03  # the reference's linear warm-up over 3% of the steps


def check_less(cfg: Config, targets: Pool) -> None:
    """The checks that need the data: targets exist, the subtask column is carried."""
    o = cfg.select.less
    if targets.n == 0:
        raise InputError("targets: LESS scores pool rows against target gradients; none given")
    if o.subtask_column is not None and o.subtask_column not in targets.columns:
        raise InputError(
            f"select.less.subtask_column: {o.subtask_column!r} is not a targets column (add it to "
            f"targets.keep_columns); targets have {[c for c in targets.columns if c != 'row']}"
        )


def check_static(cfg: Config) -> None:
    """The checks that need neither data nor cluster: the model exists."""
    check_model(cfg.finetune.model)


# -- the warm-up ----------------------------------------------------------------------------------


def _smallest_hash(pool: Pool, part, seed: int, k: int) -> Ranked:
    """A task: the part's k rows of smallest H(seed, id)."""
    ids = as_strings(read_part(pool, part, ["id"]).column("id"))
    u = np.asarray(hash_uniform([f"less:{i}" for i in ids], seed))
    return Ranked(-u, ids, part.first + np.arange(len(ids)), u).top(k)


def warmup_rows(pool: Pool, fraction: float, cap: int, seed: int) -> np.ndarray:
    """The warm-up's pool rows: the n = min(ceil(fraction x N), cap) rows of smallest
    H(seed, id) -- the same rows whatever the parts."""
    n = min(max(1, math.ceil(fraction * pool.n)), cap, pool.n)
    best = merge_ranked(map_parts(_smallest_hash, pool, seed, n), n)
    return np.sort(best.row)


def warmup_config(cfg: Config, folder: Path, rows: int) -> Config:
    """The warm-up's fine-tune settings: LESS's LoRA, epochs, token length and learning rate; the
    linear warm-up over 3% of the steps (the reference's); the run's batch and workers."""
    from raysift.jobs.finetune import plan

    o = cfg.select.less
    tree = cfg.model_dump(mode="json")
    tree["output_dir"] = str(folder)
    tree["seed"] = o.warmup_seed
    f = tree["finetune"]
    f.update(method="lora", init_adapter=None, lora_r=o.lora.r, lora_alpha=o.lora.alpha,
             lora_dropout=o.lora.dropout, lora_target_modules=list(o.lora.modules),
             epochs=o.warmup_epochs, max_steps=None, max_length=o.max_length,
             learning_rate=o.learning_rate or cfg.finetune.learning_rate,
             weight_decay=0.0)  # fmt: skip
    sub = Config.model_validate(tree)
    _, total = plan(rows, sub.finetune, sub.finetune.num_workers)
    return sub.model_copy(update={"finetune": sub.finetune.model_copy(
        update={"warmup_steps": math.ceil(STEPS_WARMUP_RATIO * total)})})  # fmt: skip


def warm_up(cfg: Config, folder: Path, pool: Pool, log) -> dict:
    """The warm-up fine-tune with a state per epoch (reused when its rows and settings are)."""
    from raysift.jobs.finetune import EPOCHS, epoch_state_name, plan, run_finetune

    o = cfg.select.less
    rows = warmup_rows(pool, o.warmup_fraction, o.warmup_max_rows, o.warmup_seed)
    folder.mkdir(parents=True, exist_ok=True)
    table = fetch_rows(pool, rows, ["id", *row_columns(pool)])
    write_jsonl(folder / "rows.jsonl", table)
    sub = warmup_config(cfg, folder, table.num_rows)
    write_text(folder / RunFolder.CONFIG, to_yaml(sub))
    log(f"less: warm-up on {table.num_rows:,} rows, {o.warmup_epochs} epochs")
    info = run_finetune(sub, folder, folder / "rows.jsonl", epoch_states=True)
    per_epoch, total = plan(table.num_rows, sub.finetune, sub.finetune.num_workers)
    epochs = math.ceil(total / per_epoch)
    states = [f"{EPOCHS}/{epoch_state_name(e)}" for e in range(1, epochs + 1)]
    store = Store.for_run(folder)
    missing = [s for s in states if not store.is_file(s)]
    if missing:
        raise RuntimeError(f"{store.uri_of(missing[0])}: the warm-up left no state for this epoch")
    rates = less.epoch_learning_rates(
        per_epoch, total, sub.finetune.warmup_steps, sub.finetune.learning_rate
    )
    return {"rows": table.num_rows, "steps": total, "per_epoch": per_epoch, "states": states,
            "learning_rates": rates, "store": store, "finetune": info,
            "fingerprint": (folder / RunFolder.FINGERPRINT).read_text()}  # fmt: skip


# -- features -------------------------------------------------------------------------------------


def feature_key(cfg: Config, warmup_fingerprint: str) -> str:
    """What the features depend on: the warm-up (rows, settings, seed), the projection, the token
    length, the model and the loss."""
    o = cfg.select.less
    settings = {"warmup": warmup_fingerprint, "proj_dim": o.proj_dim, "seed": o.warmup_seed,
                "max_length": o.max_length, "model": cfg.finetune.model, "loss": "ce",
                "lora": o.lora.model_dump(mode="json")}  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def features_root(pool: Pool, key: str) -> str:
    return RunFolder.features(pool.side, f"less-{key}")


def compute_features(cfg: Config, pool: Pool, targets: Pool, warm: dict) -> dict:
    """Every missing chunk's features, pool and targets, on an actor pool (one GPU each where
    the cluster has GPUs). Returns counts and the feature roots."""
    import ray

    o = cfg.select.less
    key = feature_key(cfg, warm["fingerprint"])
    roots = {side.side: features_root(side, key) for side in (pool, targets)}
    for side in (pool, targets):
        drop_stale_parts(side, roots[side.side])
    items = plan_chunks(pool, o.chunk_rows) + plan_chunks(targets, o.chunk_rows)
    todo = missing_chunks(items, roots)
    stats: dict = {"chunks": len(items), "chunks_computed": 0,
                   "chunks_reused": len(items) - len(todo), "key": key}  # fmt: skip
    if todo:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        cpus = ray.cluster_resources().get("CPU", 1)
        actors = o.num_actors or max(1, int(cpus // o.cpus_per_actor))
        threads = resolve_threads(
            cfg.embed.model_copy(update={"num_actors": actors, "torch_threads": None}), gpus
        )
        args = {"base": cfg.finetune.model, "lora": o.lora.model_dump(mode="json"),
                "states": warm["states"], "store": warm["store"],
                "roots": roots, "k": o.proj_dim, "seed": o.warmup_seed,
                "max_length": o.max_length, "chunk": o.chunk, "torch_threads": threads}  # fmt: skip
        rows = sum(i["b"] - i["a"] for i in todo)
        t0 = time.perf_counter()
        with progress("less: features", rows, "rows") as shown:
            for r in map_actors(LessFeatures, args, todo, min(actors, len(todo)),
                                num_cpus=o.cpus_per_actor, num_gpus=gpus):  # fmt: skip
                stats["chunks_computed" if r["computed"] else "chunks_reused"] += 1
                shown.advance(r["rows"])
        stats["feature_seconds"] = round(time.perf_counter() - t0, 1)
        stats["rows_computed"] = rows
    return {**stats, "roots": roots}


def read_chunk(store, rel: str, checkpoints: int) -> np.ndarray:
    """A feature file -> (n, C, k) float32."""
    col = store.parquet(rel).read(columns=["features"]).column("features").combine_chunks()
    flat = col.values.to_numpy(zero_copy_only=False)
    return flat.reshape(len(col), checkpoints, -1)


def target_features(targets: Pool, root: str, chunk_rows: int, checkpoints: int) -> np.ndarray:
    """(M, C, k): every target's features, in target row order."""
    items = plan_chunks(targets, chunk_rows)
    return np.concatenate([read_chunk(targets.store, chunk_file(root, i), checkpoints)
                           for i in items])  # fmt: skip


def warmup_folder(pool: Pool, run_dir: Path) -> Path:
    """Where the warm-up lives: beside the pool when the pool's run folder is local (every
    `raysift evaluate` sub-run and seed shares it), else in this run's folder."""
    import pyarrow.fs as pafs

    if isinstance(pool.store.fs, pafs.LocalFileSystem):
        return Path(pool.store.root) / WARMUP
    return run_dir / WARMUP


def prepare(ctx: Context) -> tuple[Pool, Pool, dict]:
    """The `less` representation: warm up (reused), compute every missing chunk's features of
    both sides, and return the pools reading them as vectors: row i's vector is the concatenation
    of sqrt(w_c) x its unit-norm feature of checkpoint c, so a plain inner product of a pool row
    and a target is LESS's sum_c w_c Gamma_c . G_c (and the vector has unit norm: sum w_c = 1)."""
    cfg, pool, targets = ctx.cfg, ctx.pool, ctx.targets
    o = cfg.select.less
    start_ray(cfg.ray)
    check_less(cfg, targets)
    warm = warm_up(cfg, warmup_folder(pool, ctx.run_dir), pool, ctx.log)
    C = len(warm["states"])
    if o.checkpoint_weights == "auto":
        weights = less.checkpoint_weights(warm["learning_rates"])
    else:
        weights = less.checkpoint_weights(o.checkpoint_weights)
    feats = compute_features(cfg, pool, targets, warm)
    roots = feats.pop("roots")
    scale = tuple(float(x) for x in np.sqrt(weights))
    info = {
        "warmup_rows": warm["rows"],
        "warmup_steps": warm["steps"],
        "checkpoints": C,
        "checkpoint_weights": [round(float(w), 6) for w in weights],
        "proj_dim": o.proj_dim,
        "dim": C * o.proj_dim,
        **feats,
    }
    return (pool.with_vectors(Vectors(roots["candidates"], "features", scale)),
            targets.with_vectors(Vectors(roots["targets"], "features", scale)), info)  # fmt: skip


REPRESENTATION = Representation(
    name="less",
    summary="LESS's Adam-preconditioned LoRA gradients after a warm-up (checkpoints x proj_dim)",
    prepare=prepare,
    similarity="checkpoint-weighted cosine of LoRA gradient features (LESS)",
    options=LessConfig,
    checks=check_static,
)

METHOD = Method(
    name="less",
    summary="LESS: knn on the less representation, subtask mean-max",
    select=knn.select,
    score="LESS gradient cosine, subtask mean-max",
    needs=frozenset({"vectors"}),
    options=LessConfig,
    checks=lambda cfg: all_checks(cfg, check_static, knn.checks),
)


def load_state(store, rel: str) -> dict:
    """One epoch state (weights, moments, step), on the CPU."""
    return less.read_state(store.read_bytes(rel))


def committed_chunks(store, root: str) -> list[str]:
    """The committed feature files under a features root, as `<digest>/rows-A-B.parquet`."""
    return sorted(
        f"{d}/{f}" for d in store.folders(root) for f in store.list(f"{root}/{d}")
        if f.endswith(".parquet")
    )  # fmt: skip
