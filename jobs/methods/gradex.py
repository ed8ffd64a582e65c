"""GradEx as a job: choose data sources by estimating fine-tunes on subsets of them.

    gradex/sample.parquet           rows_per_source rows of every source (seeded by id hash)
    gradex/meta/finetune/model      theta*: a multitask LoRA fine-tune on the sample (Ray Train)
    gradex/gradients/{train,target}/part-*.parquet
                                    per-sample (id, source, f0, G) and per-token (id, token, f0, G)
                                    at theta* (Ray Data actors; committed shard by shard, resumed)
    gradex/estimates.parquet        every sampled subset (its sources) and L_hat(S)
    gradex/sources.parquet          per source: rows, ensemble score, surrogate theta, chosen
    gradex/result.json              estimator, strategy, chosen sources, timings
    gradex/validation/<i>/          --validate: real fine-tunes from theta* on sampled subsets
    gradex/validation.json          estimated vs real, Spearman/Pearson/relative error, trivial
                                    predictors, CPU time per estimate vs per fine-tune

The select stage (`select.method: gradex`) then takes the pool rows of the chosen sources, in a
seeded id-hash order, up to the budget, for the fine-tune stage (which starts from the base model).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raysift.actors.gradients import Gradients
from raysift.actors.partitions import column_counts, fetch_rows, map_parts
from raysift.engine import gradex as gx
from raysift.engine.ids import hash_uniform
from raysift.engine.selection import Ranked, Selection
from raysift.jobs.config import Config, GradExConfig, to_yaml
from raysift.jobs.core.console import progress
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.pool import Pool, as_strings, load_pool, read_part, read_rows
from raysift.jobs.core.runfolder import (
    TMP_PREFIX,
    RunFolder,
    write_json,
    write_jsonl,
    write_parquet,
    write_text,
)
from raysift.jobs.core.storage import Store
from raysift.jobs.finetune import check_model
from raysift.jobs.methods.base import Context, Method
from raysift.jobs.runtime import start_ray
from raysift.jobs.vectors import resolve_threads

if TYPE_CHECKING:
    import torch

FOLDER = RunFolder.GRADEX


def check_gradex(cfg: Config, pool: Pool, targets: Pool) -> tuple[list[str], dict]:
    """Every GradEx input check; returns the source names (sorted) and their row counts."""
    g = cfg.select.gradex
    if cfg.finetune.method != "lora":
        raise InputError(
            "finetune.method: GradEx linearises around a LoRA meta-initialisation; use lora"
        )
    if g.source_column not in pool.columns:
        raise InputError(
            f"select.gradex.source_column: {g.source_column!r} is not a candidate column; add it "
            f"to candidates.keep_columns (have: {cfg.candidates.keep_columns})"
        )
    counts = column_counts(pool, g.source_column)
    if counts.get(None):
        raise InputError(
            f"select.gradex.source_column: {counts[None]} candidate rows have no "
            f"{g.source_column!r}"
        )
    names = sorted(counts)
    if len(names) < 2:
        raise InputError(
            f"select.gradex.source_column: {g.source_column!r} has {len(names)} distinct value"
            f"{'s' if len(names) != 1 else ''}; GradEx chooses among >= 2 sources"
        )
    if targets.n == 0:
        raise InputError("targets: GradEx scores the target's evaluation texts, and there are none")
    return names, counts


def _source_ranked(pool: Pool, part, column: str, seed: int, k: int, keep) -> dict:
    """A task: per source, the part's k rows of smallest u = H(seed, id) (`keep`: only these
    sources)."""
    table = read_part(pool, part, ["id", column])
    ids, src = as_strings(table.column("id")), as_strings(table.column(column))
    u = np.asarray(hash_uniform(ids, seed))
    out = {}
    for name in np.unique(src):
        if keep is not None and name not in keep:
            continue
        mine = np.flatnonzero(src == name)
        out[str(name)] = Ranked(-u[mine], ids[mine], part.first + mine, u[mine]).top(k)
    return out


def _merge_sources(k: int, *parts: dict) -> dict:
    names = {n for p in parts for n in p}
    return {n: Ranked.merge([p[n] for p in parts if n in p], k) for n in names}


def ranked_by_source(pool: Pool, column: str, seed: int, k: int, keep=None) -> dict:
    """Per source, its k rows of smallest H(seed, id), ties by id: per-part tasks merged in a
    tree of tasks (the driver receives sources x k rows)."""
    import ray

    refs = map_parts(_source_ranked, pool, column, seed, k, keep)
    merge = ray.remote(_merge_sources)
    while len(refs) > 1:
        refs = [merge.remote(k, *refs[i : i + 16]) for i in range(0, len(refs), 16)]
    return ray.get(refs[0])


def source_sample(pool: Pool, column: str, per_source: int, seed: int) -> pa.Table:
    """(id, source, text): the `per_source` rows of each source with the smallest H(seed, id),
    sorted by source then id -- the same rows whatever the pool's row order or parts."""
    best = ranked_by_source(pool, column, seed, per_source)
    rows = np.concatenate([best[n].row for n in sorted(best)])
    table = fetch_rows(pool, rows, ["id", column, "text"])
    order = pc.sort_indices(table, [(column, "ascending"), ("id", "ascending")])
    table = table.take(order)
    return pa.table({"id": table["id"], "source": pc.cast(table[column], pa.string()),
                     "text": table["text"]})  # fmt: skip


