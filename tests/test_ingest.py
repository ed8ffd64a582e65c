"""Ingest on a real local cluster: every input format, ids, the bad-row policy, the dense row
numbering across files and parts, appending."""

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from raysift.engine.ids import content_id
from raysift.jobs.config import IngestConfig, InputSpec
from raysift.jobs.core.errors import InputError
from raysift.jobs.core.pool import load_pool, read_rows
from raysift.jobs.core.storage import Store
from raysift.jobs.stages.ingest import check_input, ingest_side

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("ray_cluster")]


def ingest(spec, field="candidates", run=None, append=False, **ingest_cfg):
    """Ingest one side into a run folder; returns (every row of the pool, in row order, the
    counts). The test reads the parts back; the stage itself never does on the driver."""
    run = run or Path(tempfile.mkdtemp()) / "run"
    store = Store.local(run)
    counts = ingest_side(spec, field, store, "candidates", IngestConfig(**ingest_cfg), append)
    pool = load_pool(store, "candidates")
    return read_rows(pool, 0, pool.n, list(pool.columns)), counts


@pytest.fixture(scope="module")
def rows(demo_rows):
    return demo_rows.slice(0, 120).select(["id", "source", "text"])


def write(fmt, table, folder):
    if fmt == "parquet":
        path = folder / "in.parquet"
        pq.write_table(table, path)
    elif fmt == "jsonl":
        path = folder / "in.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    elif fmt == "csv":
        path = folder / "in.csv"
        pacsv.write_csv(table, path)
    else:
        from datasets import Dataset

        path = folder / "hf"
        Dataset.from_dict(table.to_pydict()).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "hf"])
def test_every_format_gives_the_same_table(tmp_path, rows, fmt):
    path = write(fmt, rows, tmp_path)
    spec = InputSpec(path=str(path), id_column="id", keep_columns=["source"])
    table, counts = ingest(spec)
    assert counts["format"] == fmt and counts["rows"] == rows.num_rows
    assert table.column_names == ["row", "id", "text", "source"]
    assert table["row"].to_pylist() == list(range(rows.num_rows))
    assert table["id"].to_pylist() == rows["id"].to_pylist()  # input order kept
    assert table["text"].to_pylist() == rows["text"].to_pylist()


def test_a_folder_of_files_is_one_input(tmp_path, rows):
    (tmp_path / "d").mkdir()
    pq.write_table(rows.slice(0, 60), tmp_path / "d" / "a.parquet")
    pq.write_table(rows.slice(60), tmp_path / "d" / "b.parquet")
    table, _ = ingest(InputSpec(path=str(tmp_path / "d"), id_column="id"))
    assert table["id"].to_pylist() == rows["id"].to_pylist()


def test_ids_are_derived_from_text_when_absent(tmp_path, rows):
    path = write("jsonl", rows.select(["text"]), tmp_path)
    table, _ = ingest(InputSpec(path=str(path)), "targets")
    assert table["id"].to_pylist() == [content_id(t) for t in rows["text"].to_pylist()]
    assert table["id"].to_pylist() == rows["id"].to_pylist()  # same convention as pool.parquet


