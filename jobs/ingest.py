"""Ingest: read candidates or targets with Ray Data into the run folder's canonical table.

`data/<side>.parquet` holds `id` (string), `text` (string) and the configured `keep_columns`, in
input order. Policy for bad rows (README, "Input policy"):

* null or blank text: dropped and counted (`on_empty: error` fails instead);
* ids derived from text: identical texts share an id; the first is kept, the rest counted as
  `duplicates_dropped`;
* ids from `id_column`: a null/blank or repeated id is an error naming the column and an example;
* a missing column, an unknown format, an unreadable or empty file: an error before any work.

Columns are checked on the driver from the file's schema (no cluster needed), so a typo fails in
a second, not after Ray has started.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.ids import content_ids
from jobs.config import InputSpec
from jobs.errors import InputError

SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


def input_files(spec: InputSpec, field: str) -> tuple[str, list[Path]]:
    """(format, files) for an input, or an InputError naming `field`."""
    path = Path(spec.path)
    if not path.exists():
        raise InputError(f"{field}.path: {path} does not exist")
    fmt = spec.format
    if path.is_dir():
        if fmt in ("auto", "hf") and (path / "dataset_info.json").is_file():
            return "hf", [path]
        if fmt == "hf":
            raise InputError(f"{field}.path: {path} is not a datasets save_to_disk folder")
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file()
            and not p.name.startswith((".", "_"))
            and p.suffix in SUFFIXES
            and (fmt == "auto" or SUFFIXES[p.suffix] == fmt)
        )
        if not files:
            raise InputError(f"{field}.path: folder {path} holds no .parquet/.jsonl/.csv files")
        kinds = {SUFFIXES[p.suffix] for p in files}
        if len(kinds) > 1:
            raise InputError(
                f"{field}.path: folder {path} mixes formats {sorted(kinds)}; set {field}.format"
            )
        return kinds.pop(), files
    if fmt == "auto":
        fmt = SUFFIXES.get(path.suffix)
        if fmt is None:
            raise InputError(
                f"{field}.path: cannot tell the format of {path.name}; expected .parquet, .jsonl, "
                f".json or .csv, or set {field}.format"
            )
    if fmt == "hf":
        raise InputError(f"{field}.path: {path} is a file; format hf expects a save_to_disk folder")
    return fmt, [path]


def _columns(fmt: str, file: Path) -> list[str]:
    """Column names of one input file, read cheaply (schema, header, first record)."""
    try:
        if fmt == "parquet":
            return pq.read_schema(file).names
        if fmt == "csv":
            with open(file, newline="", encoding="utf-8") as fh:
                return next(csv.reader(fh), [])
        if fmt == "jsonl":
            with open(file, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ValueError("first record is not a JSON object")
                        return list(record)
            return []
        if fmt == "hf":
            from datasets import load_from_disk

            return list(load_from_disk(str(file)).column_names)
    except (OSError, ValueError, UnicodeDecodeError, pa.ArrowException) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"{file}: not a readable {fmt} file ({reason})") from None
    raise AssertionError(fmt)


def check_input(spec: InputSpec, field: str) -> tuple[str, list[Path]]:
    """Validate an input before any cluster work: format, readability, required columns."""
    fmt, files = input_files(spec, field)
    wanted = [(f"{field}.text_column", spec.text_column)]
    if spec.id_column:
        wanted.append((f"{field}.id_column", spec.id_column))
    for col in spec.keep_columns:
        wanted.append((f"{field}.keep_columns", col))
        if col in ("id", "text") or col in (spec.text_column, spec.id_column):
            raise InputError(f"{field}.keep_columns: {col!r} is already carried as id/text")
    for file in files:
        names = _columns(fmt, file)
        if not names:
            raise InputError(f"{file}: no rows or header found")
        for key, col in wanted:
            if col not in names:
                raise InputError(
                    f"{file}: column {col!r} ({key}) not found; columns are {names[:20]}"
                )
    return fmt, files


def fingerprint(files: list[Path]) -> list[list]:
    """What a rerun compares to decide whether the input changed: path, size, mtime of each file."""
    out = []
    for f in files:
        for p in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if p.is_file():
                st = p.stat()
                out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def read_dataset(fmt: str, files: list[Path], spec: InputSpec):
    """A Ray Dataset over the input, reading only the needed columns where the format allows."""
    import ray.data

    paths = [str(f) for f in files]
    needed = [spec.text_column, *([spec.id_column] if spec.id_column else []), *spec.keep_columns]
    if fmt == "parquet":
        ds = ray.data.read_parquet(paths, columns=needed)
    elif fmt == "jsonl":
        ds = ray.data.read_json(paths, lines=True)
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        # Every column as string: ids like 007 must not become 7.
        ds = ray.data.read_csv(
            paths,
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in needed}),
        )
    else:
        from datasets import load_from_disk

        hf = load_from_disk(paths[0])
        if not hasattr(hf, "select_columns"):
            raise InputError(f"{paths[0]}: a DatasetDict; point the path at one split's folder")
        ds = ray.data.from_huggingface(hf.select_columns(needed))
    if spec.limit:
        ds = ds.limit(spec.limit)
    return ds


def normalise(
    batch: pa.Table, text_column: str, id_column: str | None, keep: list[str]
) -> pa.Table:
    """One batch -> (id, text, keep..., _empty). Runs inside Ray Data tasks."""
    try:
        text = pc.cast(batch.column(text_column), pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(
            f"column {text_column!r}: expected text, got {batch.schema.field(text_column).type}"
        ) from None
    text = pc.fill_null(text, "")
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
    if id_column:
        ids = pc.cast(batch.column(id_column), pa.string())
    else:
        ids = pa.array(content_ids(text.to_pylist()), pa.string())
    cols = {"id": ids, "text": text}
    cols.update({c: batch.column(c) for c in keep})
    cols["_empty"] = empty
    return pa.table(cols)


def collect(ds) -> pa.Table:
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


def ingest_side(spec: InputSpec, field: str) -> tuple[pa.Table, dict]:
    """Read and clean one side; returns the canonical table and the counts for the manifest."""
    fmt, files = check_input(spec, field)
    ds = read_dataset(fmt, files, spec).map_batches(
        normalise,
        batch_format="pyarrow",
        fn_kwargs={
            "text_column": spec.text_column,
            "id_column": spec.id_column,
            "keep": list(spec.keep_columns),
        },
    )
    table = collect(ds)
    rows_read = table.num_rows
    if rows_read == 0:
        raise InputError(f"{field}.path: {spec.path} has no rows")
    empty = table.column("_empty").to_numpy(zero_copy_only=False)
    n_empty = int(empty.sum())
    if n_empty and spec.on_empty == "error":
        first = int(np.flatnonzero(empty)[0])
        raise InputError(
            f"{field}.text_column: {n_empty} rows have null or blank {spec.text_column!r} "
            f"(first at row {first}); set {field}.on_empty: drop to skip them"
        )
    table = table.filter(pc.invert(table.column("_empty"))).drop_columns(["_empty"])
    if table.num_rows == 0:
        raise InputError(f"{field}.text_column: every row of {spec.path} has an empty text")
    ids = table.column("id")
    if spec.id_column:
        bad = pc.sum(pc.or_(pc.is_null(ids), pc.equal(pc.utf8_length(pc.fill_null(ids, "")), 0)))
        if bad.as_py():
            raise InputError(
                f"{field}.id_column: {bad.as_py()} rows have a null or blank {spec.id_column!r}"
            )
    ids_np = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=str)
    _, first_index = np.unique(ids_np, return_index=True)
    n_dup = table.num_rows - len(first_index)
    if n_dup and spec.id_column:
        counts = pc.value_counts(ids)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))
        raise InputError(
            f"{field}.id_column: {n_dup} repeated ids in {spec.id_column!r} "
            f"(e.g. {repeated[0]['values'].as_py()!r} x{repeated[0]['counts'].as_py()})"
        )
    if n_dup:
        table = table.take(np.sort(first_index))
    counts = {
        "rows_read": rows_read,
        "empty_dropped": n_empty,
        "duplicates_dropped": n_dup,
        "rows": table.num_rows,
        "format": fmt,
        "inputs": fingerprint(files),
    }
    return table, counts
