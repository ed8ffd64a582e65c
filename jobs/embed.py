"""Embed stage: the canonical tables -> `embeddings/<side>/part-*.parquet` (id, vector).

Resumable by id: a shard file is committed by an atomic rename once all its rows are embedded; a
rerun reads the ids already committed and embeds only the rest. Shards are keyed on row ids, never
on Ray block indices, so a rerun with other block sizes, shard sizes or worker counts still reuses
every committed row. `_settings.json` records the model and max_length the vectors came from; if
either changes, the committed shards are discarded (the vectors would not be comparable).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.embedder import Embedder
from jobs.config import Config, EmbedConfig
from jobs.runfolder import TMP_PREFIX, write_json, write_parquet
from jobs.storage import shared_path

SIDES = ("targets", "candidates")


def shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("part-*.parquet") if not p.name.startswith(TMP_PREFIX))


def committed_ids(folder: Path) -> pa.Array:
    tables = [pq.read_table(p, columns=["id"]) for p in shard_files(folder)]
    if not tables:
        return pa.array([], pa.string())
    return pa.concat_tables(tables).column("id").combine_chunks()


def read_embeddings(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors float32 (n, d)) of every committed shard of one side."""
    files = shard_files(folder)
    if not files:
        return np.array([], dtype=str), np.zeros((0, 0), dtype=np.float32)
    table = pa.concat_tables(pq.read_table(p) for p in files)
    vec = table.column("vector").combine_chunks()
    dim = vec.type.list_size
    vectors = (
        vec.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    )
    ids = np.asarray(table.column("id").to_numpy(zero_copy_only=False), dtype=str)
    return ids, vectors


def _settings(cfg: EmbedConfig) -> dict:
    return {"model": cfg.model, "max_length": cfg.max_length}


def check_settings(folder: Path, wanted: dict) -> int:
    """Discard the committed shards of `folder` made with other settings (`_settings.json`: for
    embeddings the model and max_length); returns how many."""
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


def _count_missing(ids: pa.Array, have: pa.Array) -> int:
    return int(pc.sum(pc.invert(pc.is_in(ids, value_set=have))).as_py() or 0)


def _shard_name(ids: pa.Array) -> str:
    digest = hashlib.sha1("\n".join(ids.to_pylist()).encode()).hexdigest()[:16]
    return f"part-{digest}.parquet"


def resolve_gpus(cfg: EmbedConfig) -> float:
    import ray

    if cfg.gpus_per_actor != "auto":
        return float(cfg.gpus_per_actor)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def resolve_threads(cfg: EmbedConfig, gpus: float) -> int:
    """Intra-op threads per actor: the configured number, else this machine's cores / actors.

    Ray sets OMP_NUM_THREADS to the actor's (fractional, rounded) CPU count, which starves a
    lone embedding actor on a small machine; the actors are the work here, so give them the cores.
    """
    if cfg.torch_threads:
        return cfg.torch_threads
    if gpus > 0:
        return max(1, int(cfg.cpus_per_actor))
    return max(1, (os.cpu_count() or 1) // cfg.num_actors)


def _pending(batch: pa.Table, side: str, done: pa.Array) -> pa.Table:
    """Rows of `side` with no committed vector, tagged with their side."""
    if len(done):
        batch = batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=done)))
    return batch.append_column("side", pa.array([side] * batch.num_rows, pa.string()))


def embed_sides(run_dir: Path, sides: tuple[str, ...], cfg: EmbedConfig) -> dict[str, dict]:
    """Embed every row of `data/<side>.parquet` that has no committed vector yet.

    All sides go through one actor pool (one model load per actor, not one per side).
    """
    import ray.data

    infos: dict[str, dict] = {}
    all_ids: dict[str, pa.Array] = {}
    precisions: dict[str, set[str]] = {side: set() for side in sides}
    parts = []
    for side in sides:
        data_path = run_dir / "data" / f"{side}.parquet"
        folder = run_dir / "embeddings" / side
        folder.mkdir(parents=True, exist_ok=True)
        discarded = check_settings(folder, _settings(cfg))
        done = committed_ids(folder)
        all_ids[side] = pq.read_table(data_path, columns=["id"]).column("id").combine_chunks()
        todo = _count_missing(all_ids[side], done)
        infos[side] = {
            "rows": len(all_ids[side]),
            "rows_reused": len(all_ids[side]) - todo,
            "rows_embedded": 0,
            "shards_discarded": discarded,
        }
        if todo:
            path, fs = shared_path(data_path)  # a remote run folder: every node reads it there
            part = ray.data.read_parquet(path, filesystem=fs, columns=["id", "text"])
            parts.append(
                part.map_batches(
                    _pending, batch_format="pyarrow", fn_kwargs={"side": side, "done": done}
                )
            )
    if parts:
        gpus = resolve_gpus(cfg)
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        # Ray Data emits an actor's output when its whole input block is done: blocks of one call
        # each let finished rows stream to the shard writer (and survive a kill) call by call.
        ds = ds.repartition(target_num_rows_per_block=cfg.rows_per_call)
        ds = ds.map_batches(
            Embedder,
            fn_constructor_kwargs={
                "model": cfg.model,
                "max_length": cfg.max_length,
                "batch_size": cfg.batch_size,
                "precision": cfg.precision,
                "torch_threads": resolve_threads(cfg, gpus),
            },
            batch_size=cfg.rows_per_call,
            batch_format="pyarrow",
            num_cpus=cfg.cpus_per_actor,
            num_gpus=gpus,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.num_actors),
        )
        for batch in ds.iter_batches(batch_size=cfg.shard_rows, batch_format="pyarrow"):
            for side in pc.unique(batch.column("side")).to_pylist():
                rows = batch.filter(pc.equal(batch.column("side"), side))
                shard = rows.select(["id", "vector"]).combine_chunks()
                write_parquet(
                    run_dir / "embeddings" / side / _shard_name(shard.column("id")), shard
                )
                infos[side]["rows_embedded"] += shard.num_rows
                precisions[side].update(pc.unique(rows.column("precision")).to_pylist())
        for side in sides:
            infos[side]["gpus_per_actor"] = gpus
    for side in sides:
        infos[side]["precision"] = sorted(precisions[side])
        folder = run_dir / "embeddings" / side
        missing = _count_missing(all_ids[side], committed_ids(folder))
        if missing:
            raise RuntimeError(
                f"embed {side}: {missing} rows have no committed vector after the stage"
            )
        infos[side]["shards"] = len(shard_files(folder))
    return infos


def run_embed(cfg: Config, run_dir: Path) -> dict:
    return embed_sides(run_dir, SIDES, cfg.embed)
