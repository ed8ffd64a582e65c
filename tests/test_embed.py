"""The embedding actor on the real MiniLM, and the stage's resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysift.engine.embed import DEFAULT_MODEL, resolve_model_path
from raysift.jobs.cli import main
from raysift.jobs.core.pool import load_pool, read_rows, read_vector_range
from raysift.jobs.core.storage import Store

from .conftest import DEMO_POOL, DEMO_TARGETS, write_config


def chunk_files(run, side="candidates"):
    """The committed embedding chunks of a side (every digest folder)."""
    folder = run / "embeddings" / side
    return sorted(p for p in folder.glob("*/rows-*.parquet") if not p.name.startswith(".tmp-"))


def read_embeddings(run, side="candidates"):
    """(ids, vectors) of a side, in row order, through the pool's readers."""
    pool = load_pool(Store.local(run), side)
    ids = read_rows(pool, 0, pool.n, ["id"]).column("id").to_pylist()
    return ids, read_vector_range(pool, 0, pool.n)


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def direct_forward(texts, max_length=128):
    """all-MiniLM-L6-v2 the plain way: pad the batch, forward, mean-pool over the mask, L2."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    v = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(v, dim=1).numpy()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("precision", "tol"), [("fp32", 1e-5), ("bf16", 2e-2)])
def test_actor_matches_a_direct_forward_pass(tmp_path, demo_rows, precision, tol):
    """The chunk actor reads its rows from the run folder, embeds them and commits the chunk."""
    from raysift.actors.embedder import ChunkEmbedder
    from raysift.actors.pool import map_actors
    from raysift.jobs.config import IngestConfig, InputSpec
    from raysift.jobs.stages.ingest import ingest_side

    rows = demo_rows.slice(0, 24).select(["id", "text"])  # mixed lengths, code included
    pq.write_table(rows, tmp_path / "in.parquet")
    store = Store.local(tmp_path / "run")
    spec = InputSpec(path=str(tmp_path / "in.parquet"), id_column="id")
    ingest_side(spec, "candidates", store, "candidates", IngestConfig())
    part = load_pool(store, "candidates").parts[0]
    chunks = [{"side": "candidates", "part": part.name, "digest": part.digest, "a": a, "b": b}
              for a, b in ((0, 10), (10, 24))]  # fmt: skip
    args = {"store": store, "model": DEFAULT_MODEL, "max_length": 128, "batch_size": 5,
            "precision": precision, "torch_threads": 1}  # fmt: skip
    done = list(map_actors(ChunkEmbedder, args, chunks, size=1, num_cpus=0.5))
    assert sorted((d["a"], d["b"], d["rows"]) for d in done) == [(0, 10, 10), (10, 24, 14)]
    assert {d["precision"] for d in done} == {precision}
    got = pa.concat_tables(pq.read_table(p) for p in chunk_files(tmp_path / "run"))
    assert got["id"].to_pylist() == rows["id"].to_pylist()
    vec = got["vector"].combine_chunks()
    assert vec.type.list_size == 384 and vec.type.value_type == pa.float32()
    vectors = vec.values.to_numpy().reshape(-1, 384)
    expected = direct_forward(rows["text"].to_pylist())
    assert np.abs(vectors - expected).max() < tol
    assert (vectors * expected).sum(1).min() > (0.99999 if precision == "fp32" else 0.999)


def resume_config(tmp_path, n_rows):
    return write_config(
        tmp_path / "c.yaml",
        output_dir=str(tmp_path / "run"),
        candidates={"path": str(DEMO_POOL), "id_column": "id", "limit": n_rows},
        targets={"path": str(DEMO_TARGETS), "limit": 50},
        ray={"num_cpus": 2},
        # fp32 and small shards: slow enough to be killed in the middle, many commit points
        embed={"precision": "fp32", "shard_rows": 100},
        stages=["ingest", "embed"],
    )


@pytest.mark.timeout(300)
def test_a_killed_embed_resumes_without_redoing_committed_shards(tmp_path):
    n_rows = 400
    cfg = resume_config(tmp_path, n_rows)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysift", "run", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if len(chunk_files(run)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished or died before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    before = {p: p.read_bytes() for p in chunk_files(run)}
    committed = sum(pq.read_table(p).num_rows for p in before)
    assert 100 <= committed < n_rows, committed
    for p in before:  # every file that looks committed is a whole, readable chunk
        assert pq.read_table(p).num_rows == 100

    assert main(["embed", str(cfg)]) == 0
    stage = json.loads((run / "manifest.json").read_text())["stages"]["embed"]
    assert stage["status"] == "done"
    assert stage["candidates"]["rows_reused"] == committed
    assert stage["candidates"]["rows_embedded"] == n_rows - committed
    assert stage["candidates"]["chunks_embedded"] == (n_rows - committed) // 100
    assert stage["candidates"]["precision"] == ["fp32"]
    for p, data in before.items():  # committed chunks were not rewritten
        assert p.read_bytes() == data
    ids, vectors = read_embeddings(run)
    pool = pq.read_table(DEMO_POOL).slice(0, n_rows)
    assert ids == pool["id"].to_pylist()  # in row order, every row once
    sample = [int(i) for i in np.linspace(0, n_rows - 1, 6)]
    expected = direct_forward([pool["text"][i].as_py() for i in sample])
    assert np.abs(vectors[sample] - expected).max() < 1e-5

    assert main(["embed", str(cfg)]) == 0  # nothing left to do
    stage = json.loads((run / "manifest.json").read_text())["stages"]["embed"]
    assert stage["candidates"]["rows_embedded"] == 0


@pytest.mark.timeout(120)
def test_changing_the_model_discards_committed_vectors(tmp_path):
    cfg = resume_config(tmp_path, 40)
    assert main(["run", str(cfg)]) == 0
    assert chunk_files(tmp_path / "run", "targets")
    assert main(["embed", str(cfg), "--set", "embed.max_length=32"]) == 0
    stage = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["embed"]
    assert stage["targets"]["shards_discarded"] >= 1
    assert stage["targets"]["rows_embedded"] == 50


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_gpu_embedding_matches_cpu(demo_rows):
    from raysift.engine.embed import encode, load_encoder

    texts = demo_rows["text"].to_pylist()[:64]
    gpu = load_encoder(precision="auto", use_gpu=True)
    assert gpu.device.type == "cuda" and gpu.precision in ("bf16", "fp16")
    cpu = load_encoder(precision="fp32", use_gpu=False)
    a, b = encode(gpu, texts), encode(cpu, texts)
    assert (a * b).sum(1).min() > 0.999