# -- meta-initialisation and gradients ------------------------------------------------------------


def _sub_config(cfg: Config, folder: Path, **finetune) -> Config:
    tree = cfg.model_dump(mode="json")
    tree["output_dir"] = str(folder)
    tree["finetune"].update(finetune)
    return Config.model_validate(tree)


def meta_init(cfg: Config, gdir: Path, sample: pa.Table, log) -> tuple[Path, dict]:
    """theta*: LoRA fine-tune of the base model on every source's sample (multitask)."""
    from raysift.jobs.finetune import run_finetune

    g = cfg.select.gradex
    folder = gdir / "meta"
    folder.mkdir(parents=True, exist_ok=True)
    rows = folder / "rows.jsonl"
    write_jsonl(rows, sample.select(["id", "text", "source"]))
    sub = _sub_config(
        cfg, folder, init_adapter=None, epochs=g.meta_epochs,
        learning_rate=g.meta_learning_rate or cfg.finetune.learning_rate, max_steps=None,
    )  # fmt: skip
    write_text(folder / RunFolder.CONFIG, to_yaml(sub))
    log(f"gradex: meta-initialisation on {sample.num_rows} rows")
    info = run_finetune(sub, folder, rows)
    return folder / RunFolder.MODEL, info


def shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("part-*.parquet") if not p.name.startswith(TMP_PREFIX))


def committed_ids(folder: Path) -> pa.Array:
    tables = [pq.read_table(p, columns=["id"]) for p in shard_files(folder)]
    if not tables:
        return pa.array([], pa.string())
    return pa.concat_tables(tables).column("id").combine_chunks()


def check_settings(folder: Path, wanted: dict) -> int:
    """Discard the gradient shards of `folder` made with other settings (`_settings.json`);
    returns how many."""
    path = folder / "_settings.json"
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError):
        existing = None
    discarded = 0
    if existing is not None and existing != wanted:
        for p in shard_files(folder):
            p.unlink()
            discarded += 1
    if existing != wanted:
        write_json(path, wanted)
    return discarded


def _gradient_settings(cfg: Config, adapter: Path) -> dict:
    g = cfg.select.gradex
    return {
        "adapter": (adapter.parent / "fingerprint").read_text(),
        "k": g.projection_dim,
        "seed": cfg.seed,
        "max_length": g.max_length,
        "clip_p": g.clip_p,
        "model": cfg.finetune.model,
    }


