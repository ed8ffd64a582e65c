"""The embedding stage's callable class, run by `actors.pool.map_actors` over a plan of chunks.

Each actor loads the encoder once in `__init__` (device chosen there: the GPU Ray assigned it, or
the CPU). A call gets one chunk -- rows [a, b) of one part of the pool -- reads its texts from the
run folder, embeds them and commits `embeddings/<side>/<digest>/rows-a-b.parquet` itself; what
goes back to the driver is one small row per chunk (where, how many, in which precision).
"""

from __future__ import annotations

import time

import pyarrow as pa

from raysift.engine.embed import encode, load_encoder
from raysift.engine.render import turns
from raysift.jobs.core.pool import chunk_name, read_part_rows, vectors_to_arrow
from raysift.jobs.core.runfolder import RunFolder
from raysift.jobs.core.storage import Store


def commit_chunk(store: Store, side: str, digest: str, a: int, b: int, ids, vectors) -> None:
    """Write one chunk of vectors (atomically: a killed actor leaves no partial chunk)."""
    table = pa.table({"id": ids, "vector": vectors_to_arrow(vectors)})
    store.write_parquet(RunFolder.embeddings(side, digest, chunk_name(a, b)), table)


class ChunkEmbedder:
    def __init__(
        self,
        store: Store,
        model: str,
        max_length: int,
        batch_size: int,
        precision: str,
        torch_threads: int | None = None,
        text: str = "conversation",
    ):
        self.store, self.text = store, text
        self.encoder = load_encoder(
            model,
            max_length=max_length,
            batch_size=batch_size,
            precision=precision,
            num_threads=torch_threads,
        )

    def __call__(self, c: dict) -> dict:
        """(side, part, digest, a, b) of a chunk -> the same with rows, dim, precision, seconds."""
        t0 = time.perf_counter()
        turns_only = self.text != "conversation" and c.get("chat")
        rows = read_part_rows(self.store, RunFolder.data(c["side"], c["part"]), c["a"], c["b"],
                              ["id", "messages" if turns_only else "text"])  # fmt: skip
        if turns_only:  # the user (or assistant) turns of each conversation
            texts = [turns(m, self.text) for m in rows.column("messages").to_pylist()]
        else:
            texts = rows.column("text").to_pylist()
        vectors = encode(self.encoder, texts)
        commit_chunk(self.store, c["side"], c["digest"], c["a"], c["b"], rows["id"], vectors)
        seconds = time.perf_counter() - t0
        return {**c, "rows": rows.num_rows, "dim": int(vectors.shape[1]),
                "precision": self.encoder.precision, "seconds": seconds}  # fmt: skip
