"""The driver plans and merges; it never reads the pool. In this process -- the driver -- every
reader of the pool's rows and vectors is made to raise: `Store.path` for any candidate part or
embedding chunk, pyarrow's row readers for those files and for the input files. The tasks and
actors run in other processes, unpatched. Every method must still select, and ingest must still
ingest; a control shows the guard trips when the driver does read."""

from __future__ import annotations

import json
import re

import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest

from raysift.jobs.core.storage import Store
from raysift.jobs.methods import PAIRS
from tests.synthpool import synth_pool

from .conftest import write_config

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("ray_cluster")]
# the candidates' rows and every representation's candidate vectors (embeddings/, features/)
BULK = re.compile(r"(^|/)(data/candidates/part-|embeddings/candidates/[^/]+/rows-"
                  r"|features/candidates/[^/]+/[^/]+/rows-)")  # fmt: skip


class DriverRead(AssertionError):
    pass


@pytest.fixture
def guard(monkeypatch):
    """Make the driver's readers of candidate rows, candidate vectors and input rows raise."""
    inputs: list[str] = []
    path = Store.path

    def guarded_path(self, rel=""):
        if BULK.search(rel):
            raise DriverRead(f"the driver opened {rel}")
        return path(self, rel)

    def forbid(name, original, where=lambda a: True):
        def call(*args, **kwargs):
            source = str(args[1] if isinstance(args[0], pq.ParquetFile) else args[0])
            if where(source):
                raise DriverRead(f"the driver called {name} on {source}")
            return original(*args, **kwargs)

        return call

    def is_pool_or_input(source: str) -> bool:
        return bool(BULK.search(source)) or any(source.startswith(i) for i in inputs)

    monkeypatch.setattr(Store, "path", guarded_path)
    monkeypatch.setattr(pq, "read_table", forbid("read_table", pq.read_table, is_pool_or_input))
    for method in ("read", "read_row_groups", "read_row_group", "iter_batches"):
        # a ParquetFile's rows (its metadata stays readable: planning uses the footers)
        monkeypatch.setattr(pq.ParquetFile, method, forbid(method, getattr(pq.ParquetFile, method)))
    monkeypatch.setattr(pajson, "read_json", forbid("read_json", pajson.read_json))
    monkeypatch.setattr(pacsv, "open_csv", forbid("open_csv", pacsv.open_csv))
    monkeypatch.setattr(pacsv, "read_csv", forbid("read_csv", pacsv.read_csv))
    return inputs


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """3,000 rows of the synthetic pool, vectors given, in three input files (ingested and
    embedded without the guard)."""
    from raysift.jobs.config import load_config
    from raysift.jobs.pipeline import run

    folder = tmp_path_factory.mktemp("driver")
    candidates, targets = synth_pool(n=3000, m=16)
    (folder / "pool").mkdir()
    for k in range(3):
        pq.write_table(candidates.slice(1000 * k, 1000), folder / "pool" / f"p{k}.parquet")
    pq.write_table(targets, folder / "targets.parquet")
    cfg = write_config(
        folder / "c.yaml",
        output_dir=str(folder / "run"),
        candidates={"path": str(folder / "pool"), "vector_column": "vector",
                    "keep_columns": ["source", "label"]},
        targets={"path": str(folder / "targets.parquet"), "vector_column": "vector"},
        ray={"num_cpus": 2},
    )  # fmt: skip
    run(load_config(cfg), ["ingest", "embed"], log=lambda _: None)
    return cfg, folder / "run"


METHODS = {  # with given vectors (the `vectors` representation)
    "random": {},
    "knn": {"knn": {"mode": "max"}},
    "knn-centroid": {"method": "knn", "knn": {"mode": "centroid"}},
    "tsds": {"tsds": {"max_K": 300, "shards": 2, "cpus_per_shard": 0.5}},
    "tsds-compat": {"method": "tsds", "tsds": {"mode": "compat", "max_K": 100}},
    "gotd": {"gotd": {"shards": 2, "cpus_per_shard": 0.5}},
    "gradex-random": {"method": "gradex", "gradex": {"strategy": "random"}},
}


@pytest.mark.parametrize("name", list(METHODS))
def test_select_never_reads_the_pool_on_the_driver(pool, guard, name):
    from raysift.jobs.config import load_config
    from raysift.jobs.pipeline import run

    cfg, run_dir = pool
    select = {"method": name, "budget": 50, **METHODS[name]}
    run(load_config(cfg, [f"select={json.dumps(select)}"]), ["select"], log=lambda _: None)
    assert pq.ParquetFile(run_dir / "selection.parquet").metadata.num_rows == 50
    assert len((run_dir / "selected.jsonl").read_text().splitlines()) == 50


def test_the_guard_catches_a_driver_that_reads(pool, guard):
    from raysift.jobs.core.pool import load_pool, read_part, read_vectors

    _, run_dir = pool
    candidates = load_pool(Store.local(run_dir), "candidates")  # the index: allowed
    with pytest.raises(DriverRead):
        read_part(candidates, candidates.parts[0], ["text"])
    with pytest.raises(DriverRead):
        read_vectors(candidates, candidates.parts[0])
    with pytest.raises(DriverRead):
        pq.read_table(str(run_dir / "data" / "candidates" / candidates.parts[0].name))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_ingest_never_reads_input_rows_on_the_driver(tmp_path, guard, fmt):
    from raysift.jobs.config import IngestConfig, InputSpec
    from raysift.jobs.stages.ingest import check_input, ingest_side, plan, raw_batches

    candidates, _ = synth_pool(n=900, m=4)
    rows = candidates.select(["text", "source"])
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        part, path = rows.slice(300 * k, 300), folder / f"f{k}.{fmt}"
        if fmt == "parquet":
            pq.write_table(part, path, row_group_size=100)
        elif fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in part.to_pylist()))
        else:
            pacsv.write_csv(part, path)
    guard.append(str(folder))  # the input files too
    spec = InputSpec(path=str(folder), keep_columns=["source"])
    counts = ingest_side(spec, "candidates", Store.local(tmp_path / "run"), "candidates",
                         IngestConfig(part_mb=0.01))  # fmt: skip
    assert counts["rows"] == 900 and counts["parts"] >= 3
    source = check_input(spec, "candidates")
    with pytest.raises(DriverRead):  # the control: reading a piece here trips the guard
        next(raw_batches(source, plan(source, IngestConfig(), None)[0], ["text"]))


