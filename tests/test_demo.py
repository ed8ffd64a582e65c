"""The demo config end to end on a small slice, on the shared local Ray cluster."""

import contextlib
import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysift.jobs.cli import main
from raysift.jobs.stages.report import composition, pool_counts, selection_counts

from .conftest import DEMO_POOL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.usefixtures("ray_cluster")]

# fp32: the shard-size test below compares selections made with other batch sizes, and in bf16
# (the demo's `precision: auto` on CPUs with AMX / AVX512-BF16) a text's vector depends on the
# batch it was padded in (README: embed.precision), enough to swap two near-tied rows (measured).
SLICE = ["candidates.limit=400", "targets.limit=40", "select.budget=40", "embed.precision=fp32"]


def demo(tmp_path, name, *extra):
    out = tmp_path / name
    assert (
        main(
            [
                "demo",
                "--output-dir",
                str(out),
                "--no-evaluate",
                *sum((["--set", s] for s in SLICE + list(extra)), []),
            ]
        )
        == 0
    )
    return out


def manifest(run):
    return json.loads((run / "manifest.json").read_text())


@pytest.fixture(scope="module")
def slice_run(tmp_path_factory, ray_cluster):
    """The demo on the slice (knn) and what it printed; the other tests start from a copy of
    its folder, so the 440 rows are embedded once for the module."""
    folder = tmp_path_factory.mktemp("demo")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        run = demo(folder, "a")
    return run, out.getvalue()


def copy_of(run, tmp_path, name):
    """A copy of the slice's run folder: its ingest and embeddings are reused, not redone."""
    shutil.copytree(run, tmp_path / name)
    return name


