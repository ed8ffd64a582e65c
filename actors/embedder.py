"""The embedding stage's callable class, used as
`Dataset.map_batches(Embedder, compute=ActorPoolStrategy(...))`.

Each actor loads the encoder once in `__init__` (device chosen there: the GPU Ray assigned it, or
the CPU) and turns pyarrow batches of (id, text, ...) into (id, ..., vector, precision) rows.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engine.embed import encode, load_encoder


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 -> a fixed-size-list<float32>[d] column, zero-copy."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


class Embedder:
    def __init__(
        self,
        model: str,
        max_length: int,
        batch_size: int,
        precision: str,
        torch_threads: int | None = None,
    ):
        self.encoder = load_encoder(
            model,
            max_length=max_length,
            batch_size=batch_size,
            precision=precision,
            num_threads=torch_threads,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        """(text, other columns...) -> (other columns..., vector, precision)."""
        vectors = encode(self.encoder, batch.column("text").to_pylist())
        out = batch.drop_columns(["text"])
        out = out.append_column("vector", vectors_to_arrow(vectors))
        precision = pa.array([self.encoder.precision] * batch.num_rows, pa.string())
        return out.append_column("precision", precision)