def compute_gradients(cfg: Config, gdir: Path, table: pa.Table, kind: str, adapter: Path) -> dict:
    """Gradients of `table`'s rows at theta* into gradients/<kind>/part-*.parquet: only the rows
    without a committed shard (a rerun after a kill loses at most the shards in flight)."""
    import ray

    from raysift.actors.pool import map_actors

    g = cfg.select.gradex
    folder = gdir / "gradients" / kind
    folder.mkdir(parents=True, exist_ok=True)
    discarded = check_settings(folder, _gradient_settings(cfg, adapter))
    done = committed_ids(folder)
    todo = table.filter(pc.invert(pc.is_in(table.column("id"), value_set=done)))
    info = {"rows": table.num_rows, "rows_reused": table.num_rows - todo.num_rows,
            "shards_discarded": discarded}  # fmt: skip
    if todo.num_rows:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0  # one per actor
        # a target text yields one gradient per token: a call takes rows_per_call / 16 texts
        # (P's blocks are generated once per call, so calls should not be tiny either)
        per_call = g.rows_per_call if kind == "train" else max(1, g.rows_per_call // 16)
        threads = resolve_threads(
            cfg.embed.model_copy(update={"num_actors": g.num_actors, "torch_threads": None}), gpus
        )
        args = {"base": cfg.finetune.model, "adapter": str(adapter), "kind": kind,
                "k": g.projection_dim, "seed": cfg.seed, "max_length": g.max_length,
                "chunk": g.chunk, "clip": g.clip_p, "torch_threads": threads}  # fmt: skip
        slices = [todo.slice(a, per_call) for a in range(0, todo.num_rows, per_call)]
        done = map_actors(Gradients, args, slices, g.num_actors, num_cpus=g.cpus_per_actor,
                          num_gpus=gpus)  # fmt: skip
        with progress(f"gradex: {kind} gradients", todo.num_rows, "rows") as shown:
            for shard in done:
                shard = shard.combine_chunks()
                ids = pc.unique(shard.column("id"))
                name = hashlib.sha1("\n".join(ids.to_pylist()).encode()).hexdigest()[:16]
                write_parquet(folder / f"part-{name}.parquet", shard)
                shown.advance(len(ids))
    have = committed_ids(folder)
    missing = int(pc.sum(pc.invert(pc.is_in(table.column("id"), value_set=have))).as_py() or 0)
    if missing:
        raise RuntimeError(f"gradex gradients {kind}: {missing} rows have no committed gradient")
    info["shards"] = len(shard_files(folder))
    return info


def _read(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in shard_files(folder))


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def load_train(gdir: Path, sample: pa.Table, names: list[str]) -> gx.SourceGradients:
    table = _read(gdir / "gradients" / "train")
    order = {k: i for i, k in enumerate(table.column("id").to_pylist())}
    take = pa.array([order[i] for i in sample.column("id").to_pylist()])
    table = table.take(take)
    codes = {n: i for i, n in enumerate(names)}
    source = np.array([codes[s] for s in sample.column("source").to_pylist()])
    return gx.SourceGradients(
        table.column("f0").to_numpy(), _matrix(table.column("G")), source, names
    )


def load_target(gdir: Path, target_ids: list[str]) -> gx.TargetGradients:
    table = _read(gdir / "gradients" / "target")
    rank = {k: i for i, k in enumerate(target_ids)}
    key = np.array([rank[i] for i in table.column("id").to_pylist()], np.int64)
    order = np.lexsort((table.column("token").to_numpy(), key))
    table = table.take(pa.array(order))
    return gx.TargetGradients(table.column("f0").to_numpy(), _matrix(table.column("G")))


# -- estimates ------------------------------------------------------------------------------------


def _weights(cfg: Config, estimator: str, grads, subsets, gram, norm) -> np.ndarray:
    g = cfg.select.gradex
    if estimator == "offset":
        return gx.offset_weights(grads, subsets, g.l2)
    if estimator == "reference":
        W = gx.reference_weights(grads, subsets, C=g.reference_C, label_p=g.reference_label_p,
                                 seed=cfg.seed)  # fmt: skip
    else:
        W = gx.reference_fast_weights(grads, subsets)
    return gx.rescale(W, gram, g.reference_scale * norm)


def _estimate_chunk(cfg_tree: dict, estimator: str, grads, target, subsets, gram, norm):
    """L_hat of each subset in the chunk and the CPU seconds it took (a Ray task's body)."""
    t0 = time.process_time()
    cfg = Config.model_validate(cfg_tree)
    W = _weights(cfg, estimator, grads, subsets, gram, norm)
    losses = target.loss(W, cfg.select.gradex.c)
    return losses, time.process_time() - t0


class Estimator:
    """Estimates L_hat(S) for any batch of subsets with the configured estimator."""

    def __init__(
        self, cfg: Config, adapter: Path, grads, target, target_texts: list[str], like=None
    ):
        """`like`: another Estimator of the same theta* whose loaded model and P^T P to reuse."""
        self.cfg = cfg
        self.grads, self.target = grads, target
        self.adapter = adapter
        self.texts = target_texts
        g = cfg.select.gradex
        self._gm = like._gm if like is not None else None
        if like is not None:
            self._batches = getattr(like, "_batches", None)
        self.gram: torch.Tensor | None = like.gram if like is not None else None
        self.norm: torch.Tensor | None = like.norm if like is not None else None
        if (
            self.gram is None
            and g.estimator != "offset"
            and not (g.estimator == "functional" and g.functional_weights == "offset")
        ):
            gm = self.gradient_model()
            self.gram, self.norm = gm.projector.gram(), gm.adapter_norm()
        self.cpu_seconds = 0.0
        self.estimates = 0

    def gradient_model(self):
        if self._gm is None:
            import torch

            from raysift.engine import lm

            torch.set_num_threads(os.cpu_count() or 1)
            g = self.cfg.select.gradex
            model, tok = lm.load_finetuned(self.cfg.finetune.model, self.adapter)
            shapes = gx.GradientModel.adapter_shapes(model)
            self._gm = gx.GradientModel(
                model, gx.Projector(shapes, g.projection_dim, self.cfg.seed)
            )
            examples = [lm.encode_text(tok, t, g.max_length) for t in self.texts]
            self._batches = [
                lm.collate(examples[i : i + 16], tok.pad_token_id)
                for i in range(0, len(examples), 16)
            ]
        return self._gm

    def __call__(self, subsets: np.ndarray) -> np.ndarray:
        import ray

        g = self.cfg.select.gradex
        subsets = np.atleast_2d(subsets)
        if g.estimator == "functional":
            t0 = time.process_time()
            W = _weights(self.cfg, g.functional_weights, self.grads, subsets, self.gram, self.norm)
            gm = self.gradient_model()
            out = np.array([gm.loss_at(w, self._batches) for w in W])
            self.cpu_seconds += time.process_time() - t0
            self.estimates += len(subsets)
            return out
        tasks = min(g.estimate_tasks, len(subsets))
        if tasks <= 1 or not ray.is_initialized():
            tree = self.cfg.model_dump(mode="json")
            out, cpu = _estimate_chunk(
                tree, g.estimator, self.grads, self.target, subsets, self.gram, self.norm
            )
        else:
            remote = ray.remote(num_cpus=1)(_estimate_chunk)
            shared = [ray.put(x) for x in (self.cfg.model_dump(mode="json"), self.grads,
                                           self.target, self.gram)]  # fmt: skip
            refs = [
                remote.remote(
                    shared[0], g.estimator, shared[1], shared[2], chunk, shared[3], self.norm
                )  # fmt: skip
                for chunk in np.array_split(subsets, tasks)
            ]
            parts = ray.get(refs)
            out = np.concatenate([p[0] for p in parts])
            cpu = sum(p[1] for p in parts)
        self.cpu_seconds += cpu
        self.estimates += len(subsets)
        return out


def choose(cfg: Config, names: list[str], subsets, losses, estimate) -> tuple[np.ndarray, dict]:
    """The chosen sources (0/1 mask) by the configured strategy, and per-source scores."""
    g = cfg.select.gradex
    n = len(names)
    scores = gx.ensemble_scores(subsets, losses)
    _, theta = gx.surrogate(subsets, losses)
    n_keep = max(1, math.ceil(g.keep * n))
    ids = np.array(names)
    ranked = np.lexsort((ids, np.nan_to_num(scores, nan=np.inf)))  # best (lowest) first
    mask = np.zeros(n, np.int8)
    extra: dict = {}
    if g.strategy == "ensemble":
        mask[ranked[:n_keep]] = 1
    elif g.strategy == "surrogate":
        mask[theta < g.threshold] = 1
        if not mask.any():  # nothing below the threshold: the single best source
            mask[int(np.argmin(theta))] = 1
    elif g.strategy == "forward":
        mask, trace = gx.forward_selection(ranked, lambda m: float(estimate(m[None])[0]))
        extra["forward_trace"] = [float(x) for x in trace]
    elif g.strategy == "random":
        u = np.asarray(hash_uniform([f"source:{x}" for x in names], cfg.seed))
        mask[np.argsort(u, kind="stable")[:n_keep]] = 1
    else:  # all
        mask[:] = 1
    return mask, {"ensemble_score": scores, "surrogate_theta": theta, **extra}


def prepare(cfg: Config, run_dir: Path, log, data: Store | None = None) -> dict:
    """Sample, meta-init, gradients: everything an estimate needs, resumable."""
    start_ray(cfg.ray)
    store = data or Store.for_run(run_dir)
    pool, targets = load_pool(store, "candidates"), load_pool(store, "targets")
    names, counts = check_gradex(cfg, pool, targets)
    g = cfg.select.gradex
    gdir = run_dir / FOLDER
    gdir.mkdir(parents=True, exist_ok=True)
    sample = source_sample(pool, g.source_column, g.rows_per_source, cfg.seed)
    write_parquet(gdir / "sample.parquet", sample)
    target_rows = read_rows(targets, 0, min(g.target_texts, targets.n), ["id", "text"])
    adapter, meta = meta_init(cfg, gdir, sample, log)
    t0 = time.perf_counter()
    log(f"gradex: gradients of {sample.num_rows} rows and {target_rows.num_rows} target texts")
    info: dict = {
        "train": compute_gradients(
            cfg, gdir, sample.select(["id", "source", "text"]), "train", adapter
        ),  # fmt: skip
        "target": compute_gradients(cfg, gdir, target_rows, "target", adapter),
    }
    info["seconds"] = round(time.perf_counter() - t0, 1)
    grads = load_train(gdir, sample, names)
    target = load_target(gdir, target_rows.column("id").to_pylist())
    estimator = Estimator(cfg, adapter, grads, target, target_rows.column("text").to_pylist())
    return {"pool": pool, "counts": counts, "names": names, "sample": sample, "adapter": adapter,
            "meta": meta, "gradients": info, "estimator": estimator, "gdir": gdir}  # fmt: skip


def estimate_sources(cfg: Config, run_dir: Path, log=print, data: Store | None = None) -> dict:
    """Prepare, estimate the sampled subsets, choose sources; writes the gradex/ outputs."""
    g = cfg.select.gradex
    ctx = prepare(cfg, run_dir, log, data)
    names, est, gdir = ctx["names"], ctx["estimator"], ctx["gdir"]
    n = len(names)
    size = max(1, min(n, round(g.subset_fraction * n)))
    subsets = gx.sample_subsets(n, g.subsets, size, cfg.seed)
    log(f"gradex: {g.estimator} estimates of {len(subsets)} subsets of {size}/{n} sources")
    t0 = time.perf_counter()
    losses = est(subsets)
    wall = time.perf_counter() - t0
    mask, scores = choose(cfg, names, subsets, losses, est)
    write_parquet(
        gdir / "estimates.parquet",
        pa.table(
            {
                "sources": pa.array([[names[i] for i in np.flatnonzero(s)] for s in subsets]),
                "estimated_loss": pa.array(losses),
            }
        ),  # fmt: skip
    )
    rows = ctx["counts"]
    write_parquet(
        gdir / "sources.parquet",
        pa.table({
            "source": names,
            "rows": [rows[x] for x in names],
            "ensemble_score": scores["ensemble_score"],
            "surrogate_theta": scores["surrogate_theta"],
            "chosen": mask.astype(bool),
        }),
    )  # fmt: skip
    result = {
        "estimator": g.estimator,
        "strategy": g.strategy,
        "sources": names,
        "chosen": [names[i] for i in np.flatnonzero(mask)],
        "subsets": len(subsets),
        "subset_size": size,
        "loss_at_theta_star": ctx["estimator"].target.base_loss(),
        "estimate_wall_seconds": round(wall, 3),
        "estimate_cpu_seconds": round(est.cpu_seconds, 3),
        "gradients": ctx["gradients"],
        "meta": {k: ctx["meta"].get(k) for k in ("steps", "final_loss", "train_seconds")},
        **{k: v for k, v in scores.items() if k == "forward_trace"},
    }
    write_json(gdir / "result.json", result)
    return {**ctx, "mask": mask, "result": result, "size": size, "scores": scores}


def select(ctx: Context) -> Selection:
    """The select stage's GradEx: the chosen sources' pool rows, up to
    the budget, in a seeded id-hash order (per-part tasks, merged on the workers); the score of a
    row is minus its source's ensemble score."""
    cfg = ctx.cfg
    g = cfg.select.gradex
    if g.strategy in ("random", "all"):  # the baselines need no gradients
        start_ray(cfg.ray)
        names, counts = check_gradex(cfg, ctx.pool, ctx.targets)
        mask, _ = choose(cfg, names, np.ones((1, len(names))), np.zeros(1), None)
        scores = np.zeros(len(names))
    else:
        out = estimate_sources(cfg, ctx.run_dir, ctx.log, ctx.pool.store)
        names, counts, mask = out["names"], out["counts"], out["mask"]
        scores = out["scores"]["ensemble_score"]
    chosen = sorted(np.array(names)[mask.astype(bool)].tolist())
    available = sum(counts[s] for s in chosen)
    best = ranked_by_source(ctx.pool, g.source_column, cfg.seed, ctx.budget, set(chosen))
    merged = Ranked.merge(list(best.values()), min(ctx.budget, available))
    score = dict(zip(names, -np.nan_to_num(scores, nan=np.inf), strict=True))
    source_of = {n: s for s, r in best.items() for n in r.row.tolist()}
    sel = Selection(merged.row, np.array([score[source_of[r]] for r in merged.row.tolist()]))
    sel.info = {"chosen_sources": chosen, "rows_in_chosen_sources": int(available),
                "estimator": g.estimator, "strategy": g.strategy}  # fmt: skip
    return sel


def check_static(cfg: Config) -> None:
    """The checks that need neither data nor cluster: the source column is carried, the model
    exists (its conversion happens here, once)."""
    g = cfg.select.gradex
    if g.source_column not in cfg.candidates.keep_columns:
        raise InputError(
            f"select.gradex.source_column: {g.source_column!r} is not in candidates.keep_columns "
            f"({cfg.candidates.keep_columns})"
        )
    check_model(cfg.finetune.model)


METHOD = Method(
    name="gradex",
    summary="whole data sources chosen by GradEx",
    select=select,
    score="minus the row's source's estimated target loss (0: random / all sources)",
    needs=frozenset({"sources"}),
    options=GradExConfig,
    checks=check_static,
)
