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

import os
import time

import numpy as np
import pyarrow.fs as pafs

from jobs.config import EmbedConfig
from jobs.console import progress
from jobs.pool import VECTOR, Part, Pool, chunks, load_pool, matrix, read_part, uncovered
from jobs.storage import Store

SIDES = ("targets", "candidates")


def settings(pool: Pool, cfg: EmbedConfig) -> dict:
    column = pool.info["spec"].get("vector_column")
    if column:
        return {"source": f"precomputed:{column}", "normalize": cfg.normalize}
    return {"source": "model", "model": cfg.model, "max_length": cfg.max_length}


def check_settings(store: Store, folder: str, wanted: dict) -> int:
    """Discard what `folder` holds if it was made with other settings (`_settings.json`);
    returns how many entries were removed."""
    rel = f"{folder}/_settings.json"
    try:
        existing = store.read_json(rel)
    except (OSError, ValueError):
        existing = None
    discarded = 0
    if existing is not None and existing != wanted:
        names = store.folders(folder) + [n for n in store.list(folder) if not n.startswith("_")]
        for name in names:
            store.delete(f"{folder}/{name}")
            discarded += 1
    if existing != wanted:
        store.write_json(rel, wanted)
    return discarded


def committed(store: Store, side: str) -> dict[str, list[str]]:
    """digest -> chunk file names, from one recursive listing of embeddings/<side>/."""
    sel = pafs.FileSelector(store.path(f"embeddings/{side}"), recursive=True, allow_not_found=True)
    out: dict[str, list[str]] = {}
    for info in store.fs.get_file_info(sel):
        if info.type == pafs.FileType.File and not info.base_name.startswith(".tmp-"):
            digest = info.path.rsplit("/", 2)[-2]
            if digest != side:
                out.setdefault(digest, []).append(info.base_name)
    return out


def plan(pool: Pool, listing: dict[str, list[str]], shard_rows: int) -> list[tuple[Part, int, int]]:
    """(part, a, b) for every range of a part that no committed chunk covers."""
    todo = []
    for part in pool.parts:
        done = chunks(pool, part, listing.get(part.digest, []))
        todo += [(part, a, b) for a, b in uncovered(part.rows, done, shard_rows)]
    return todo


def embeddings_current(store: Store, cfg: EmbedConfig) -> dict | None:
    """The stage's manifest entry when every row of both sides has a committed vector made with
    these settings (one listing per side, as the stage's own plan), else None: nothing to do."""
    infos = {}
    for side in SIDES:
        try:
            pool = load_pool(store, side)
            made = store.read_json(f"embeddings/{side}/_settings.json")
            summary = store.read_json(f"embeddings/{side}/{SUMMARY}")
        except (OSError, ValueError):
            return None
        if made != settings(pool, cfg) or summary.get("rows") != pool.n:
            return None
        listing = committed(store, side)
        if plan(pool, listing, cfg.shard_rows):
            return None
        infos[side] = {"rows": pool.n, "rows_reused": pool.n, "rows_embedded": 0,
                       "chunks_embedded": 0, "shards_discarded": 0, "source": made["source"],
                       "precision": [], "chunks": sum(len(v) for v in listing.values()),
                       "dim": summary["dim"], "seconds_embedding": 0.0}  # fmt: skip
    return infos


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


def copy_given(pool: Pool, part: Part, ranges: list[tuple[int, int]], normalize: bool) -> dict:
    """A task: commit a part's given vectors (its `_vector` column) as embedding chunks."""
    from actors.embedder import commit_chunk

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
    model_chunks, given = [], []
    for side, pool in pools.items():
        wanted = settings(pool, cfg)
        discarded = check_settings(store, f"embeddings/{side}", wanted)
        listing = committed(store, side)
        for digest in set(listing) - {p.digest for p in pool.parts}:  # parts no longer in the pool
            store.delete(f"embeddings/{side}/{digest}")
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
            model_chunks += [{"side": side, "part": p.name, "digest": p.digest, "a": a, "b": b}
                             for p, a, b in todo]  # fmt: skip
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
        from actors.embedder import ChunkEmbedder
        from actors.pool import map_actors

        gpus = resolve_gpus(cfg)
        args = {"store": store, "model": cfg.model, "max_length": cfg.max_length,
                "batch_size": cfg.batch_size, "precision": cfg.precision,
                "torch_threads": resolve_threads(cfg, gpus)}  # fmt: skip
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


def write_summary(store: Store, side: str, dim: int, rows: int, source: str) -> None:
    store.write_json(f"embeddings/{side}/{SUMMARY}", {"dim": dim, "rows": rows, "source": source})


SUMMARY = "_summary.json"  # what select checks: the vectors' dimension, rows, where they came from


def _dim(store: Store, side: str, pool: Pool) -> int:
    """The dimension of the committed vectors: the summary of the run that embedded them, else
    one chunk's schema (metadata only)."""
    try:
        return int(store.read_json(f"embeddings/{side}/{SUMMARY}")["dim"])
    except (OSError, ValueError, KeyError):
        folder = pool.chunk_dir(pool.parts[0])
        chunk = store.parquet(f"{folder}/{store.list(folder)[0]}")
        return chunk.schema_arrow.field("vector").type.list_size


def vector_dim(store: Store, side: str) -> int:
    """The dimension the embed stage recorded for a side."""
    return int(store.read_json(f"embeddings/{side}/{SUMMARY}")["dim"])


def check_vectors_ready(store: Store, side: str, cfg: EmbedConfig) -> None:
    """Every part of `side` has its vectors under the current settings (select's precondition)."""
    from jobs.errors import InputError

    pool = load_pool(store, side)
    try:
        existing = store.read_json(f"embeddings/{side}/_settings.json")
    except (OSError, ValueError):
        existing = None
    ready = existing == settings(pool, cfg) and store.is_file(f"embeddings/{side}/{SUMMARY}")
    if not ready or plan(pool, committed(store, side), cfg.shard_rows):
        raise InputError(
            f"{store.uri_of(f'embeddings/{side}')}: vectors missing or made with other settings; "
            "run the embed stage first"
        )