@pytest.fixture(scope="module")
def texts(tmp_path_factory, tiny_lm):
    """240 real demo texts in four parts and 12 targets in two subtasks, ingested and embedded
    with MiniLM (fp32); the tiny Llama for lm_hidden and less (warmed up on the first use)."""
    from raysift.jobs.config import load_config
    from raysift.jobs.pipeline import run

    from .conftest import DEMO_POOL

    folder = tmp_path_factory.mktemp("texts")
    table = pq.read_table(DEMO_POOL)
    for k in range(4):
        pq.write_table(table.slice(60 * k, 60), folder / f"p{k}.parquet")
    targets = table.slice(3000, 12).to_pylist()
    (folder / "t.jsonl").write_text("".join(
        json.dumps({"text": r["text"], "task": f"t{i % 2}"}) + "\n" for i, r in enumerate(targets)))
    cfg = write_config(
        folder / "c.yaml", output_dir=str(folder / "run"),
        candidates={"path": str(folder), "format": "parquet", "id_column": "id",
                    "keep_columns": ["source"]},
        targets={"path": str(folder / "t.jsonl"), "keep_columns": ["task"]},
        embed={"precision": "fp32", "shard_rows": 50, "cpus_per_actor": 0.5},
        finetune={"model": str(tiny_lm), "batch_size": 4, "max_length": 24},
        select={"lm_hidden": {"precision": "fp32", "chunk_rows": 50, "num_actors": 1,
                              "cpus_per_actor": 0.5},
                "less": {"warmup_fraction": 0.1, "warmup_epochs": 2, "proj_dim": 16,
                         "max_length": 24, "chunk_rows": 50, "num_actors": 1,
                         "cpus_per_actor": 0.5, "lora": {"r": 4, "modules": ["q_proj"]}}},
        ray={"num_cpus": 2},
    )  # fmt: skip
    run(load_config(cfg), ["ingest", "embed"], log=lambda _: None)
    return cfg, folder / "run"


def _select(cfg, run_dir, select: dict, n: int):
    from raysift.jobs.config import load_config
    from raysift.jobs.pipeline import run

    run(load_config(cfg, [f"select={json.dumps(select)}"]), ["select"], log=lambda _: None)
    table = pq.read_table(run_dir / "selection.parquet")
    assert table.num_rows == n and len(set(table.column("id").to_pylist())) == n
    return table.column("id").to_pylist()


@pytest.mark.slow
@pytest.mark.parametrize(("selector", "representation"), PAIRS, ids=[f"{s}-{r}" for s, r in PAIRS])
def test_every_selector_on_every_representation(pool, texts, guard, selector, representation):
    """Every pair of the tables selects on a local cluster, the driver reading none of the pool's
    rows or vectors; sharded equals unsharded (tsds, gotd: 1 and 2 shard actors; knn: per part)."""
    cfg, run_dir = pool if representation == "vectors" else texts
    options = {"tsds": {"max_K": 120}, "gotd": {"threshold": 1e-3}}.get(selector, {})
    one = {"method": selector, "representation": representation, "budget": 20}
    if selector == "knn":
        aggregations = ["max", "round_robin"] + (["subtask_mean_max"] if representation == "less"
                                                  else [])  # fmt: skip
        for aggregation in aggregations:
            knn = {"aggregation": aggregation}
            if aggregation == "subtask_mean_max":
                knn["subtask_column"] = "task"
            _select(cfg, run_dir, {**one, "knn": knn}, 20)
        return
    single = _select(cfg, run_dir, {**one, selector: {**options, "shards": 1}}, 20)
    sharded = _select(cfg, run_dir, {**one, selector: {**options, "shards": 2,
                                                        "cpus_per_shard": 0.5}}, 20)  # fmt: skip
    assert sharded == single


@pytest.mark.slow
def test_a_killed_lm_hidden_pass_recomputes_only_the_lost_chunk(texts):
    from raysift.jobs.core.storage import Store

    cfg, run_dir = texts
    select = {"method": "rds", "budget": 20}
    first = _select(cfg, run_dir, select, 20)
    stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["select"]
    root = f"features/candidates/hidden-{stage['key']}"
    store = Store.local(run_dir)
    chunks = sorted(f"{d}/{f}" for d in store.folders(root) for f in store.list(f"{root}/{d}"))
    assert len(chunks) == 8  # 4 parts x 60 rows in chunks of 50
    store.delete(f"{root}/{chunks[3]}")  # a run killed while that chunk was in flight
    assert _select(cfg, run_dir, select, 20) == first
    again = json.loads((run_dir / "manifest.json").read_text())["stages"]["select"]
    assert again["chunks_computed"] == 1 and again["chunks_reused"] == stage["chunks"] - 1
    assert again["aggregation"] == "round_robin" and again["representation"] == "lm_hidden"
