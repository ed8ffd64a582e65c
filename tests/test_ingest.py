"""Ingest through Ray Data on a real local cluster: every input format, ids, the bad-row policy."""

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from engine.ids import content_id
from jobs.config import InputSpec
from jobs.errors import InputError
from jobs.ingest import check_input, ingest_side

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("ray_cluster")]


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
    table, counts = ingest_side(spec, "candidates")
    assert counts["format"] == fmt and counts["rows"] == rows.num_rows
    assert table.column_names == ["id", "text", "source"]
    assert table["id"].to_pylist() == rows["id"].to_pylist()  # input order kept
    assert table["text"].to_pylist() == rows["text"].to_pylist()


def test_a_folder_of_files_is_one_input(tmp_path, rows):
    (tmp_path / "d").mkdir()
    pq.write_table(rows.slice(0, 60), tmp_path / "d" / "a.parquet")
    pq.write_table(rows.slice(60), tmp_path / "d" / "b.parquet")
    table, _ = ingest_side(InputSpec(path=str(tmp_path / "d"), id_column="id"), "candidates")
    assert table["id"].to_pylist() == rows["id"].to_pylist()


def test_ids_are_derived_from_text_when_absent(tmp_path, rows):
    path = write("jsonl", rows.select(["text"]), tmp_path)
    table, _ = ingest_side(InputSpec(path=str(path)), "targets")
    assert table["id"].to_pylist() == [content_id(t) for t in rows["text"].to_pylist()]
    assert table["id"].to_pylist() == rows["id"].to_pylist()  # same convention as pool.parquet


def test_csv_ids_stay_strings(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("id,text\n007,seven\n7,also seven\n")
    table, _ = ingest_side(InputSpec(path=str(path), format="csv", id_column="id"), "candidates")
    assert table["id"].to_pylist() == ["007", "7"]


def test_empty_texts_are_dropped_and_counted(tmp_path):
    texts = ["a real text", None, "   ", "another", "\n"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    table, counts = ingest_side(InputSpec(path=str(tmp_path / "in.parquet")), "candidates")
    assert table["text"].to_pylist() == ["a real text", "another"]
    assert (counts["rows_read"], counts["empty_dropped"], counts["rows"]) == (5, 3, 2)
    spec = InputSpec(path=str(tmp_path / "in.parquet"), on_empty="error")
    with pytest.raises(InputError, match="3 rows have null or blank 'text'.*first at row 1"):
        ingest_side(spec, "candidates")


def test_duplicate_texts_with_derived_ids_keep_the_first(tmp_path):
    pq.write_table(
        pa.table({"text": ["x", "y", "x", "z", "y"], "n": [0, 1, 2, 3, 4]}), tmp_path / "in.parquet"
    )
    spec = InputSpec(path=str(tmp_path / "in.parquet"), keep_columns=["n"])
    table, counts = ingest_side(spec, "candidates")
    assert table["n"].to_pylist() == [0, 1, 3]
    assert counts["duplicates_dropped"] == 2


def test_repeated_given_ids_are_an_error(tmp_path):
    pq.write_table(
        pa.table({"id": ["a", "b", "a"], "text": ["1", "2", "3"]}), tmp_path / "in.parquet"
    )
    with pytest.raises(
        InputError, match=r"candidates.id_column: 1 repeated ids in 'id' \(e.g. 'a' x2\)"
    ):
        ingest_side(InputSpec(path=str(tmp_path / "in.parquet"), id_column="id"), "candidates")


def test_null_given_ids_are_an_error(tmp_path):
    pq.write_table(pa.table({"id": ["a", None], "text": ["1", "2"]}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match="1 rows have a null or blank 'id'"):
        ingest_side(InputSpec(path=str(tmp_path / "in.parquet"), id_column="id"), "candidates")


def test_limit_takes_the_first_rows(tmp_path, rows):
    path = write("parquet", rows, tmp_path)
    table, _ = ingest_side(InputSpec(path=str(path), id_column="id", limit=17), "candidates")
    assert table["id"].to_pylist() == rows["id"].to_pylist()[:17]


def test_non_text_column_is_an_error_from_inside_ray(tmp_path):
    pq.write_table(pa.table({"text": [[1, 2], [3]]}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"column 'text': expected text, got list<"):
        ingest_side(InputSpec(path=str(tmp_path / "in.parquet")), "candidates")


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
