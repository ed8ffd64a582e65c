"""The `embedding` representation: the sentence encoder's vectors (`embed.*`, all-MiniLM-L6-v2 by
default), committed by the embed stage in embeddings/<side>/ (`jobs.embed`): what knn, tsds and gotd
have always read. The select stage checks they are there, made with the current settings."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raysift.jobs.config import Config, EmbedConfig
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.pool import Pool
from raysift.jobs.core.storage import Store
from raysift.jobs.methods.base import Context, Representation
from raysift.jobs.vectors import check_vectors_ready, vector_dim


def check_dimensions(store: Store) -> None:
    """Candidates and targets vectors must have one dimension (as the embed stage recorded)."""
    dims = {side: vector_dim(store, side) for side in ("candidates", "targets")}
    if dims["candidates"] != dims["targets"]:
        raise InputError(
            f"{store.uri_of('embeddings')}: targets have dimension {dims['targets']}, candidates "
            f"{dims['candidates']}; embed both sides with the same model"
        )


def committed(ctx: Context) -> tuple[Pool, Pool, dict]:
    """The embed stage's vectors of both sides (the pools as they are: they read embeddings/)."""
    store = ctx.pool.store
    for side in ("targets", "candidates"):
        check_vectors_ready(store, side, ctx.cfg.embed)
    check_dimensions(store)
    return ctx.pool, ctx.targets, {"dim": vector_dim(store, "candidates")}


_ENCODED: dict = {}  # the last texts embedded per side: comparing methods on one pool embeds once


def local(cfg: Config, candidates: pa.Table, targets: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' vectors with the embed stage's encoder and settings, in this process."""
    from raysift.engine.embed import encode, load_encoder

    e = cfg.embed
    key = (e.model, e.max_length, e.batch_size, e.precision, e.gpus_per_actor)
    out = []
    for side, table, column in (("candidates", candidates, cfg.candidates.text_column),
                                ("targets", targets, cfg.targets.text_column)):  # fmt: skip
        texts = table.column(column).to_pylist()
        cached = _ENCODED.get(side)
        if cached is None or cached[0] != key or cached[1] != texts:
            if _ENCODED.get("encoder", (None,))[0] != key:
                gpu = None if e.gpus_per_actor == "auto" else e.gpus_per_actor > 0
                _ENCODED["encoder"] = (key, load_encoder(
                    e.model, max_length=e.max_length, batch_size=e.batch_size,
                    precision=e.precision, num_threads=e.torch_threads, use_gpu=gpu))  # fmt: skip
            _ENCODED[side] = (key, texts, encode(_ENCODED["encoder"][1], texts))
        out.append(_ENCODED[side][2])
    return out[0], out[1]


REPRESENTATION = Representation(
    name="embedding",
    summary="the sentence encoder's vectors (embed.model: all-MiniLM-L6-v2 by default)",
    prepare=committed,
    similarity="cosine of sentence-encoder embeddings",
    options=EmbedConfig,
    embed_stage=True,
    local=local,
)
