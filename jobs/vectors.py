"""The run folder's committed vectors: where they are, with which settings, what is missing.

What the embed stage writes and every stage that reads vectors checks (select, curate, the
pipeline's skip test): `embeddings/<side>/_settings.json` (where the vectors came from),
`embeddings/<side>/_summary.json` (dimension, rows, source) and the committed chunks
`embeddings/<side>/<digest>/rows-A-B.parquet`. No Ray here: the embed stage (`jobs.embed`) does the
work.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from raysift.jobs.config import EmbedConfig
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.pool import Part, Pool, chunks, load_pool, uncovered
from raysift.jobs.core.runfolder import RunFolder
from raysift.jobs.core.storage import Store

SIDES = ("targets", "candidates")


def settings(pool: Pool, cfg: EmbedConfig) -> dict:
    column = pool.info["spec"].get("vector_column")
    if column:
        return {"source": f"precomputed:{column}", "normalize": cfg.normalize}
    made = {"source": "model", "model": cfg.model, "max_length": cfg.max_length}
    if "messages" in pool.columns and cfg.text != "conversation":
        made["text"] = cfg.text  # which turns of the conversations were embedded
    return made


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
    root = store.path(RunFolder.embeddings(side))
    sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
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
            made = store.read_json(RunFolder.embeddings(side, "_settings.json"))
            summary = store.read_json(RunFolder.embeddings(side, SUMMARY))
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


def write_summary(store: Store, side: str, dim: int, rows: int, source: str) -> None:
    summary = {"dim": dim, "rows": rows, "source": source}
    store.write_json(RunFolder.embeddings(side, SUMMARY), summary)


SUMMARY = "_summary.json"  # what select checks: the vectors' dimension, rows, where they came from


def vector_dim(store: Store, side: str) -> int:
    """The dimension the embed stage recorded for a side."""
    return int(store.read_json(RunFolder.embeddings(side, SUMMARY))["dim"])


def check_vectors_ready(store: Store, side: str, cfg: EmbedConfig) -> None:
    """Every part of `side` has its vectors under the current settings (select's precondition)."""

    pool = load_pool(store, side)
    try:
        existing = store.read_json(RunFolder.embeddings(side, "_settings.json"))
    except (OSError, ValueError):
        existing = None
    ready = existing == settings(pool, cfg) and store.is_file(RunFolder.embeddings(side, SUMMARY))
    if not ready or plan(pool, committed(store, side), cfg.shard_rows):
        raise InputError(
            f"{store.uri_of(f'embeddings/{side}')}: vectors missing or made with other settings; "
            "run the embed stage first"
        )
