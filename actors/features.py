"""Per-row features committed chunk by chunk, as actor callables for `actors.pool.map_actors`.

A call takes one chunk of a pool's part (`jobs.pool.plan_chunks`: rows [a, b) of the part), reads
its texts itself, computes one feature row per text and commits
`<root>/<part digest>/rows-A-B.parquet` -- unless that file is already committed (a rerun, another
seed or target set computes only what is missing; a killed run loses the chunks in flight). What
goes back to the driver is one small row per chunk.

    HiddenStates   RDS+'s representation (`engine.hidden`): the causal LM's position-weighted
                   final hidden states, column `vector`
    LessFeatures   (actors.gradients) LESS's per-checkpoint gradient features, column `features`
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raysift.engine.render import render
from raysift.jobs.core.pool import (
    chunk_file,
    read_part_rows,
    row_columns,
    rows_of,
    vectors_to_arrow,
)


class ChunkFeatures:
    """The chunk plumbing; a subclass sets `roots` ({side: folder}), `column` and `features`."""

    roots: dict
    column = "vector"

    def features(self, rows: list, side: str) -> np.ndarray:
        """(n, ...) float32 of the rows (each a text or a conversation, `engine.render`)."""
        raise NotImplementedError

    def __call__(self, item: dict) -> dict:
        pool = item["pool"]
        rel = chunk_file(self.roots[pool.side], item)
        rows = item["b"] - item["a"]
        if pool.store.is_file(rel):
            return {"side": pool.side, "rows": rows, "computed": False}
        texts = rows_of(read_part_rows(pool.store, pool.part_path(item["part"]), item["a"],
                                       item["b"], row_columns(pool)))  # fmt: skip
        x = self.features(texts, pool.side)
        table = pa.table({self.column: vectors_to_arrow(x.reshape(len(texts), -1))})
        pool.store.write_parquet(rel, table)
        return {"side": pool.side, "rows": rows, "computed": True, "node": _node(),
                "dim": int(table.schema.field(self.column).type.list_size)}  # fmt: skip


def _node() -> str:
    """The node this actor runs on (where the autoscaler put it)."""
    import ray

    return ray.get_runtime_context().get_node_id()


class HiddenStates(ChunkFeatures):
    """RDS+'s representation of each text: the model loads once per actor, on its GPU where Ray
    gave it one."""

    def __init__(self, roots: dict, model: str, max_length: int, batch_size: int, precision: str,
                 torch_threads: int | None = None) -> None:  # fmt: skip
        import torch

        from raysift.engine import hidden, lm
        from raysift.engine.embed import pick_device

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model, self.tokenizer = lm.load_lm(model, pick_device(None))
        self.roots, self.max_length = roots, max_length
        self.batch_size, self.precision = batch_size, precision
        self._lm, self._hidden = lm, hidden

    def features(self, rows: list, side: str) -> np.ndarray:
        examples = [render(self.tokenizer, r, self.max_length) for r in rows]
        pad = self.tokenizer.pad_token_id
        return self._hidden.represent(self.model, examples, pad, batch_size=self.batch_size,
                                      precision=self.precision)  # fmt: skip
