"""Embed stage: the pool's parts -> `embeddings/<side>/<digest>/rows-A-B.parquet` (id, vector).

The driver plans from the pool index and one listing of what is committed: every part is cut
into chunks of `embed.shard_rows` rows, and only the ranges no committed chunk covers are planned.
An actor pool (`actors.pool.map_actors`: one model load per actor, a GPU each where the cluster
has them) takes one chunk per call, reads its texts from the run folder, embeds them and commits
the chunk itself (`actors.embedder`); the driver receives one small row per chunk. A killed run
loses at most the chunks in flight: a rerun plans only what is missing. Chunks are keyed on the
part's content digest and rows, never on Ray's block layout, so a re-ingested, unchanged part --
or a pool grown by new parts (curate) -- reuses every committed vector.

Given vectors (`candidates.vector_column` / `targets.vector_column`) take the same plan: a task
per part copies the part's `_vector` column into its chunks (scaled to unit norm unless
`embed.normalize: false`) instead of running a model; the manifest records
`precomputed:<column>`.

`_settings.json` records where the vectors came from (model and max_length, or the column and
normalize); if that changes, the committed chunks are discarded (the vectors would not be
comparable).
"""

from __future__ import annotations

import time

import numpy as np

from raysift.engine.embed import resolve_model_path
from raysift.jobs.config import EmbedConfig
from raysift.jobs.core.console import progress
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.pool import VECTOR, Part, Pool, load_pool, matrix, read_part
from raysift.jobs.core.runfolder import Manifest, RunFolder
from raysift.jobs.core.storage import Store
from raysift.jobs.stages.base import Reuse, Stage, StageRun
from raysift.jobs.vectors import (
    SIDES,
    SUMMARY,
    check_settings,
    committed,
    embeddings_current,
    plan,
    resolve_gpus,
    resolve_threads,
    settings,
    write_summary,
)


def copy_given(pool: Pool, part: Part, ranges: list[tuple[int, int]], normalize: bool) -> dict:
    """A task: commit a part's given vectors (its `_vector` column) as embedding chunks."""
    from raysift.actors.embedder import commit_chunk

    table = read_part(pool, part, ["id", VECTOR])
    vectors = matrix(table.column(VECTOR))
    if normalize:
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).astype(np.float32)
    for a, b in ranges:
        commit_chunk(pool.store, pool.side, part.digest, a, b, table["id"][a:b], vectors[a:b])
    return {"side": pool.side, "rows": sum(b - a for a, b in ranges), "chunks": len(ranges)}