def test_csv_ids_stay_strings(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("id,text\n007,seven\n7,also seven\n")
    table, _ = ingest(InputSpec(path=str(path), format="csv", id_column="id"))
    assert table["id"].to_pylist() == ["007", "7"]


def test_empty_texts_are_dropped_and_counted(tmp_path):
    texts = ["a real text", None, "   ", "another", "\n"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    table, counts = ingest(InputSpec(path=str(tmp_path / "in.parquet")))
    assert table["text"].to_pylist() == ["a real text", "another"]
    assert (counts["rows_read"], counts["empty_dropped"], counts["rows"]) == (5, 3, 2)
    spec = InputSpec(path=str(tmp_path / "in.parquet"), on_empty="error")
    with pytest.raises(InputError, match=r"3 rows have null or blank 'text'.*in.parquet: row 1\)"):
        ingest(spec)


def test_duplicate_texts_with_derived_ids_keep_the_first(tmp_path):
    pq.write_table(
        pa.table({"text": ["x", "y", "x", "z", "y"], "n": [0, 1, 2, 3, 4]}), tmp_path / "in.parquet"
    )
    spec = InputSpec(path=str(tmp_path / "in.parquet"), keep_columns=["n"])
    table, counts = ingest(spec)
    assert table["n"].to_pylist() == [0, 1, 3]
    assert counts["duplicates_dropped"] == 2


def test_repeated_given_ids_are_an_error(tmp_path):
    pq.write_table(
        pa.table({"id": ["a", "b", "a"], "text": ["1", "2", "3"]}), tmp_path / "in.parquet"
    )
    with pytest.raises(
        InputError, match=r"candidates.id_column: 1 repeated ids in 'id' \(e.g. 'a' x2\)"
    ):
        ingest(InputSpec(path=str(tmp_path / "in.parquet"), id_column="id"))


def test_null_given_ids_are_an_error(tmp_path):
    pq.write_table(pa.table({"id": ["a", None], "text": ["1", "2"]}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match="1 rows have a null or blank 'id'"):
        ingest(InputSpec(path=str(tmp_path / "in.parquet"), id_column="id"))


def test_limit_takes_the_first_rows(tmp_path, rows):
    path = write("parquet", rows, tmp_path)
    table, _ = ingest(InputSpec(path=str(path), id_column="id", limit=17))
    assert table["id"].to_pylist() == rows["id"].to_pylist()[:17]
    jsonl = write("jsonl", rows, tmp_path)  # pieces of unknown size: read one by one to the limit
    table, counts = ingest(InputSpec(path=str(jsonl), id_column="id", limit=17), part_mb=0.002)
    assert table["id"].to_pylist() == rows["id"].to_pylist()[:17]
    assert counts["rows_read"] == 17


def test_non_text_column_is_an_error_from_inside_ray(tmp_path):
    pq.write_table(pa.table({"text": [[1, 2], [3]]}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"in.parquet: column 'text': expected text, got list<"):
        ingest(InputSpec(path=str(tmp_path / "in.parquet")))


# Checked on the driver before any Ray work:
def test_missing_column_names_file_and_column(tmp_path, rows):
    path = write("parquet", rows, tmp_path)
    with pytest.raises(
        InputError, match=r"in.parquet: column 'body' \(targets.text_column\) not found"
    ):
        check_input(InputSpec(path=str(path), text_column="body"), "targets")


def test_unreadable_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(InputError, match="bad.parquet: not a readable parquet file"):
        check_input(InputSpec(path=str(tmp_path / "bad.parquet")), "candidates")


def test_unknown_suffix_and_missing_path(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(InputError, match="cannot tell the format of data.txt"):
        check_input(InputSpec(path=str(tmp_path / "data.txt")), "candidates")
    with pytest.raises(InputError, match="candidates.path: .* does not exist"):
        check_input(InputSpec(path=str(tmp_path / "nope.parquet")), "candidates")


def test_rows_are_dense_in_input_order_across_files_and_parts(tmp_path, rows):
    """Three files (sorted by name), JSON lines cut into byte ranges, a duplicate across files
    and empty rows: `row` is 0..N-1 in input order, the first occurrence kept."""
    (tmp_path / "d").mkdir()
    texts = rows["text"].to_pylist()
    chunks = [texts[:40], ["", texts[5], *texts[40:80]], [*texts[80:], "  "]]
    for name, chunk in zip(("a", "b", "c"), chunks, strict=True):
        lines = "".join(json.dumps({"text": t}) + "\n" for t in chunk)
        (tmp_path / "d" / f"{name}.jsonl").write_text(lines)
    spec = InputSpec(path=str(tmp_path / "d"))
    one, counts = ingest(spec)
    many, many_counts = ingest(spec, part_mb=0.003, id_buckets=3)  # ~1 KB ranges: many parts
    assert many_counts["parts"] > 6 and counts["parts"] == 3
    assert one["text"].to_pylist() == texts  # the duplicate (b's texts[5]) and empties dropped
    assert one["row"].to_pylist() == list(range(len(texts)))
    assert many.to_pydict() == one.to_pydict()
    assert (counts["duplicates_dropped"], counts["empty_dropped"]) == (1, 2)
    assert (many_counts["duplicates_dropped"], many_counts["empty_dropped"]) == (1, 2)


def test_a_malformed_json_line_names_the_file_and_line(tmp_path):
    lines = [json.dumps({"text": f"row {i}"}) for i in range(30)]
    lines[21] = '{"text": "broken'
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    for part_mb in (128, 0.0002):  # one piece, and pieces of ~200 bytes
        with pytest.raises(InputError, match=r"in.jsonl: line 22 is not valid JSON"):
            ingest(InputSpec(path=str(tmp_path / "in.jsonl")), part_mb=part_mb)


def test_append_numbers_new_files_after_the_pool(tmp_path, rows):
    """A new file that sorts first does not renumber old rows; an id the pool has is a duplicate
    of that row; a changed file means the whole folder again."""
    (tmp_path / "d").mkdir()
    pq.write_table(rows.slice(0, 50), tmp_path / "d" / "m.parquet")
    spec = InputSpec(path=str(tmp_path / "d"), id_column=None, keep_columns=["source"])
    run = tmp_path / "run"
    before, _ = ingest(spec, run=run)
    new = pa.concat_tables([rows.slice(50, 30), rows.slice(0, 2)])  # two rows the pool has
    pq.write_table(new, tmp_path / "d" / "a.parquet")  # sorts before m.parquet
    after, counts = ingest(spec, run=run, append=True)
    assert counts["appended"] and counts["files_read"] == 1
    assert (counts["rows_added"], counts["duplicates_dropped"]) == (30, 2)
    assert after.slice(0, 50).to_pydict() == before.to_pydict()  # old rows keep their numbers
    assert after["text"].to_pylist()[50:] == rows["text"].to_pylist()[50:80]
    assert after["row"].to_pylist() == list(range(80))
    fresh, _ = ingest(spec)  # from scratch: input order, a.parquet first
    assert fresh["text"].to_pylist()[:30] == rows["text"].to_pylist()[50:80]
    assert sorted(fresh["id"].to_pylist()) == sorted(after["id"].to_pylist())
    pq.write_table(rows.slice(0, 49), tmp_path / "d" / "m.parquet")  # a changed file
    again, counts = ingest(spec, run=run, append=True)
    assert not counts["appended"] and again["text"].to_pylist() == fresh["text"].to_pylist()[:79]