def test_demo_slice_end_to_end(tmp_path, slice_run):
    run, shown = slice_run
    assert "Where the 40 selected rows came from (knn)" in shown and "debian_pkg" in shown
    assert "Most selected labels" in shown and "selected.jsonl" in shown

    m = manifest(run)
    assert [m["stages"][s]["status"] for s in ("ingest", "embed", "select")] == ["done"] * 3
    assert m["seed"] == 0 and m["config"]["select"]["budget"] == 40
    assert m["stages"]["ingest"]["candidates"]["rows"] == 400
    assert m["stages"]["ingest"]["targets"]["rows"] == 40
    assert m["stages"]["embed"]["candidates"]["rows_embedded"] == 400
    assert m["stages"]["embed"]["candidates"]["precision"] in (["bf16"], ["fp32"])
    assert all(m["stages"][s]["seconds"] > 0 for s in ("ingest", "embed", "select"))
    assert (run / "config.yaml").is_file()

    for side, n in (("candidates", 400), ("targets", 40)):
        chunks = sorted((run / "embeddings" / side).glob("*/rows-*.parquet"))
        tables = [pq.read_table(p) for p in chunks]
        table = pa.concat_tables(tables)
        assert table.num_rows == n and table.column_names == ["id", "vector"]
        assert table.schema.field("vector").type == pa.list_(pa.float32(), 384)

    sel = pq.read_table(run / "selection.parquet")
    assert sel.column_names == [
        "id", "row", "rank", "score", "probability", "count", "source", "label"
    ]  # fmt: skip
    assert sel["rank"].to_pylist() == list(range(40))
    pool = pq.read_table(DEMO_POOL, columns=["id"])["id"].to_pylist()
    assert [pool[r] for r in sel["row"].to_pylist()] == sel["id"].to_pylist()  # dense rows
    scores = sel["score"].to_pylist()
    assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
    pool_ids = set(pq.read_table(DEMO_POOL, columns=["id"])["id"].to_pylist()[:400])
    assert set(sel["id"].to_pylist()) <= pool_ids and len(set(sel["id"].to_pylist())) == 40

    lines = [json.loads(x) for x in (run / "selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == sel["id"].to_pylist()
    assert all(r["text"].strip() and r["source"] for r in lines)

    # The targets are Debian "science" descriptions: the nearest neighbours must lean to debian_pkg
    # far above its share of the pool (17%).
    counts = composition(pool_counts(run, "source"), selection_counts(run / "selection.parquet",
                                                                      "source"))  # fmt: skip
    rows = dict((name, picked) for name, _, picked in counts)
    assert rows.get("debian_pkg", 0) / 40 > 0.5

    # A rerun with nothing changed redoes nothing and selects the same rows.
    run_again = demo(run.parent, "a")
    m2 = manifest(run_again)
    assert m2["stages"]["embed"]["candidates"]["rows_embedded"] == 0
    assert m2["stages"]["embed"]["candidates"]["rows_reused"] == 400
    assert pq.read_table(run / "selection.parquet").equals(sel)

    # Other shard sizes, block sizes and two actors: the same selection.
    other = demo(
        tmp_path,
        "b",
        "embed.shard_rows=37",
        "embed.num_actors=2",
        "embed.cpus_per_actor=0.5",
        "embed.batch_size=16",
    )
    assert manifest(other)["stages"]["embed"]["candidates"]["chunks"] == 11
    assert pq.read_table(other / "selection.parquet")["id"].equals(sel["id"])


def test_random_needs_no_embeddings_and_is_seeded(tmp_path):
    no_embed = "stages=[ingest, select]"
    a = demo(tmp_path, "r1", "select.method=random", "seed=3", no_embed)
    b = demo(tmp_path, "r2", "select.method=random", "seed=3", no_embed, "candidates.limit=399")
    c = demo(tmp_path, "r3", "select.method=random", "seed=4", no_embed)
    assert not (a / "embeddings").exists()
    ids = [pq.read_table(r / "selection.parquet")["id"].to_pylist() for r in (a, b, c)]
    # u = H(seed, id) does not depend on the other rows: dropping the pool's last row changes the
    # selection by at most that row (and the one that takes its place).
    assert len(set(ids[0]) & set(ids[1])) >= 39
    assert len(set(ids[0]) & set(ids[2])) < 20
    prob = pq.read_table(a / "selection.parquet")["probability"].to_pylist()
    assert prob == [40 / 400] * 40


def test_tsds_and_gotd_are_seeded_and_independent_of_shards(tmp_path, slice_run):
    tsds = ["select.method=tsds", "select.tsds.max_K=200"]
    run = demo(tmp_path, copy_of(slice_run[0], tmp_path, "t"), *tsds)
    assert manifest(run)["stages"]["embed"]["candidates"]["rows_reused"] == 400  # the copy's
    sel = pq.read_table(run / "selection.parquet")
    assert sel.num_rows == 40 and sel["count"].null_count == 40  # without replacement
    info = manifest(run)["stages"]["select"]
    assert info["method"] == "tsds" and info["support"] >= 40 and info["fetches"] >= 1
    p = pq.read_table(run / "probabilities")  # the support only, written by the shards
    assert p.column_names == ["row", "id", "probability"]
    assert p.num_rows == info["support"] and abs(sum(p["probability"].to_pylist()) - 1) < 1e-12
    chosen = dict(zip(p["id"].to_pylist(), p["probability"].to_pylist(), strict=True))
    assert all(chosen[i] > 0 for i in sel["id"].to_pylist())
    want = [chosen[i] for i in sel["id"].to_pylist()]
    assert sel["probability"].to_pylist() == pytest.approx(want, rel=1e-12)

    # Same run folder, two shard actors: embeddings reused, the same selection.
    again = demo(tmp_path, "t", *tsds, "select.tsds.shards=2", "select.tsds.cpus_per_shard=0.5")
    assert manifest(again)["stages"]["embed"]["candidates"]["rows_embedded"] == 0
    assert pq.read_table(again / "selection.parquet").equals(sel)

    # Multinomial draws (the reference's sampling), seeded: counts add up to the budget.
    multi = demo(tmp_path, "t", *tsds, "select.tsds.sampling=multinomial")
    counts = pq.read_table(multi / "selection.parquet")["count"].to_pylist()
    assert sum(counts) == 40 and counts == sorted(counts, reverse=True)

    # GOT-D on the same embeddings: ranked by potential, the same for 1 and 2 shard actors.
    gotd = demo(tmp_path, "t", "select.method=gotd")
    ranked = pq.read_table(gotd / "selection.parquet")
    info = manifest(gotd)["stages"]["select"]
    assert info["method"] == "gotd" and info["iterations"] >= 1 and info["recoveries"] == []
    scores = ranked["score"].to_pylist()
    assert scores == sorted(scores, reverse=True) and ranked["probability"].null_count == 40
    two = demo(tmp_path, "t", "select.method=gotd", "select.gotd.shards=2")
    assert pq.read_table(two / "selection.parquet")["id"].equals(ranked["id"])


# `raysift demo` with its evaluation (the report) is run, watched and interrupted as a user would
# in test_watch.py.