def embed_sides(store: Store, sides: tuple[str, ...], cfg: EmbedConfig) -> dict[str, dict]:
    """Embed every row of the pool's parts that has no committed vector yet.

    All sides go through one actor pool (one model load per actor, not one per side).
    """
    import ray

    infos: dict[str, dict] = {}
    pools = {side: load_pool(store, side) for side in sides}
    model_chunks: list[dict] = []
    given: list[tuple] = []
    for side, pool in pools.items():
        wanted = settings(pool, cfg)
        discarded = check_settings(store, RunFolder.embeddings(side), wanted)
        listing = committed(store, side)
        for digest in set(listing) - {p.digest for p in pool.parts}:  # parts no longer in the pool
            store.delete(RunFolder.embeddings(side, digest))
        todo = plan(pool, listing, cfg.shard_rows)
        infos[side] = {
            "rows": pool.n,
            "rows_reused": pool.n - sum(b - a for _, a, b in todo),
            "rows_embedded": 0,
            "chunks_embedded": 0,
            "shards_discarded": discarded,
            "source": wanted["source"],
            "precision": [],
        }
        if wanted["source"] == "model":
            chat = "messages" in pool.columns
            model_chunks += [{"side": side, "part": p.name, "digest": p.digest, "a": a, "b": b,
                              "chat": chat} for p, a, b in todo]  # fmt: skip
        else:
            by_part: dict[str, list] = {}
            for p, a, b in todo:
                by_part.setdefault(p.name, [p, []])[1].append((a, b))
            given += [(pool, p, ranges) for p, ranges in by_part.values()]
    t0 = time.perf_counter()
    if given:
        task = ray.remote(copy_given)
        for done in ray.get([task.remote(pool, p, r, cfg.normalize) for pool, p, r in given]):
            infos[done["side"]]["rows_embedded"] += done["rows"]
            infos[done["side"]]["chunks_embedded"] += done["chunks"]
    if model_chunks:
        from raysift.actors.embedder import ChunkEmbedder
        from raysift.actors.pool import map_actors

        gpus = resolve_gpus(cfg)
        args = {"store": store, "model": cfg.model, "max_length": cfg.max_length,
                "batch_size": cfg.batch_size, "precision": cfg.precision,
                "torch_threads": resolve_threads(cfg, gpus), "text": cfg.text}  # fmt: skip
        total = sum(c["b"] - c["a"] for c in model_chunks)
        done = map_actors(ChunkEmbedder, args, model_chunks, cfg.num_actors,
                          num_cpus=cfg.cpus_per_actor, num_gpus=gpus)  # fmt: skip
        with progress("embed", total, "texts") as shown:
            for row in done:
                info = infos[row["side"]]
                info["rows_embedded"] += row["rows"]
                info["chunks_embedded"] += 1
                info["dim"] = row["dim"]
                if row["precision"] not in info["precision"]:
                    info["precision"].append(row["precision"])
                shown.advance(row["rows"])
        for side in sides:
            infos[side]["gpus_per_actor"] = gpus
    for side, pool in pools.items():
        listing = committed(store, side)
        missing = plan(pool, listing, cfg.shard_rows)
        if missing:
            raise RuntimeError(
                f"embed {side}: {sum(b - a for _, a, b in missing)} rows have no committed "
                "vector after the stage"
            )
        infos[side]["chunks"] = sum(len(v) for v in listing.values())
        infos[side]["seconds_embedding"] = round(time.perf_counter() - t0, 3)
        infos[side]["dim"] = infos[side].get("dim") or pool.dim or _dim(store, side, pool)
        write_summary(store, side, infos[side]["dim"], pool.n, infos[side]["source"])
    return infos


def _dim(store: Store, side: str, pool: Pool) -> int:
    """The dimension of the committed vectors: the summary of the run that embedded them, else
    one chunk's schema (metadata only)."""
    try:
        return int(store.read_json(RunFolder.embeddings(side, SUMMARY))["dim"])
    except (OSError, ValueError, KeyError):
        folder = pool.chunk_dir(pool.parts[0])
        chunk = store.parquet(f"{folder}/{store.list(folder)[0]}")
        return chunk.schema_arrow.field("vector").type.list_size


def _checks(run: StageRun) -> None:
    if not run.cfg.candidates.vector_column:
        try:
            resolve_model_path(run.cfg.embed.model)
        except FileNotFoundError as exc:
            raise InputError(str(exc)) from None
    if "ingest" not in run.stages:
        for side in SIDES:
            load_pool(run.pool_store, side)  # the index exists (run the ingest stage first, else)


def _current(run: StageRun, manifest: Manifest) -> Reuse | None:
    """Nothing to embed: this run's selection needs no embeddings, or the last embed finished and
    every row still has its vector (recorded as a finished stage that embedded nothing)."""
    from raysift.jobs.stages.select import needs_embed_stage  # the methods: not in embed's workers

    cfg = run.cfg
    if "select" in run.stages and not needs_embed_stage(cfg):
        plan = cfg.plan()
        what = f"on {plan.representation}" if plan.representation else "needs no embeddings"
        return Reuse(f"embed: skipped, {cfg.select.method} {what}")
    if manifest.stage("embed").get("status") != "done":
        return None
    reused = embeddings_current(Store.for_run(run.run_dir), cfg.embed)
    if not reused:
        return None
    return Reuse("embed: every row has its vector, reusing embeddings/", info=reused)


STAGE = Stage(
    name="embed",
    summary="data/<side>/ parts -> embeddings/<side>/<digest>/ chunks (actor pool, resumable)",
    checks=_checks,
    current=_current,
    run=lambda run: embed_sides(Store.for_run(run.run_dir), SIDES, run.cfg.embed),
)
