"""The `vectors` representation: the user's own vectors (`candidates.vector_column` and
`targets.vector_column`), carried by ingest and committed by the embed stage in embeddings/<side>/
(scaled to unit norm unless `embed.normalize: false`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raysift.jobs.config import Config
from raysift.jobs.core.pool import matrix
from raysift.jobs.methods.base import Representation
from raysift.jobs.methods.embedding import committed


def local(cfg: Config, candidates: pa.Table, targets: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' given vectors, from the tables' vector columns."""
    out = []
    for table, spec in ((candidates, cfg.candidates), (targets, cfg.targets)):
        x = np.asarray(np.stack(table.column(spec.vector_column).to_pylist()), np.float32) if (
            not pa.types.is_fixed_size_list(table.schema.field(spec.vector_column).type)) else (
            matrix(table.column(spec.vector_column)))  # fmt: skip
        if cfg.embed.normalize:
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
        out.append(np.ascontiguousarray(x, np.float32))
    return out[0], out[1]


REPRESENTATION = Representation(
    name="vectors",
    summary="your own vectors (candidates.vector_column, targets.vector_column)",
    prepare=committed,
    similarity="cosine of your vectors (inner product when embed.normalize is false)",
    embed_stage=True,
    local=local,
)
