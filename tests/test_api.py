"""The Python API: `raysift.select` in-process equals the same selection on Ray (every method with
an in-process form), `open_run` reads the run folder back, the caller's Ray Data context is left
alone, bad input is one clear InputError. (examples/quickstart.py runs in test_examples.py.)"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import raysift
from raysift.jobs.config import METHOD_NAMES
from raysift.jobs.core.errors import InputError
from raysift.jobs.methods import METHODS
from tests.conftest import DEMO_POOL, DEMO_TARGETS


@pytest.fixture(scope="module")
def inputs():
    pool = pq.read_table(DEMO_POOL).slice(0, 300).to_pandas()
    targets = [json.loads(line)["text"] for line in DEMO_TARGETS.read_text().splitlines()[:30]]
    return pool, targets


def test_method_names_are_declared_once():
    from raysift.jobs.config import REPRESENTATION_NAMES
    from raysift.jobs.methods import REPRESENTATIONS

    assert tuple(METHODS) == METHOD_NAMES
    assert sorted(raysift.methods()) == sorted(METHOD_NAMES)
    assert tuple(REPRESENTATIONS) == REPRESENTATION_NAMES == tuple(raysift.representations())
    for name, m in METHODS.items():  # a method with options names its section
        assert (m.section is None) == (m.options is None), name


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_in_process_equals_ray_and_open_run_reads_it_back(inputs, tmp_path, ray_cluster, tiny_lm):
    from ray.data import DataContext

    pool, targets = inputs
    ctx = DataContext.get_current()
    before = (ctx.enable_progress_bars, ctx.execution_options.preserve_order,
              ctx.raise_original_map_exception)  # fmt: skip
    run_dir = tmp_path / "run"
    options = {"knn": {"aggregation": "centroid"}, "gotd": {"epsilon": 0.05},
               "rds": {"precision": "fp32", "chunk_rows": 100}}  # fmt: skip
    for method in [name for name, m in METHODS.items() if m.in_process]:  # the table's
        config = {"embed": {"precision": "fp32"}, "finetune": {"model": str(tiny_lm)}}
        args = dict(method=method, budget=40, seed=3, keep_columns=["source", "label"],
                    config=config, **options.get(method, {}))  # fmt: skip
        local = raysift.select(pool, targets, **args)
        assert local.info["in_process"] and local.run_dir is None
        on_ray = raysift.select(pool, targets, ray=True, output_dir=run_dir, **args)
        assert on_ray.table.column_names == local.table.column_names
        assert on_ray.ids == local.ids, method
        for col in ("rank", "source", "label", "count"):
            assert on_ray.table.column(col).equals(local.table.column(col)), (method, col)
        np.testing.assert_allclose(on_ray.table.column("score").to_numpy(zero_copy_only=False),
                                   local.table.column("score").to_numpy(zero_copy_only=False),
                                   rtol=1e-5, atol=1e-7)  # fmt: skip
        run = raysift.open_run(run_dir)
        assert run.selection.equals(on_ray.table)
        assert run.manifest["config"]["select"]["method"] == method
        assert [r["id"] for r in run.selected()] == on_ray.ids
        if method == "tsds":  # p on its support, from the shards' probabilities/ folder
            got = on_ray.p.sort_by("row")
            want = local.p.sort_by("row")
            assert got.column("id").equals(want.column("id"))
            np.testing.assert_allclose(got.column("probability").to_numpy(),
                                       want.column("probability").to_numpy(),
                                       rtol=1e-6)  # fmt: skip
        if method == "gotd":
            assert on_ray.potentials.column("id").equals(local.potentials.column("id"))
            np.testing.assert_allclose(on_ray.potentials.column("f").to_numpy(),
                                       local.potentials.column("f").to_numpy(), rtol=1e-5)
    stages = raysift.open_run(run_dir).manifest["stages"]
    assert stages["embed"]["status"] == "done"  # embedded once: later methods reused it
    assert on_ray.to_ray_dataset().take_all() == on_ray.table.to_pylist()  # Ray Data reads it

    import ray.data  # a Ray Dataset in, as Ray users hold a pool

    pool_ds = ray.data.from_pandas(pool)
    from_ds = raysift.select(pool_ds, targets, method="knn", budget=40, seed=3,
                             keep_columns=["source", "label"], output_dir=tmp_path / "ds",
                             config={"embed": {"precision": "fp32"}})  # fmt: skip
    local = raysift.select(pool, targets, method="knn", budget=40, seed=3,
                           keep_columns=["source", "label"],
                           config={"embed": {"precision": "fp32"}})  # fmt: skip
    assert from_ds.ids == local.ids and from_ds.run_dir == tmp_path / "ds"
    ctx = DataContext.get_current()
    assert (ctx.enable_progress_bars, ctx.execution_options.preserve_order,
            ctx.raise_original_map_exception) == before  # fmt: skip


def test_bad_input_is_one_clear_error(inputs):
    pool, targets = inputs
    cases = [
        (dict(candidates=42, targets=targets), "candidates: expected a DataFrame"),
        (dict(candidates=pool, targets=targets, text_column="body"), "no text column 'body'"),
        (dict(candidates=pool, targets=targets, method="nope"), "method: 'nope' is not one of"),
        (dict(candidates=pool, targets=targets, method="knn", nope=1), "select.knn.nope"),
        (dict(candidates=pool, targets=targets, method="dsir", ray=False),
         "ray=False: method 'dsir' needs Ray"),
        (dict(candidates=pool, targets=None, method="knn"), "targets: method 'knn'"),
        (dict(candidates=pool, targets=targets, budget=10_000), "select.budget: 10000"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message.replace("(", r"\(")) as err:
            raysift.select(**kwargs)
        assert "\n" not in str(err.value)


TEXTS = ["a cat sat on the mat", "dogs bark loudly at night", "def add(a, b): return a + b",
         "a kitten naps in the sun", "the stock market fell today"]  # fmt: skip


def _kinds():
    """Every input kind the docs name, as a new user passes them (no optional arguments)."""
    import pandas as pd
    import pyarrow as pa

    frame = pd.DataFrame({"text": TEXTS})
    return {
        "list": (TEXTS, ["a kitten"], {}),
        "dataframe": (frame, pd.DataFrame({"text": ["a kitten"]}), {}),
        "table": (pa.table({"text": TEXTS}), pa.table({"text": ["a kitten"]}), {}),
        "ids": (frame.assign(doc=[f"d{i}" for i in range(5)]), ["a kitten"], {"id_column": "doc"}),
        "keep": (frame.assign(src=list("abcde")), ["a kitten"], {"keep_columns": ["src"]}),
    }


def test_every_input_kind_selects_in_process():
    """The first call a new user makes (it failed with ArrowInvalid without keep_columns)."""
    from raysift.engine.ids import content_ids

    for kind, (pool, targets, extra) in _kinds().items():
        result = raysift.select(pool, targets, method="knn", budget=2, **extra)
        keep = extra.get("keep_columns", [])
        assert result.table.column_names == [
            "id", "row", "rank", "score", "probability", "count", *keep], kind  # fmt: skip
        assert result.table.column("row").to_pylist() == [3, 0], kind  # the two cat texts
        want = ["d3", "d0"] if kind == "ids" else [content_ids([TEXTS[3]])[0],
                                                   content_ids([TEXTS[0]])[0]]  # fmt: skip
        assert result.ids == want, kind
        if keep:
            assert result.table.column("src").to_pylist() == ["d", "a"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_input_kinds_on_ray_give_the_in_process_columns(tmp_path, ray_cluster):
    for kind in ("list", "ids"):
        pool, targets, extra = _kinds()[kind]
        args = dict(method="knn", budget=2, config={"embed": {"precision": "fp32"}}, **extra)
        local = raysift.select(pool, targets, **args)
        on_ray = raysift.select(pool, targets, ray=True, output_dir=tmp_path / kind, **args)
        assert on_ray.table.column_names == local.table.column_names, kind
        assert on_ray.ids == local.ids and on_ray.run_dir == tmp_path / kind, kind

