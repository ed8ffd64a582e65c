"""GradEx's gradient stage as an actor callable class, run by `actors.pool.map_actors` over
slices of the rows.

Each actor loads the base model + the meta-initialisation adapter (theta*) once, on its GPU if Ray
gave it one, and turns pyarrow batches of (id, text, ...) into

    kind "train":  (id, ..., f0, G)           one row per sample: mean gold-token logit, P^T grad
    kind "target": (id, token, f0, G)         one row per scored token of each target text
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raysift.actors.embedder import vectors_to_arrow
from raysift.actors.features import ChunkFeatures
from raysift.engine.render import render


class Gradients:
    def __init__(
        self,
        base: str,
        adapter: str,
        kind: str,
        k: int,
        seed: int,
        max_length: int,
        chunk: int,
        clip: float | None = None,
        torch_threads: int | None = None,
    ):
        import torch

        from raysift.engine import gradex, lm
        from raysift.engine.embed import pick_device

        if torch_threads:
            torch.set_num_threads(torch_threads)
        # eager attention: torch.func has batching rules for its ops (SDPA's CPU kernel falls
        # back to a per-sample loop under vmap, ~1.35x slower here)
        model, self.tokenizer = lm.load_finetuned(base, adapter, pick_device(None), "eager")
        shapes = gradex.GradientModel.adapter_shapes(model)
        self.model = gradex.GradientModel(
            model, gradex.Projector(shapes, k, seed), chunk=chunk, clip=clip
        )
        self.kind = kind
        self.max_length = max_length
        self._lm = lm

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        examples = [self._lm.encode_text(self.tokenizer, t, self.max_length) for t in texts]
        rest = batch.drop_columns(["text"])
        if self.kind == "train":
            f0, G = self.model.sample_gradients(
                self._lm.collate(examples, self.tokenizer.pad_token_id)
            )
            rest = rest.append_column("f0", pa.array(f0.astype(np.float64)))
            return rest.append_column("G", vectors_to_arrow(G))
        parts = self.model.token_gradients(examples)
        sizes = [len(f) for f, _ in parts]
        rows = np.repeat(np.arange(len(parts)), sizes)
        return pa.table(
            {
                "id": rest.column("id").take(pa.array(rows)),
                "token": pa.array(np.concatenate([np.arange(n) for n in sizes]), pa.int32()),
                "f0": pa.array(np.concatenate([f for f, _ in parts]).astype(np.float64)),
                "G": vectors_to_arrow(np.concatenate([g for _, g in parts])),
            }
        )


class LessFeatures(ChunkFeatures):
    """LESS's feature pass (`actors.features.ChunkFeatures`: a chunk per call, committed as
    `<root>/<part digest>/rows-A-B.parquet`): each actor builds the base model with LoRA adapters
    and reads every warm-up checkpoint (weights and Adam moments) once; one `features` row per
    text: C checkpoints x k, float32, each unit-norm. The pool side ("candidates") gets
    Adam-preconditioned gradients, the targets plain ones."""

    def __init__(
        self,
        base: str,
        lora: dict,
        states: list[str],
        store,
        roots: dict,
        k: int,
        seed: int,
        max_length: int,
        chunk: int,
        torch_threads: int | None = None,
    ):
        import torch

        from raysift.engine import gradex, less, lm
        from raysift.engine.embed import pick_device

        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = pick_device(None)
        model, self.tokenizer = lm.load_lm(base, device, attention="eager")  # see Gradients
        model = lm.with_lora(
            model, r=lora["r"], alpha=lora["alpha"], dropout=0.0, target_modules=lora["modules"]
        ).to(device)
        shapes = gradex.GradientModel.adapter_shapes(model)
        self.model = gradex.GradientModel(
            model, gradex.Projector(shapes, k, seed), chunk=chunk, loss="ce"
        )
        self.states = []
        for rel in states:
            state = less.read_state(store.read_bytes(rel))
            less.check_moments(state["moments"], shapes)
            self.states.append(state)
        self.roots, self.max_length = roots, max_length
        self._lm, self._less = lm, less

    column = "features"

    def features(self, rows: list, side: str) -> np.ndarray:
        """(n, C, k) unit-norm features of the rows, one per checkpoint (the loss on the rows'
        scored tokens: a conversation's assistant turns only, as the reference masks the prompt);
        the gradients of every checkpoint are projected together (P's blocks generated once per
        call)."""
        import torch

        examples = [render(self.tokenizer, r, self.max_length) for r in rows]
        batch = self._lm.collate(examples, self.tokenizer.pad_token_id)
        per_checkpoint = []
        for state in self.states:
            self.model.set_adapter(state["weights"])
            _, grads = self.model.sample_grads(batch, on_device=True)  # a GPU keeps them
            if side == "candidates":
                grads = self._less.adam_transform(grads, state["moments"])
            per_checkpoint.append(grads)
        stacked = {n: torch.cat([g[n] for g in per_checkpoint]) for n in per_checkpoint[0]}
        out = self.model.projector.project(stacked)  # (C * n, k), checkpoint-major
        out = out.reshape(len(self.states), len(rows), -1).transpose(1, 0, 2)
        return self._less.normalise(out)
